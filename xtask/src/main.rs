//! `cargo xtask`: setup, build and test for the mesh. Everything a fresh machine needs
//! goes through here, so README's commands are the whole story.

mod bench;
mod build;
mod cluster;
mod cmd;
mod demo;
mod image;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set up and test the mesh")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, bpf-linker) and mount bpffs. Root only.
    Setup,
    /// Build the eBPF object (Debian's rustc for bpfel) and the user side, in release.
    Build,
    /// Set up, build, then run the three test tiers.
    Test,
    /// A local multi-node Docker Swarm in network namespaces, to try the mesh on.
    #[command(subcommand)]
    Cluster(cluster::Cluster),
    /// A local 3-node swarm with the mesh deployed as a global service and a demo web
    /// service, checked from a client: every node answers, from tasks on every node,
    /// which see the client's address. Leaves the cluster up (`cluster down` after).
    Demo,
    /// The benchmark: the mesh beside direct, iptables, nftables and HAProxy (report and
    /// plots under bench/results/).
    Bench(bench::Bench),
    /// The agent's image `mesh/agent:latest` from the release build, by `docker import`.
    Image(image::Image),
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => build::run(),
        Cmd::Test => test::run(),
        Cmd::Cluster(c) => cluster::run(c),
        Cmd::Image(i) => image::run(i),
        Cmd::Demo => demo::run(),
        Cmd::Bench(b) => bench::run(b),
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
