//! TC programs as netlink clsact filters: how they are attached where the kernel has no
//! tcx links (before 6.6). A filter outlives the agent as a link pin does, but cannot be
//! pinned; instead each hook has a fixed priority and handle ([`crate::datapath::pins::Hook`]),
//! so that a restarted agent finds its predecessor's filter and replaces the program in
//! it in place: the kernel swaps the program of an existing cls_bpf filter atomically,
//! with no moment without one. Everything here acts in the calling thread's network
//! namespace. The messages are built here and sent through [`netdev::request`] /
//! [`netdev::get`]: rtnetlink's filter requests make u32 filters only, with no handle
//! and no way to add a bpf filter's options, and its qdisc request knows no clsact.

use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption},
    RouteNetlinkMessage,
};

use crate::{host::netdev, MeshError};

/// `ETH_P_ALL`: the filter sees every protocol.
const ETH_P_ALL: u16 = 0x0003;

/// One filter slot: interface, direction, priority and handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    pub ifindex: u32,
    pub egress: bool,
    pub priority: u16,
    pub handle: u32,
}

/// The program a filter runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    /// The name the filter was given (the program's).
    pub name: String,
}

impl Filter {
    fn message(&self) -> TcMessage {
        let mut parent = TcHandle::CLSACT;
        parent.minor = if self.egress {
            TcHandle::MIN_EGRESS
        } else {
            TcHandle::MIN_INGRESS
        };
        let header = TcHeader {
            index: self.ifindex as i32,
            handle: self.handle.into(),
            parent,
            // The priority above the protocol (network order), as tc(8) sends them.
            info: (u32::from(self.priority) << 16) | u32::from(ETH_P_ALL.to_be()),
            ..Default::default()
        };
        TcMessage::from_parts(header, vec![TcAttribute::Kind("bpf".into())])
    }

    fn what(&self, verb: &str) -> String {
        format!(
            "{verb} the tc filter (priority {}, handle {:#x}) at {} of ifindex {}",
            self.priority,
            self.handle,
            if self.egress { "egress" } else { "ingress" },
            self.ifindex
        )
    }

    /// Attaches `prog` (direct action, named `name`), adding the clsact qdisc first if
    /// the interface has none; where the filter exists (an earlier agent's), its program
    /// is replaced in place.
    pub fn attach(&self, prog: BorrowedFd<'_>, name: &str) -> Result<(), MeshError> {
        add_clsact(self.ifindex)?;
        let mut msg = self.message();
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_raw_fd() as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        // NLM_F_CREATE without NLM_F_EXCL: create, or change the filter that is there.
        netdev::request(
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE,
            self.what("attaching"),
        )
    }

    /// The program the filter runs, if the filter exists.
    pub fn program(&self) -> Result<Option<Attached>, MeshError> {
        let answer = match netdev::get(
            RouteNetlinkMessage::GetTrafficFilter(self.message()),
            self.what("reading"),
        ) {
            // No clsact qdisc: "parent Qdisc doesn't exist".
            Err(MeshError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(None)
            }
            r => r?,
        };
        let Some(RouteNetlinkMessage::NewTrafficFilter(m)) = answer else {
            return Ok(None);
        };
        let mut out = Attached {
            id: 0,
            name: String::new(),
        };
        for a in m.attributes {
            if let TcAttribute::Options(opts) = a {
                for o in opts {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => out.id = id,
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => out.name = n,
                        _ => {}
                    }
                }
            }
        }
        Ok(Some(out))
    }

    /// Removes the filter if it runs one of the mesh's programs (`ours`); a filter that
    /// is gone already (its interface with it) is fine.
    pub fn detach(&self, ours: &str) -> Result<(), MeshError> {
        match self.program()? {
            Some(a) if a.name == ours => {}
            _ => return Ok(()),
        }
        match netdev::request(
            RouteNetlinkMessage::DelTrafficFilter(self.message()),
            0,
            self.what("removing"),
        ) {
            Err(MeshError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL)
                ) =>
            {
                Ok(())
            }
            r => r,
        }
    }
}

/// Adds the clsact qdisc to the interface (the parent of ingress and egress filters);
/// one that is there already is left as it is.
pub fn add_clsact(ifindex: u32) -> Result<(), MeshError> {
    let header = TcHeader {
        index: ifindex as i32,
        handle: TcHandle {
            major: 0xffff,
            minor: 0,
        },
        parent: TcHandle::CLSACT,
        ..Default::default()
    };
    let msg = TcMessage::from_parts(header, vec![TcAttribute::Kind("clsact".into())]);
    match netdev::request(
        RouteNetlinkMessage::NewQueueDiscipline(msg),
        NLM_F_CREATE | NLM_F_EXCL,
        format!("adding the clsact qdisc to ifindex {ifindex}"),
    ) {
        Err(MeshError::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}
