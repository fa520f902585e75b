//! Tier 3: `deploy/bootstrap-node.sh`, the node preparation script, for real but inside a
//! throwaway sandbox: `unshare --mount --propagation private --net` gives it a fresh
//! network namespace (its own `ip_forward`, its own empty firewall) and a private mount
//! namespace in which bpffs is first unmounted; every file goes under a scratch `--root`.
//! Nothing it does reaches the host: the namespaces die with the sandbox's shell, and the
//! scratch directory is removed when the test ends.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use mesh_tests::prereq;

const ARTIFACTS: [&str; 3] = ["mesh-agent", "meshctl", "mesh.bpf.o"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn script() -> PathBuf {
    repo().join("deploy/bootstrap-node.sh")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Root and `unshare`, the prerequisites here (the script needs no eBPF object, so this is
/// narrower than `prereq::privileged`, with the same rule: skip saying why, or fail under
/// `CI=true`).
fn privileged(test: &str) -> bool {
    let why = if !mesh_agent::host::preflight::is_root() {
        "not root"
    } else if !have("unshare") {
        "`unshare` (util-linux) not found"
    } else {
        return true;
    };
    if prereq::in_ci() {
        panic!("{test}: privileged prerequisite missing under CI=true: {why}");
    }
    eprintln!("SKIP {test}: {why} (run `cargo xtask test` as root)");
    false
}

/// A scratch directory, removed on drop (and so on panic): `root/` (the script's
/// `--root`), `out/` (what each run printed, and the sandbox's observations) and, when
/// there is no release build, `from/` with three small stand-ins.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mesh-bootstrap-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["root", "out"] {
            fs::create_dir_all(dir.join(sub)).expect("create scratch dir");
        }
        Scratch { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// The release build when `cargo xtask build` made one, else stand-ins (the script
    /// only copies them).
    fn from(&self) -> PathBuf {
        let release = repo().join("target/release");
        if ARTIFACTS.iter().all(|a| release.join(a).is_file()) {
            return release;
        }
        let from = self.dir.join("from");
        fs::create_dir_all(&from).expect("create from dir");
        for a in ARTIFACTS {
            fs::write(from.join(a), format!("stand-in for {a}\n")).expect("write stand-in");
        }
        from
    }

    /// Every file and directory under the scratch root.
    fn root_entries(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, acc: &mut Vec<PathBuf>) {
            for e in fs::read_dir(d).expect("read_dir").flatten() {
                let p = e.path();
                acc.push(p.clone());
                if p.is_dir() && !p.is_symlink() {
                    walk(&p, acc);
                }
            }
        }
        let mut acc = Vec::new();
        walk(&self.root(), &mut acc);
        acc
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The sandbox's shell, before the test's own lines: ip_forward 0 (a new network
/// namespace copies the host's IPv4 settings), bpffs unmounted (in this mount namespace
/// only), and two helpers: `state TAG` records ip_forward and the file system type at
/// /sys/fs/bpf; `boot TAG ARGS...` runs the script with the scratch root and source
/// directory, then any ARGS (later flags win), recording its stdout, stderr, exit code
/// and the state after it.
const PRELUDE: &str = r#"
set -u
script=$1 root=$2 from=$3 out=$4
shift 4
sysctl -qw net.ipv4.ip_forward=0
n=0
while [ "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs ]; do
    umount -l /sys/fs/bpf
    n=$((n + 1))
    [ "$n" -lt 10 ] || { echo "bpffs stays mounted at /sys/fs/bpf" >&2; exit 90; }
done
state() {
    printf 'ip_forward=%s\nbpffs=%s\n' "$(cat /proc/sys/net/ipv4/ip_forward)" \
        "$(stat -f -c %T /sys/fs/bpf)" >"$out/$1.state"
}
boot() {
    tag=$1
    shift
    "$script" --no-docker-install --root "$root" --from "$from" "$@" \
        >"$out/$tag.out" 2>"$out/$tag.err"
    echo $? >"$out/$tag.rc"
    state "$tag"
}
state before
"#;

/// Runs `body` (after [`PRELUDE`]) in a fresh network namespace and a private mount
/// namespace; asserts the sandbox's shell itself succeeded.
fn sandbox(s: &Scratch, from: &Path, body: &str) {
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--net",
            "--",
            "bash",
            "-c",
        ])
        .arg(format!("{PRELUDE}\n{body}"))
        .arg("bash")
        .arg(script())
        .arg(s.root())
        .arg(from)
        .arg(s.out())
        .output()
        .expect("running unshare");
    assert!(
        out.status.success(),
        "sandbox shell failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What one `boot TAG` recorded.
struct Run {
    tag: String,
    rc: i32,
    stdout: String,
    stderr: String,
    state: BTreeMap<String, String>,
}

impl Run {
    fn read(s: &Scratch, tag: &str) -> Run {
        let f = |ext: &str| {
            fs::read_to_string(s.out().join(format!("{tag}.{ext}")))
                .unwrap_or_else(|e| panic!("{tag}.{ext}: {e}"))
        };
        let run = Run {
            tag: tag.into(),
            rc: f("rc").trim().parse().expect("exit code"),
            stdout: f("out"),
            stderr: f("err"),
            state: state(&f("state")),
        };
        eprintln!(
            "--- bootstrap run `{tag}`: exit {}\n{}{}",
            run.rc, run.stdout, run.stderr
        );
        run
    }

    fn lines(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    fn assert_ok(&self) {
        assert_eq!(
            self.rc, 0,
            "run `{}` failed: {}{}",
            self.tag, self.stdout, self.stderr
        );
        assert!(
            self.stderr.is_empty(),
            "run `{}` stderr: {}",
            self.tag,
            self.stderr
        );
    }

    /// A failure: non-zero exit, exactly one stderr line, `bootstrap-node: error: ...`
    /// mentioning `needle`; no change made.
    fn assert_one_line_error(&self, needle: &str) {
        assert_ne!(
            self.rc, 0,
            "run `{}` should fail: {}",
            self.tag, self.stdout
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "run `{}`: expected one stderr line, got {lines:?}",
            self.tag
        );
        assert!(
            lines[0].starts_with("bootstrap-node: error: ") && lines[0].contains(needle),
            "run `{}`: stderr {:?} should be `bootstrap-node: error: ...{needle}...`",
            self.tag,
            lines[0]
        );
        assert!(
            self.lines("changed:").is_empty(),
            "run `{}` changed things before failing: {}",
            self.tag,
            self.stdout
        );
    }
}

fn state(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The sandbox really starts from what the script must fix (else the tests prove nothing).
fn assert_fresh_start(s: &Scratch) {
    let before = state(&fs::read_to_string(s.out().join("before.state")).expect("before.state"));
    assert_eq!(before["ip_forward"], "0", "sandbox setup: {before:?}");
    assert_ne!(before["bpffs"], "bpf_fs", "sandbox setup: {before:?}");
}

#[test]
fn bootstrap_dry_run_changes_nothing() {
    if !privileged("bootstrap_dry_run_changes_nothing") {
        return;
    }
    let s = Scratch::new("dry");
    let from = s.from();
    sandbox(&s, &from, "boot dry --dry-run --data-path-port 4790");
    assert_fresh_start(&s);
    let run = Run::read(&s, "dry");
    run.assert_ok();

    let would = run.lines("would: ");
    let root = s.root().display().to_string();
    let expect: Vec<(&str, String)> = vec![
        ("the bpffs mount", "mount bpffs at /sys/fs/bpf".into()),
        ("the fstab line", format!("{root}/etc/fstab")),
        (
            "the sysctl file",
            format!("{root}/etc/sysctl.d/90-mesh.conf"),
        ),
        ("the live sysctl", "sysctl -w net.ipv4.ip_forward=1".into()),
        ("mesh-agent", format!("{root}/usr/local/bin/mesh-agent")),
        ("meshctl", format!("{root}/usr/local/bin/meshctl")),
        (
            "the object",
            format!("{root}/usr/local/lib/mesh/mesh.bpf.o"),
        ),
        ("the settings", format!("{root}/etc/mesh/agent.yaml")),
    ];
    for (what, needle) in &expect {
        assert!(
            would.iter().any(|l| l.contains(needle.as_str())),
            "no `would:` line for {what} (`{needle}`) in:\n{}",
            run.stdout
        );
    }
    assert!(
        would.iter().any(|l| l.contains("data-path-port: 4790")),
        "the settings line should name the port: {would:?}"
    );
    assert!(run.lines("changed:").is_empty(), "{}", run.stdout);

    // Nothing happened: no file, ip_forward and bpffs as they were.
    assert_eq!(
        s.root_entries(),
        Vec::<PathBuf>::new(),
        "dry run wrote files"
    );
    assert_eq!(run.state["ip_forward"], "0", "dry run set ip_forward");
    assert_ne!(run.state["bpffs"], "bpf_fs", "dry run mounted bpffs");
}

/// Shell lines that give the sandbox a host firewall dropping input (iptables, and a
/// native nft table), so that the firewall step has something to open; `out/fw` says
/// which were set up, `fw_dump TAG` records the rules.
const FIREWALL: &str = r#"
: >"$out/fw"
if command -v iptables >/dev/null 2>&1 && iptables -w -P INPUT DROP 2>/dev/null; then
    echo iptables >>"$out/fw"
fi
if command -v nft >/dev/null 2>&1 && nft add table inet mt 2>/dev/null \
    && nft add chain inet mt input '{ type filter hook input priority 0; policy drop; }' 2>/dev/null; then
    echo nft >>"$out/fw"
fi
fw_dump() {
    if command -v iptables >/dev/null 2>&1; then iptables -w -S INPUT >"$out/$1.iptables" 2>&1; fi
    if command -v nft >/dev/null 2>&1; then nft list chain inet mt input >"$out/$1.nft" 2>&1; fi
    return 0
}
"#;

#[test]
fn bootstrap_for_real_in_a_scratch_namespace() {
    if !privileged("bootstrap_for_real_in_a_scratch_namespace") {
        return;
    }
    let s = Scratch::new("real");
    let from = s.from();
    sandbox(
        &s,
        &from,
        &format!(
            "{FIREWALL}
boot first --data-path-port 4790
fw_dump first
boot second --data-path-port 4790
fw_dump second
boot third
boot ipvs_off --keep-ipvs-off
cp \"$root/etc/modprobe.d/mesh-no-ipvs.conf\" \"$out/ipvs.conf\"
boot ipvs_again --keep-ipvs-off
boot ipvs_allow --allow-ipvs"
        ),
    );
    assert_fresh_start(&s);

    let first = Run::read(&s, "first");
    first.assert_ok();
    assert!(!first.lines("changed:").is_empty(), "{}", first.stdout);
    assert_eq!(first.state["bpffs"], "bpf_fs", "bpffs not mounted");
    assert_eq!(first.state["ip_forward"], "1", "ip_forward not set");

    let root = s.root();
    for (name, dir, mode) in [
        ("mesh-agent", "usr/local/bin", 0o755),
        ("meshctl", "usr/local/bin", 0o755),
        ("mesh.bpf.o", "usr/local/lib/mesh", 0o644),
    ] {
        let dst = root.join(dir).join(name);
        let meta = fs::metadata(&dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{}", dst.display());
        assert_eq!(
            meta.len(),
            fs::metadata(from.join(name)).expect("source").len(),
            "{} size",
            dst.display()
        );
    }
    assert!(
        fs::read(root.join("usr/local/bin/meshctl")).expect("installed meshctl")
            == fs::read(from.join("meshctl")).expect("source meshctl"),
        "installed meshctl differs from the source"
    );

    let fstab = fs::read_to_string(root.join("etc/fstab")).expect("fstab");
    assert!(
        fstab
            .lines()
            .any(|l| l == "bpffs /sys/fs/bpf bpf defaults 0 0"),
        "fstab: {fstab:?}"
    );
    let sysctl = fs::read_to_string(root.join("etc/sysctl.d/90-mesh.conf")).expect("90-mesh.conf");
    assert!(
        sysctl.lines().any(|l| l == "net.ipv4.ip_forward = 1"),
        "90-mesh.conf: {sysctl:?}"
    );
    assert!(
        sysctl
            .lines()
            .any(|l| l.starts_with('#') && l.contains("forward")),
        "90-mesh.conf should say why: {sysctl:?}"
    );
    let settings = fs::read_to_string(root.join("etc/mesh/agent.yaml")).expect("agent.yaml");
    assert!(
        settings.lines().any(|l| l == "data-path-port: 4790"),
        "agent.yaml: {settings:?}"
    );

    // The sandbox's firewall drops input: the swarm's ports, the data-path port and the
    // peer port were opened, once.
    let fw = fs::read_to_string(s.out().join("fw")).unwrap_or_default();
    let ports = [
        ("tcp", 2377),
        ("tcp", 7946),
        ("udp", 7946),
        ("udp", 4790),
        ("tcp", 9478),
    ];
    if fw.lines().any(|l| l == "iptables") {
        let rules = fs::read_to_string(s.out().join("second.iptables")).expect("iptables dump");
        for (proto, port) in ports {
            let n = rules
                .lines()
                .filter(|l| {
                    l.starts_with("-A INPUT")
                        && l.contains(&format!("-p {proto}"))
                        && l.contains(&format!("--dport {port} "))
                        && l.contains("mesh-bootstrap")
                        && l.ends_with("-j ACCEPT")
                })
                .count();
            assert_eq!(n, 1, "iptables rule for {port}/{proto}:\n{rules}");
        }
    } else {
        eprintln!("note: no iptables here; its firewall path untested");
    }
    if fw.lines().any(|l| l == "nft") {
        let rules = fs::read_to_string(s.out().join("second.nft")).expect("nft dump");
        for (proto, port) in ports {
            let rule = format!("{proto} dport {port} accept comment \"mesh-bootstrap\"");
            let n = rules.lines().filter(|l| l.trim() == rule).count();
            assert_eq!(n, 1, "nft rule `{rule}`:\n{rules}");
        }
    } else {
        eprintln!("note: no nft here; its firewall path untested");
    }

    // Idempotent: the same flags again change nothing; so does a run without the port
    // flag (it keeps the settings file's port rather than undoing it).
    for tag in ["second", "third"] {
        let again = Run::read(&s, tag);
        again.assert_ok();
        assert!(
            again.lines("changed:").is_empty(),
            "run `{tag}` changed things:\n{}",
            again.stdout
        );
        assert!(again.lines("ok: ").len() >= 10, "{}", again.stdout);
    }
    let settings = fs::read_to_string(root.join("etc/mesh/agent.yaml")).expect("agent.yaml");
    assert!(
        settings.lines().any(|l| l == "data-path-port: 4790"),
        "agent.yaml after a run without --data-path-port: {settings:?}"
    );

    // Docker's IPVS mesh: said without a flag, kept off on request, allowed again.
    assert!(
        first.stdout.lines().any(|l| l.contains("ip_vs")),
        "nothing said about ip_vs:\n{}",
        first.stdout
    );
    let conf = root.join("etc/modprobe.d/mesh-no-ipvs.conf");
    let off = Run::read(&s, "ipvs_off");
    off.assert_ok();
    assert_eq!(
        off.lines("changed:"),
        vec![format!(
            "changed: write {} (keeps ip_vs from loading)",
            conf.display()
        )
        .as_str()],
        "{}",
        off.stdout
    );
    // As the run wrote it (the last run removed it again).
    let text = fs::read_to_string(s.out().join("ipvs.conf")).expect("mesh-no-ipvs.conf");
    for l in ["blacklist ip_vs", "install ip_vs /bin/false"] {
        assert!(text.lines().any(|x| x == l), "{l}: {text:?}");
    }
    assert!(text.contains("--allow-ipvs"), "says how to undo: {text:?}");
    let again = Run::read(&s, "ipvs_again");
    again.assert_ok();
    assert!(again.lines("changed:").is_empty(), "{}", again.stdout);
    let allow = Run::read(&s, "ipvs_allow");
    allow.assert_ok();
    assert_eq!(allow.lines("changed:").len(), 1, "{}", allow.stdout);
    assert!(!conf.exists(), "--allow-ipvs removes {}", conf.display());
}

#[test]
fn bootstrap_fails_with_one_line() {
    if !privileged("bootstrap_fails_with_one_line") {
        return;
    }
    let s = Scratch::new("fail");
    let from = s.from();
    // A `uname` that fails silently, to see the ERR trap turn an unexpected failure into
    // one line naming the command.
    let shim = s.dir.join("shim");
    fs::create_dir_all(&shim).expect("shim dir");
    fs::write(shim.join("uname"), "#!/bin/sh\nexit 3\n").expect("shim");
    fs::set_permissions(shim.join("uname"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let nonroot = have("setpriv");
    sandbox(
        &s,
        &from,
        &format!(
            "boot port --data-path-port 70000
boot from --from /nonexistent
boot both --keep-ipvs-off --allow-ipvs
PATH={shim}:$PATH boot trap --dry-run
{nonroot}",
            shim = shim.display(),
            nonroot = if nonroot {
                "setpriv --reuid 65534 --regid 65534 --clear-groups \
                 \"$script\" --no-docker-install --root \"$root\" --from \"$from\" \
                 >\"$out/user.out\" 2>\"$out/user.err\"; echo $? >\"$out/user.rc\"; state user"
            } else {
                ""
            }
        ),
    );
    Run::read(&s, "port")
        .assert_one_line_error("--data-path-port must be a port number 1..65535, not `70000`");
    Run::read(&s, "from").assert_one_line_error("--from /nonexistent");
    Run::read(&s, "both")
        .assert_one_line_error("--keep-ipvs-off and --allow-ipvs contradict each other: pass one");
    Run::read(&s, "trap").assert_one_line_error("unexpected failure of `uname -r`");
    if nonroot {
        Run::read(&s, "user").assert_one_line_error("must run as root");
    } else {
        eprintln!("note: no setpriv here; the not-root check untested");
    }
    assert_eq!(
        s.root_entries(),
        Vec::<PathBuf>::new(),
        "a failed run wrote files"
    );
    for tag in ["port", "from", "both", "trap"] {
        let st = state(&fs::read_to_string(s.out().join(format!("{tag}.state"))).expect("state"));
        assert_eq!(st["ip_forward"], "0", "failed run `{tag}` set ip_forward");
        assert_ne!(st["bpffs"], "bpf_fs", "failed run `{tag}` mounted bpffs");
    }
}

/// The kernel check follows the agent's rules (a `uname` shim plays each release): below
/// 5.10 one line naming what is missing; 5.10..6.5 pass with the fallbacks the agent
/// will use noted; 6.6 and later need none.
#[test]
fn bootstrap_kernel_check_follows_the_agent() {
    if !privileged("bootstrap_kernel_check_follows_the_agent") {
        return;
    }
    let s = Scratch::new("kernel");
    let from = s.from();
    let mut body = String::new();
    for (tag, release) in [
        ("k54", "5.4.0-200-generic"),
        ("k510", "5.10.0-46-amd64"),
        ("k61", "6.1.0-57-amd64"),
        ("k66", "6.6.30"),
    ] {
        let shim = s.dir.join(format!("shim-{tag}"));
        fs::create_dir_all(&shim).expect("shim dir");
        fs::write(shim.join("uname"), format!("#!/bin/sh\necho {release}\n")).expect("shim");
        fs::set_permissions(shim.join("uname"), fs::Permissions::from_mode(0o755)).expect("chmod");
        body.push_str(&format!(
            "PATH={}:$PATH boot {tag} --dry-run\n",
            shim.display()
        ));
    }
    sandbox(&s, &from, &body);

    Run::read(&s, "k54").assert_one_line_error(
        "kernel >= 5.10 (this is 5.4.0-200-generic, which lacks cgroup bpf links and \
         BPF_LINK_UPDATE (5.7), bpf_get_netns_cookie in socket programs (5.7), getpeername \
         socket hooks (5.8), XDP bpf links (5.9), bpf_redirect_neigh (5.10))",
    );
    let notes = |r: &Run| -> [bool; 4] {
        let n = r.lines("note: ").join("\n");
        [
            n.contains(
                "no tcx links before 6.6: the agent attaches TC programs as netlink clsact filters",
            ),
            n.contains("no bpf_check_mtu before 5.12"),
            n.contains("no SO_NETNS_COOKIE before 5.14: the host port stays off"),
            n.contains("no bpf_xdp_load_bytes before 5.18"),
        ]
    };
    let k510 = Run::read(&s, "k510");
    k510.assert_ok();
    assert!(k510.lines("ok: kernel 5.10.0-46-amd64 (>= 5.10)").len() == 1);
    assert_eq!(notes(&k510), [true; 4], "{}", k510.stdout);
    let k61 = Run::read(&s, "k61");
    k61.assert_ok();
    assert_eq!(notes(&k61), [true, false, false, false], "{}", k61.stdout);
    let k66 = Run::read(&s, "k66");
    k66.assert_ok();
    assert_eq!(
        k66.lines("ok: kernel 6.6.30 (>= 6.6").len(),
        1,
        "{}",
        k66.stdout
    );
    assert_eq!(notes(&k66), [false; 4], "{}", k66.stdout);
    assert_eq!(
        s.root_entries(),
        Vec::<PathBuf>::new(),
        "a dry run wrote files"
    );
}
