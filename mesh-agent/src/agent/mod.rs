//! The `mesh-agent` daemon: `run` takes the parsed flags and runs the agent until a
//! signal stops it (or uninstalls the mesh). `flags` (what it is told), `source` (the
//! model from Docker), `runtime` (start-up and the loop), `apply` (one model into the
//! datapath).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;

use crate::{datapath::pins::PinDir, host::preflight, model, source::docker, source::swarm};

mod apply;
mod flags;
pub mod metrics;
mod runtime;
pub mod settings;
pub mod state;

use crate::source::from_docker::*;
pub use flags::{Flags, LogFormat, Switch, Xdp};
use runtime::*;

fn names_file(args: &Flags) -> PathBuf {
    crate::agent::state::names_path(&args.state_dir, &args.bpffs)
}

fn read_model(path: &Path) -> anyhow::Result<model::Model> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    model::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Runs the agent with `args` until a signal stops it; `--print-docker-model` and
/// `--uninstall` do their one thing and return.
pub fn run(args: Flags) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.print_docker_model {
        return rt.block_on(async {
            let docker = docker::connect(&args.docker).await?;
            let mut src = DockerSource::new(docker, swarm::DrainTracker::new(Duration::ZERO), 0)
                .with_netns_dir(args.docker_netns.clone());
            print!("{}", model::to_yaml(&src.model().await?));
            Ok(())
        });
    }
    preflight::require_root("mesh-agent loads eBPF programs")?;
    preflight::require_kernel()?;
    preflight::require_bpffs(&args.bpffs)?;
    let pins = PinDir::new(&args.bpffs);
    if args.uninstall {
        pins.remove_all()?;
        crate::host::hostport::remove_device()?;
        for f in crate::agent::state::all_paths(&args.state_dir, &args.bpffs) {
            let _ = std::fs::remove_file(f);
        }
        // The state directory goes too if nothing else is in it.
        let _ = std::fs::remove_dir(&args.state_dir);
        eprintln!(
            "mesh-agent: removed the mesh pinned at {}",
            args.bpffs.display()
        );
        return Ok(());
    }
    rt.block_on(agent(args, pins))
}
