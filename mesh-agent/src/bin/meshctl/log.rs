//! `meshctl log [on|off]`: the datapath log's switch on this node (without an argument,
//! whether it is on). While on, the programs write a record per new flow (its backend)
//! and per drop (its reason) and the agent logs them (target `mesh::datapath`).

use super::*;

pub(crate) fn log(args: &Args, set: Option<Switch>) -> anyhow::Result<()> {
    use mesh_agent::datapath::log;
    if let Some(s) = set {
        log::set(&args.bpffs, s == Switch::On)?;
    }
    let on = log::is_on(&args.bpffs)?;
    let state = if on { "on" } else { "off" };
    if args.json {
        return print_json(&serde_json::json!({ "log": state }));
    }
    println!("datapath log: {state}");
    if on && set.is_some() {
        eprintln!("records go to the agent's log (target mesh::datapath)");
    }
    Ok(())
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Switch {
    On,
    Off,
}
