//! meshctl: see what the mesh is doing. Reads pinned maps directly, so it works while
//! the agent is down.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mesh_agent::{preflight, stats::Snapshot};
use mesh_common::reason::Kind;

#[derive(Parser, Debug)]
#[command(version, about = "Inspect the mesh datapath")]
struct Args {
    /// Directory on bpffs where the agent pins its maps.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Packets and bytes by hook and verdict/drop reason (non-zero counters only).
    Stats,
}

fn main() {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Stats => stats(&args),
    };
    if let Err(e) = result {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}

fn stats(args: &Args) -> anyhow::Result<()> {
    preflight::require_root("meshctl reads pinned BPF maps")?;
    let snap = Snapshot::read_pinned(&args.bpffs)?;
    if args.json {
        let rows: Vec<_> = snap
            .iter()
            .map(|(h, r, c)| {
                serde_json::json!({
                    "hook": h.name(), "reason": r.name(),
                    "kind": format!("{:?}", r.kind()).to_lowercase(),
                    "packets": c.packets, "bytes": c.bytes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<22} {:<28} {:>12} {:>14}",
        "HOOK", "REASON", "PACKETS", "BYTES"
    );
    for (h, r, c) in snap.iter() {
        let mark = if r.kind() == Kind::Drop { "!" } else { " " };
        println!(
            "{:<22} {mark}{:<27} {:>12} {:>14}",
            h.name(),
            r.name(),
            c.packets,
            c.bytes
        );
    }
    Ok(())
}
