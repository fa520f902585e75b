//! `mesh-bench [--quick] --out DIR`: what `cargo xtask bench` runs (as root, with the
//! eBPF object in `MESH_BPF_OBJECT`); writes DIR/report.md and the plots.

use std::path::PathBuf;

fn main() {
    let mut quick = false;
    let mut probe = false;
    let mut control_only = false;
    let mut out = None;
    let mut large = 10_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--probe" => probe = true,
            "--control-plane" => control_only = true,
            "--out" => out = args.next().map(PathBuf::from),
            "--services" => large = args.next().and_then(|v| v.parse().ok()).unwrap_or(large),
            other => {
                eprintln!("mesh-bench: unknown argument {other} (usage: mesh-bench [--quick] [--services N] [--control-plane] [--probe] --out DIR)");
                std::process::exit(2);
            }
        }
    }
    let Some(out) = out else {
        eprintln!("mesh-bench: --out DIR is required");
        std::process::exit(2);
    };
    let Some(object) = std::env::var_os("MESH_BPF_OBJECT").map(PathBuf::from) else {
        eprintln!("mesh-bench: set MESH_BPF_OBJECT to the eBPF object (cargo xtask bench does)");
        std::process::exit(2);
    };
    mesh_tests::netns::sweep_stale();
    let o = mesh_tests::bench::Opts {
        quick,
        object,
        out,
        large,
        control_only,
    };
    if probe {
        if let Err(e) = mesh_tests::bench::probe(&o) {
            eprintln!("mesh-bench: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    match mesh_tests::bench::run(&o) {
        Ok(report) => println!("bench: report in {}", report.display()),
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            std::process::exit(1);
        }
    }
}
