//! The tier-2 fixture runner, in the shape of Katran's and Cilium's BPF tests: a table of
//! [`Case`]s run in order through BPF_PROG_TEST_RUN against one loaded datapath. A case
//! may first set the maps (a model's [`Desired`] state, applied as the agent applies it);
//! its packet then goes through its hook, and the runner checks the return code, the
//! output packet and the exact counter deltas it caused. Conntrack entries stay from one
//! case to the next, so a table can be a conversation: a SYN, its reply, the data.

mod case;
mod fields;

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context;
use aya::programs::{TestRun, TestRunOptions};
use mesh_agent::{
    datapath::loader::Datapath, datapath::mesh::Mesh, datapath::stats::Snapshot, model::Desired,
};
use mesh_common::{
    config::MeshConfig,
    stats::{BackendCounter, Counter, Hook},
};

pub use case::{Billed, Case, Counters, Out};
pub use fields::Fields;

/// A program's return code, by its kernel name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// TC_ACT_OK: the packet goes on as rewritten.
    TcOk,
    /// TC_ACT_UNSPEC: not the mesh's; the kernel goes on as if no program ran.
    TcUnspec,
    /// TC_ACT_SHOT: dropped.
    TcShot,
    /// TC_ACT_REDIRECT: sent out of another interface (the test runner does not move it).
    TcRedirect,
    XdpDrop,
    XdpPass,
    XdpRedirect,
}

impl Ret {
    pub const fn code(self) -> u32 {
        match self {
            Ret::TcOk => 0,
            Ret::TcUnspec => -1i32 as u32,
            Ret::TcShot => 2,
            Ret::TcRedirect => 7,
            Ret::XdpDrop => 1,
            Ret::XdpPass => 2,
            Ret::XdpRedirect => 4,
        }
    }

    const fn xdp(self) -> bool {
        matches!(self, Ret::XdpDrop | Ret::XdpPass | Ret::XdpRedirect)
    }

    /// `code` as `hook`'s program means it (its number when it has no name here).
    pub fn describe(hook: Hook, code: u32) -> String {
        const ALL: [Ret; 7] = [
            Ret::TcOk,
            Ret::TcUnspec,
            Ret::TcShot,
            Ret::TcRedirect,
            Ret::XdpDrop,
            Ret::XdpPass,
            Ret::XdpRedirect,
        ];
        let xdp = hook == Hook::XdpUnderlay;
        match ALL.iter().find(|v| v.xdp() == xdp && v.code() == code) {
            Some(v) => format!("{v:?}"),
            None => format!("{}", code as i32),
        }
    }
}

/// What one BPF_PROG_TEST_RUN gave back.
#[derive(Clone, Debug)]
pub struct Returned {
    pub ret: u32,
    pub out: Vec<u8>,
    /// The kernel's own timing, per run.
    pub duration: Duration,
}

/// Runs `hook`'s program on `input`, `repeat` times (the output is the last run's).
pub fn test_run(dp: &Datapath, hook: Hook, input: &[u8], repeat: u32) -> anyhow::Result<Returned> {
    // Room for what a program adds: an answer longer than the question, XDP metadata.
    let mut out = vec![0u8; input.len() + 512];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let ran = match hook {
        Hook::XdpUnderlay => dp.xdp()?.test_run(opts),
        Hook::TcUnderlayIngress => dp.tc_ingress()?.test_run(opts),
        Hook::TcTask => dp.tc_task()?.test_run(opts),
        Hook::TcOverlayIn => dp.tc_overlay_in()?.test_run(opts),
        Hook::TcOverlayOut => dp.tc_overlay_out()?.test_run(opts),
        Hook::Sock => anyhow::bail!("{} has no packet program", hook.name()),
    }
    .with_context(|| format!("BPF_PROG_TEST_RUN on {}", hook.name()))?;
    out.truncate(ran.data_size_out as usize);
    Ok(Returned {
        ret: ran.return_value,
        out,
        duration: ran.duration,
    })
}

/// What a case's packet came out as.
#[derive(Clone, Debug)]
pub struct Ran {
    pub out: Vec<u8>,
    /// The backend an [`Out::OneOf`] matched.
    pub picked: Option<[u8; 4]>,
}

/// A loaded datapath and the agent's view of its maps, through which tables run.
pub struct Runner {
    pub mesh: Mesh,
    /// Cases run so far.
    pub runs: usize,
    /// Per-backend counters the cases run so far said they add to, by backend address.
    billed: BTreeMap<[u8; 4], BackendCounter>,
}

impl Runner {
    /// Loads the datapath from `object` with `cfg`, its maps empty.
    pub fn load(object: &Path, cfg: &MeshConfig) -> Runner {
        let dp = Datapath::load(object, cfg).expect("load the datapath");
        Runner {
            mesh: Mesh::new(dp),
            runs: 0,
            billed: BTreeMap::new(),
        }
    }

    /// Sets the maps to `d`, as the agent does (conntrack entries are kept).
    pub fn apply(&mut self, d: &Desired) {
        self.mesh.apply_desired(d).expect("apply to the maps");
    }

    /// Every counter cell now.
    pub fn counters(&self) -> Snapshot {
        let stats = self.mesh.dp.stats().expect("the stats map");
        Snapshot::read(&stats).expect("read the counters")
    }

    /// Runs `cases` in order; panics at the first that does not do what it says.
    pub fn table(&mut self, cases: &[Case]) -> Vec<Ran> {
        cases.iter().map(|c| self.run(c)).collect()
    }

    /// Runs one case; panics, naming every mismatch, unless it does what it says.
    pub fn run(&mut self, case: &Case) -> Ran {
        if let Some(d) = &case.maps {
            self.apply(d);
        }
        assert_eq!(
            case.ret.xdp(),
            case.hook == Hook::XdpUnderlay,
            "{}: return code {:?} is not one of {}'s",
            case.name,
            case.ret,
            case.hook.name()
        );
        self.runs += 1;
        let before = self.counters();
        let run = test_run(&self.mesh.dp, case.hook, &case.input, 1)
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let delta = self.counters().since(&before);

        let mut errs = Vec::new();
        if run.ret != case.ret.code() {
            errs.push(format!(
                "returned {} (want {:?})",
                Ret::describe(case.hook, run.ret),
                case.ret
            ));
        }
        let picked = case.check_out(&run.out).unwrap_or_else(|e| {
            errs.push(e);
            None
        });
        let want = expected_delta(case, &delta);
        if delta != want {
            errs.push(format!(
                "counters moved [{}], want [{}]",
                show(&delta),
                show(&want)
            ));
        }
        if let Some(b) = case.backend {
            match b.backend.or(picked) {
                Some(addr) => {
                    let c = self.billed.entry(addr).or_default();
                    c.packets += 1;
                    c.bytes += case.input.len() as u64;
                    c.flows += b.new_flow as u64;
                }
                None => errs.push("billed to the backend picked, but none was".into()),
            }
        }
        assert!(
            errs.is_empty(),
            "case \"{}\" [{}]:\n - {}",
            case.name,
            case.hook.name(),
            errs.join("\n - ")
        );
        Ran {
            out: run.out,
            picked,
        }
    }

    /// The per-backend counters of `group`'s backends (all `count` of them) are exactly
    /// what the cases run so far said they add to.
    pub fn check_backends(&self, group: &str, count: usize) {
        let stats = self
            .mesh
            .dp
            .backend_stats()
            .expect("the per-backend counters");
        let mut checked = 0;
        for (id, (g, addr, _)) in self.mesh.backend_names() {
            if g != group {
                continue;
            }
            checked += 1;
            let want = self.billed.get(&addr.octets()).copied().unwrap_or_default();
            let got = stats.get(&id).copied().unwrap_or_default();
            assert_eq!(
                (got.packets, got.bytes, got.flows),
                (want.packets, want.bytes, want.flows),
                "backend {addr} of {group}: (packets, bytes, flows)"
            );
        }
        assert_eq!(checked, count, "backends of {group} checked");
    }
}

/// The deltas `case` says its packet causes; for [`Counters::Cells`], with the amounts
/// that `got` shows (only which cells moved is checked).
fn expected_delta(case: &Case, got: &Snapshot) -> Snapshot {
    let mut want = Snapshot::default();
    let (reasons, exact) = match &case.counters {
        Counters::Exact(r) => (r, true),
        Counters::Cells(r) => (r, false),
    };
    for r in reasons {
        let key = (case.hook as u32, *r as u32);
        let cell = if exact {
            Counter {
                packets: 1,
                bytes: case.input.len() as u64,
            }
        } else {
            got.cells.get(&key).copied().unwrap_or_default()
        };
        want.cells.insert(key, cell);
    }
    want
}

fn show(s: &Snapshot) -> String {
    s.iter()
        .map(|(h, r, c)| format!("{}/{}={}p/{}B", h.name(), r.name(), c.packets, c.bytes))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes as spaced hex, for messages.
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
