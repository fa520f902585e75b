//! The PIDs `up` and `cluster agent` record: alive or not, and signalled only after
//! checking their command line is still what was started.

use super::layout::{exec_root, node_dir};
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// Running (a zombie is not: when `up` ran in this very process, dockerd is our child
/// and lingers as one until reaped).
pub(super) fn alive(pid: u32) -> bool {
    // SAFETY: reaps `pid` only if it is our own exited child; harmless otherwise.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub(super) fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

pub(super) fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

pub(super) fn kill_checked(pid: u32, must: &str, sig: i32) {
    if alive(pid) && cmdline(pid).contains(must) {
        // SAFETY: signalling a PID we recorded, after checking it is still ours.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

pub(super) fn wait_gone(pid: u32, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// dockerd's PID for node `n`, if it is still our dockerd.
pub(super) fn dockerd_pid(n: u32) -> Option<u32> {
    let pid = read_pid(&node_dir(n).join("dockerd.pid"))?;
    (alive(pid) && cmdline(pid).contains(&format!("{}/docker.sock", exec_root(n)))).then_some(pid)
}
