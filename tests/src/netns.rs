//! Network namespaces owned by a test: created on construction, deleted on drop (and so
//! on panic). Names carry the creating PID so that a sweep can remove the leftovers of a
//! test process that was killed, and nothing else.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

/// Prefix of every namespace the tests create: `mt<pid>-<tag>`.
pub const PREFIX: &str = "mt";

pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

impl Netns {
    /// Creates `mt<pid>-<tag>` (after sweeping namespaces of dead test processes).
    pub fn new(tag: &str) -> Netns {
        sweep_stale();
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`, asserting success.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// Runs a command inside the namespace, asserting success.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(cmd);
        ip(&a)
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets it opens stay in the
    /// namespace; interface names it resolves are the namespace's.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a valid namespace fd.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its interfaces (and the veth peers elsewhere).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Deletes `mt<pid>-*` namespaces whose creating process no longer exists.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Counters from `/proc/thread-self/net/snmp` (call inside [`Netns::enter`]): the
/// kernel's own view, to check the datapath's counters against.
pub fn snmp(proto: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
    let header = lines.next().expect("snmp header");
    let values = lines.next().expect("snmp values");
    let i = header
        .split_whitespace()
        .position(|h| h == field)
        .unwrap_or_else(|| panic!("no {proto} {field} in snmp"));
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}
