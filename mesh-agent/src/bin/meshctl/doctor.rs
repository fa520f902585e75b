//! `meshctl doctor`: the checks (`mesh_agent::ctl::doctor`), printed, and `--fix`.

use mesh_agent::ctl::doctor::{diagnose, Check, Target};

use super::*;

pub(crate) fn doctor(
    args: &Args,
    fix: bool,
    docker: &str,
    ask_docker: bool,
) -> anyhow::Result<i32> {
    let target = Target {
        state_dir: &args.state_dir,
        bpffs: &args.bpffs,
        docker,
        ask_docker,
    };
    let mut checks = diagnose(&target);
    if fix {
        ask_the_agent_to_repair(args)?;
        checks = diagnose(&target);
    }
    if args.json {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let mark = match c.result {
                "ok" => "ok  ",
                "warn" => "WARN",
                _ => "FAIL",
            };
            println!("{mark} {:<16} {}", c.check, c.detail);
        }
    }
    Ok(if checks.iter().any(Check::failed) {
        5
    } else {
        0
    })
}

/// `--fix`: the running agent re-reads the maps on SIGUSR1 and reconciles on its next
/// turn; waits (up to 10 s) for the status file to say it did.
fn ask_the_agent_to_repair(args: &Args) -> anyhow::Result<()> {
    let st = agent_status(args);
    let (Some(st), Some(pid)) = (
        st.clone(),
        st.as_ref()
            .and_then(mesh_agent::agent::state::live_agent_pid),
    ) else {
        anyhow::bail!("--fix asks the agent to repair, and no agent is running: start mesh-agent");
    };
    let before = st.last_reconcile_unix;
    // SAFETY: a signal to the running mesh-agent named in its own status file (its
    // command name checked by live_agent_pid).
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        if agent_status(args).is_some_and(|s| s.last_reconcile_unix > before + 0.0) {
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
    }
    Ok(())
}
