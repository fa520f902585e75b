//! mesh-agent: loads the datapath with its maps and links pinned on bpffs, attaches it
//! to the underlay interface and to each local task's veth, and keeps the maps equal to
//! the model: from Docker (`--from-docker`: the Swarm, followed through /events and a
//! periodic full resync) or from a file (`--config`, re-read on SIGHUP).
//!
//! The datapath outlives the agent: on exit (SIGTERM, or kill -9) programs stay attached
//! and maps stay pinned, and the next agent adopts them without flushing anything.
//! `mesh-agent --uninstall` removes it all.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use clap::Parser;
use mesh_agent::agent::{Flags, LogFormat};

/// Hands the settings file's values to the flag parser as the flags' environment
/// variables, where neither the command line nor the environment set them already.
fn apply_settings_file() -> anyhow::Result<()> {
    use clap::CommandFactory;
    let argv: Vec<String> = std::env::args().collect();
    let explicit = argv
        .iter()
        .position(|a| a == "--settings")
        .and_then(|i| argv.get(i + 1).cloned())
        .or_else(|| {
            argv.iter()
                .find_map(|a| a.strip_prefix("--settings=").map(String::from))
        })
        .or_else(|| std::env::var("MESH_SETTINGS").ok());
    let path = explicit
        .clone()
        .unwrap_or_else(|| mesh_agent::agent::settings::DEFAULT_PATH.into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => return Ok(()),
        Err(e) => anyhow::bail!("settings file {path}: {e}"),
    };
    let cmd = Flags::command();
    let flags: std::collections::BTreeMap<String, String> = cmd
        .get_arguments()
        .filter(|a| a.get_id() != "settings")
        .filter_map(|a| {
            Some((
                a.get_long()?.to_string(),
                a.get_env()?.to_string_lossy().into_owned(),
            ))
        })
        .collect();
    let env = mesh_agent::agent::settings::to_env(&text, &flags)
        .map_err(|e| anyhow::anyhow!("settings file {path}: {e}"))?;
    for (k, v) in env {
        let long = flags.iter().find(|(_, e)| **e == k).map(|(l, _)| l.clone());
        let on_command_line = long.is_some_and(|l| {
            argv.iter()
                .any(|a| *a == format!("--{l}") || a.starts_with(&format!("--{l}=")))
        });
        if std::env::var_os(&k).is_none() && !on_command_line {
            // Single-threaded still: nothing else reads the environment yet.
            std::env::set_var(k, v);
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = apply_settings_file() {
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
    let args = Flags::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let Err(e) = mesh_agent::agent::run(args) {
        // One line, the whole chain: what failed and why.
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}
