//! `cargo xtask stack [OBJECT]`: the flags, the report printed, the exit status.

use std::path::PathBuf;

use anyhow::bail;

use super::{report, MIN_HEADROOM};
use crate::build;

#[derive(clap::Args)]
pub struct Stack {
    /// The eBPF object (default: target/release/mesh.bpf.o, from `cargo xtask build`).
    object: Option<PathBuf>,
    /// Bytes each program's deepest chain must leave free of the 512, by the 6.1 rule.
    #[arg(long, default_value_t = MIN_HEADROOM)]
    min_headroom: u32,
    /// Also list every function of every program: depth, instructions, callees (in the
    /// order of the verifier's `stack depth a+b+c` line under libbpf).
    #[arg(long)]
    functions: bool,
}

pub fn run(a: Stack) -> anyhow::Result<()> {
    let obj = a.object.unwrap_or_else(build::object_path);
    if !obj.exists() {
        bail!(
            "{} does not exist: `cargo xtask build` makes it",
            obj.display()
        );
    }
    let r = report(&obj)?;
    for line in r.lines(a.min_headroom) {
        println!("{line}");
    }
    if a.functions {
        for p in &r.programs {
            println!(
                "stack: {} functions (stack depth {}):",
                p.name,
                p.functions
                    .iter()
                    .map(|f| f.depth.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            );
            for f in &p.functions {
                println!(
                    "stack:   {:>4} {:<32} {:>5} insns{}{}",
                    f.depth,
                    f.name,
                    f.insns,
                    if f.tail_call { ", tail call" } else { "" },
                    if f.calls.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", calls {}",
                            f.calls
                                .iter()
                                .map(|&c| p.functions[c].name.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        )
                    }
                );
            }
        }
    }
    let failures = r.failures(a.min_headroom);
    if !failures.is_empty() {
        bail!(
            "stack: {} program(s) without {} bytes of stack headroom: {}",
            failures.len(),
            a.min_headroom,
            failures.join("; ")
        );
    }
    Ok(())
}
