//! The binaries' failure modes: one line on stderr that says what to do, exit code 1.
//! (Run as root, the root check passes and the next prerequisite is what fails.)

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::process::Command;

fn one_line_error(bin: &str, args: &[&str]) -> String {
    one_line_error_code(bin, args, 1)
}

fn one_line_error_code(bin: &str, args: &[&str], code: i32) -> String {
    let out = Command::new(bin).args(args).output().expect("run binary");
    assert_eq!(
        out.status.code(),
        Some(code),
        "{bin} {args:?} should exit {code}"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "one line, got: {err}");
    err
}

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn agent_names_the_missing_interface() {
    let err = one_line_error(
        env!("CARGO_BIN_EXE_mesh-agent"),
        &[
            "--interface",
            "mesh-nope0",
            "--bpffs",
            "/sys/fs/bpf/mesh-cli-test",
        ],
    );
    if root() && mesh_agent::host::preflight::on_bpffs(std::path::Path::new("/sys/fs/bpf")) {
        assert!(
            err.contains("interface \"mesh-nope0\" does not exist"),
            "{err}"
        );
        let _ = std::fs::remove_dir("/sys/fs/bpf/mesh-cli-test");
    } else if root() {
        assert!(err.contains("bpffs is not mounted"), "{err}");
    } else {
        assert!(err.contains("must run as root"), "{err}");
    }
}

#[test]
fn agent_refuses_a_pin_dir_off_bpffs() {
    let err = one_line_error(
        env!("CARGO_BIN_EXE_mesh-agent"),
        &["--interface", "lo", "--bpffs", "/tmp/mesh-not-bpffs"],
    );
    let want = if root() {
        "bpffs is not mounted"
    } else {
        "must run as root"
    };
    assert!(err.contains(want), "{err}");
}

#[test]
fn agent_rejects_port_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["--interface", "lo", "--data-path-port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("data-path-port"));
}

#[test]
fn meshctl_says_when_no_mesh_is_pinned() {
    // Exit code 4 names "nothing pinned" (1: any other error, such as not being root).
    let (want, code) = if root() {
        ("no mesh is pinned", 4)
    } else {
        ("must run as root", 1)
    };
    for cmd in ["stats", "services", "status", "conntrack"] {
        let err = one_line_error_code(
            env!("CARGO_BIN_EXE_meshctl"),
            &[cmd, "--bpffs", "/sys/fs/bpf/mesh-none-here"],
            code,
        );
        assert!(err.contains(want), "{cmd}: {err}");
    }
}

/// A settings file: read, the command line and the environment win over it, and a
/// mistake in it is one line naming the key.
#[test]
fn agent_settings_file_and_its_precedence() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.yaml");
    let f = file.to_str().unwrap();
    std::fs::write(&file, "interfce: eth1\n").unwrap();
    let err = one_line_error(env!("CARGO_BIN_EXE_mesh-agent"), &["--settings", f]);
    assert!(
        err.contains("unknown key `interfce`") && err.contains(f),
        "{err}"
    );
    let err = one_line_error(
        env!("CARGO_BIN_EXE_mesh-agent"),
        &["--settings", "/nonexistent/agent.yaml"],
    );
    assert!(
        err.contains("settings file /nonexistent/agent.yaml"),
        "{err}"
    );
    if root() && mesh_agent::host::preflight::on_bpffs(std::path::Path::new("/sys/fs/bpf")) {
        std::fs::write(
            &file,
            "interface: mesh-file0\nbpffs: /sys/fs/bpf/mesh-cli-test2\n",
        )
        .unwrap();
        let err = one_line_error(env!("CARGO_BIN_EXE_mesh-agent"), &["--settings", f]);
        assert!(
            err.contains("interface \"mesh-file0\" does not exist"),
            "file read: {err}"
        );
        let err = one_line_error(
            env!("CARGO_BIN_EXE_mesh-agent"),
            &["--settings", f, "--interface", "mesh-flag0"],
        );
        assert!(
            err.contains("\"mesh-flag0\""),
            "the command line wins: {err}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["--settings", f])
            .env("MESH_INTERFACE", "mesh-env0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("\"mesh-env0\""), "the environment wins: {err}");
        let _ = std::fs::remove_dir("/sys/fs/bpf/mesh-cli-test2");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
