//! `cargo xtask`: setup, build and test for the mesh. Everything a fresh machine needs
//! goes through here, so README's commands are the whole story.

mod apt;
mod bench;
mod build;
mod cluster;
mod cmd;
mod demo;
mod engines;
mod fresh;
mod fuzz;
mod image;
mod kernels;
mod setup;
mod stack;
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
    /// Per program of the eBPF object, the deepest BPF-to-BPF call chain and its stack as
    /// each kernel rounds it (static analysis); fails below the headroom.
    Stack(stack::Stack),
    /// Debian's 5.10, 6.1 and 6.12 kernels under qemu: every program through the loader,
    /// tier 2 and a tier-3 subset inside each guest; a table per kernel.
    Kernels(kernels::Kernels),
    /// README's setup and build on a fresh Debian 12 root (debootstrap, rustup bound in).
    FreshRoot(fresh::FreshRoot),
    /// Coverage-guided fuzzing (libFuzzer, cargo-fuzz) of the packet parser, the peer
    /// report decoder and the model file; fails on a finding, keeping its input.
    Fuzz(fuzz::Fuzz),
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => build::run(),
        Cmd::Test => test::run(),
        Cmd::Cluster(c) => cluster::run(c),
        Cmd::Image(i) => image::run(i),
        Cmd::Stack(s) => stack::run(s),
        Cmd::Kernels(k) => kernels::run(k),
        Cmd::Demo => demo::run(),
        Cmd::Bench(b) => bench::run(b),
        Cmd::FreshRoot(f) => fresh::run(f),
        Cmd::Fuzz(f) => fuzz::run(f),
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
