//! The verifier, through the agent's own loader: `Datapath::load` with the default
//! config (so its feature probes and fallbacks apply) loads every program, and each
//! loaded program's instruction counts are printed for `cargo xtask kernels`' table.
//! Runs on the host and in every guest of the kernel matrix.
//!
//! Lines for the table (parsed by xtask/src/kernels.rs):
//! `verify: program NAME loaded verified_insns=N|- xlated_insns=N`,
//! `verify: program NAME refused REASON`, `verify: fallbacks LIST|none` (the loader's
//! feature probes: what this kernel lacks and the named fallback in force).

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use aya::{
    programs::{loaded_programs, Program, ProgramError, ProgramInfo},
    EbpfLoader,
};
use mesh_agent::{
    datapath::features::{Features, TcAttach},
    datapath::loader::Datapath,
    MeshError,
};
use mesh_common::config::{programs, MeshConfig, CONFIG_GLOBAL};
use mesh_tests::prereq;

/// Every program of the object, in the table's order.
const PROGRAMS: [&str; 9] = [
    programs::XDP_UNDERLAY,
    programs::TC_UNDERLAY_INGRESS,
    programs::TC_TASK,
    programs::TC_OVERLAY_IN,
    programs::TC_OVERLAY_OUT,
    programs::SOCK_CONNECT4,
    programs::SOCK_SENDMSG4,
    programs::SOCK_RECVMSG4,
    programs::SOCK_GETPEERNAME4,
];

#[test]
fn every_program_loads_through_the_agent_loader() {
    let Some(object) = prereq::privileged("every_program_loads_through_the_agent_loader") else {
        return;
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("verify: kernel {}", release.trim());
    match Datapath::load(&object, &MeshConfig::DEFAULT) {
        Ok(dp) => {
            for name in PROGRAMS {
                let info = info(&dp, name)
                    .unwrap_or_else(|e| panic!("{name}: no info from the loaded program: {e}"));
                print_loaded(name, &info);
            }
            print_fallbacks(dp.features());
            println!("verify: PASS all {} programs loaded", PROGRAMS.len());
        }
        Err(e) => {
            // What the loader's probes chose, although the load failed.
            let flags = match Features::detect(TcAttach::Auto) {
                Ok(f) => {
                    print_fallbacks(&f);
                    f.flags()
                }
                Err(e) => {
                    println!("verify: feature probes failed: {e}");
                    MeshConfig::DEFAULT.flags
                }
            };
            println!("verify: loader refused: {}", summary(&e));
            if let MeshError::Program {
                source: ProgramError::LoadError { verifier_log, .. },
                ..
            } = &e
            {
                print_tail(&verifier_log.to_string());
            }
            // The loader stops at its first refusal: load each program alone, outside
            // the loader (with the probes' flags, as the loader does), to show every
            // program's verdict.
            println!("verify: each program alone (diagnostic, outside the loader):");
            for (name, verdict) in each_alone(&object, flags) {
                match verdict {
                    Ok(info) => print_loaded(&name, &info),
                    Err(why) => println!("verify: program {name} refused {why}"),
                }
            }
            panic!("the agent's loader refused the object: {}", summary(&e));
        }
    }
}

/// What the loader's probes found missing here, and what stands in for it.
fn print_fallbacks(features: &Features) {
    let fallbacks = features.fallbacks();
    for f in &fallbacks {
        println!("verify: fallback {f}");
    }
    let names: Vec<String> = fallbacks
        .iter()
        .map(|f| format!("{} (no {})", f.name, f.feature))
        .collect();
    println!(
        "verify: fallbacks {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    );
}

fn print_loaded(name: &str, info: &ProgramInfo) {
    // verified_insns is Linux 5.16+; older kernels report 0.
    let verified = info
        .verified_instruction_count()
        .map_or("-".to_string(), |n| n.to_string());
    let xlated = info.size_translated().unwrap_or(0) / 8;
    println!("verify: program {name} loaded verified_insns={verified} xlated_insns={xlated}");
}

/// The loaded program's info: the TC and XDP programs through the datapath's accessors,
/// the socket programs by their kernel name (the kernel keeps 15 bytes of a name, which
/// tells these four apart but not the two overlay programs).
fn info(dp: &Datapath, name: &str) -> Result<ProgramInfo, String> {
    let by_accessor = match name {
        programs::XDP_UNDERLAY => Some(dp.xdp().map(|p| p.info())),
        programs::TC_UNDERLAY_INGRESS => Some(dp.tc_ingress().map(|p| p.info())),
        programs::TC_TASK => Some(dp.tc_task().map(|p| p.info())),
        programs::TC_OVERLAY_IN => Some(dp.tc_overlay_in().map(|p| p.info())),
        programs::TC_OVERLAY_OUT => Some(dp.tc_overlay_out().map(|p| p.info())),
        _ => None,
    };
    if let Some(r) = by_accessor {
        return r.map_err(|e| e.to_string())?.map_err(|e| e.to_string());
    }
    let short = &name[..name.len().min(15)];
    let mine: Vec<ProgramInfo> = loaded_programs()
        .filter_map(Result::ok)
        .filter(|i| i.name_as_str() == Some(short))
        .collect();
    // The newest one is ours (ids grow); a guest runs nothing else.
    mine.into_iter()
        .max_by_key(|i| i.id())
        .ok_or_else(|| format!("no loaded program named {short:?}"))
}

/// One line: the program and the kernel's answer, without the whole verifier log.
fn summary(e: &MeshError) -> String {
    match e {
        MeshError::Program {
            program,
            source:
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                },
        } => format!(
            "{program}: {io_error}: {}",
            telling_line(&verifier_log.to_string())
        ),
        other => other.to_string(),
    }
}

/// The verifier's reason for a refusal: its last line before the statistics it prints
/// at the end (verification time, stack depth, processed insns).
fn telling_line(log: &str) -> String {
    const STATS: [&str; 3] = ["verification time", "stack depth", "processed "];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
        .map_or("(empty verifier log)".to_string(), str::to_string)
}

fn print_tail(log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    println!("verify: last lines of the verifier log:");
    for l in &lines[lines.len().saturating_sub(20)..] {
        println!("    {l}");
    }
}

/// Loads each program of the object alone, with the default config and `flags` (the
/// features the loader would use): its verdict.
fn each_alone(object: &std::path::Path, flags: u32) -> Vec<(String, Result<ProgramInfo, String>)> {
    let cfg = MeshConfig {
        flags,
        ..MeshConfig::DEFAULT
    };
    let mut loader = EbpfLoader::new();
    loader.override_global(CONFIG_GLOBAL, &cfg, true);
    let mut ebpf = match loader.load_file(object) {
        Ok(e) => e,
        Err(e) => return vec![("(object)".into(), Err(e.to_string()))],
    };
    let mut out = Vec::new();
    for name in PROGRAMS {
        let r = match ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => p.load(),
            Some(Program::SchedClassifier(p)) => p.load(),
            Some(Program::CgroupSockAddr(p)) => p.load(),
            Some(_) => Err(ProgramError::UnexpectedProgramType),
            None => Err(ProgramError::NotLoaded),
        };
        let verdict = r.and_then(|()| ebpf.program(name).expect("loaded above").info());
        let verdict = verdict.map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                let log = verifier_log.to_string();
                println!("verify: {name} alone:");
                print_tail(&log);
                format!("{io_error}: {}", telling_line(&log))
            }
            other => other.to_string(),
        });
        out.push((name.to_string(), verdict));
    }
    out
}
