//! [`Case`]: one row of a fixture table: the maps to set, the packet and its hook, and
//! what must come of it (return code, output packet, counters).

use mesh_agent::model::Desired;
use mesh_common::{reason::Reason, stats::Hook};

use super::{hex, Fields, Ret};

/// One packet through one hook and what it must do. Built with [`Case::new`] and the
/// methods below; unless told otherwise the output must be the input untouched and no
/// counter may move.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    /// The maps' state set (as the agent sets it) before the packet is sent; `None`
    /// keeps what the cases before left, conntrack entries included.
    pub maps: Option<Desired>,
    pub hook: Hook,
    pub input: Vec<u8>,
    pub ret: Ret,
    pub out: Out,
    pub counters: Counters,
    /// The per-backend counters (`MESH_BESTATS_V1`) the packet adds to.
    pub backend: Option<Billed>,
}

/// What the program's output packet must be.
#[derive(Clone, Debug)]
pub enum Out {
    /// The input, untouched.
    Same,
    /// Exactly these bytes. Built independently (etherparse), so every length and
    /// checksum the datapath rewrote is checked too.
    Bytes(Vec<u8>),
    /// Exactly one of these, each the packet as it would go to one backend (address):
    /// which one a hash picks is the program's business; the runner says which it was.
    OneOf(Vec<([u8; 4], Vec<u8>)>),
    /// These fields hold.
    Fields(Fields),
    /// Anything (the program drops it, or a later check looks at it).
    Any,
}

/// Which (hook, reason) counters the packet must move.
#[derive(Clone, Debug)]
pub enum Counters {
    /// Exactly these cells at the case's hook, each by one packet of the input's size;
    /// no other cell of any hook.
    Exact(Vec<Reason>),
    /// Exactly these cells at the case's hook, by any amount.
    Cells(Vec<Reason>),
}

/// One packet of the case's input size, and a flow when it opens one, for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Billed {
    /// `None`: the backend the case's [`Out::OneOf`] matched.
    pub backend: Option<[u8; 4]>,
    pub new_flow: bool,
}

impl Case {
    pub fn new(name: impl Into<String>, hook: Hook, input: impl Into<Vec<u8>>, ret: Ret) -> Case {
        Case {
            name: name.into(),
            maps: None,
            hook,
            input: input.into(),
            ret,
            out: Out::Same,
            counters: Counters::Exact(Vec::new()),
            backend: None,
        }
    }

    /// Sets the maps to `d` before the packet.
    pub fn maps(mut self, d: Desired) -> Case {
        self.maps = Some(d);
        self
    }

    /// The output must be exactly `p`.
    pub fn out(mut self, p: impl Into<Vec<u8>>) -> Case {
        self.out = Out::Bytes(p.into());
        self
    }

    /// The output must be exactly one of `alternatives`, each named by its backend.
    pub fn out_one_of<P: Into<Vec<u8>>>(
        mut self,
        alternatives: impl IntoIterator<Item = ([u8; 4], P)>,
    ) -> Case {
        let alts = alternatives.into_iter().map(|(b, p)| (b, p.into()));
        self.out = Out::OneOf(alts.collect());
        self
    }

    /// The output must carry `f`.
    pub fn out_fields(mut self, f: Fields) -> Case {
        self.out = Out::Fields(f);
        self
    }

    /// The output is not checked.
    pub fn out_any(mut self) -> Case {
        self.out = Out::Any;
        self
    }

    /// These counters move by one packet of the input's size, and no other.
    pub fn counts(mut self, reasons: &[Reason]) -> Case {
        self.counters = Counters::Exact(reasons.to_vec());
        self
    }

    /// These counters move, by any amount, and no other.
    pub fn cells(mut self, reasons: &[Reason]) -> Case {
        self.counters = Counters::Cells(reasons.to_vec());
        self
    }

    /// The packet is counted for `backend`, and its flow too when `new_flow`.
    pub fn backend(mut self, backend: [u8; 4], new_flow: bool) -> Case {
        self.backend = Some(Billed {
            backend: Some(backend),
            new_flow,
        });
        self
    }

    /// As [`Case::backend`], for the backend [`Out::OneOf`] matched.
    pub fn picked_backend(mut self, new_flow: bool) -> Case {
        self.backend = Some(Billed {
            backend: None,
            new_flow,
        });
        self
    }

    /// Checks `out` against [`Case::out`]; the backend an [`Out::OneOf`] matched.
    pub(super) fn check_out(&self, out: &[u8]) -> Result<Option<[u8; 4]>, String> {
        let differs = |want: &[u8]| {
            let at = out.iter().zip(want).position(|(a, b)| a != b);
            let at = at.unwrap_or(out.len().min(want.len()));
            format!(
                "output differs from byte {at} ({} bytes, want {}):\n   got  {}\n   want {}",
                out.len(),
                want.len(),
                hex(out),
                hex(want)
            )
        };
        match &self.out {
            Out::Same if out != self.input => Err(differs(&self.input)),
            Out::Bytes(want) if out != want => Err(differs(want)),
            Out::OneOf(alts) => match alts.iter().find(|(_, p)| p == out) {
                Some((backend, _)) => Ok(Some(*backend)),
                None => Err(format!(
                    "output is none of the {} alternatives:\n   got  {}\n{}",
                    alts.len(),
                    hex(out),
                    alts.iter()
                        .map(|(b, p)| format!("   {b:?}: {}", hex(p)))
                        .collect::<Vec<_>>()
                        .join("\n")
                )),
            },
            Out::Fields(f) => {
                let errs = f.check(out);
                if errs.is_empty() {
                    Ok(None)
                } else {
                    Err(format!("output fields: {}: {}", errs.join("; "), hex(out)))
                }
            }
            Out::Same | Out::Bytes(_) | Out::Any => Ok(None),
        }
    }
}
