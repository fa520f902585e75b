//! `meshctl trace`: a synthetic packet through the program the agent attached, with
//! BPF_PROG_TEST_RUN (nothing on the wire), and what it did with it. The packet is
//! built and the result read here (pure, unit-tested); the kernel part finds the
//! program behind a pinned link and runs it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    path::Path,
};

use mesh_common::{
    csum,
    parse::{self, Bytes},
    proto::{IPPROTO_TCP, IPPROTO_UDP},
};
use serde::Serialize;

use crate::MeshError;

/// A client's first packet: a TCP SYN, or a UDP datagram, in an Ethernet frame from
/// `src_mac` to `dst_mac`.
pub fn first_packet(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    from: SocketAddrV4,
    to: SocketAddrV4,
    proto: u8,
) -> Vec<u8> {
    let l4_len: usize = if proto == IPPROTO_TCP { 20 } else { 8 + 4 };
    let total = 20 + l4_len;
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&from.ip().octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    let c = csum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&from.port().to_be_bytes());
    l4[2..4].copy_from_slice(&to.port().to_be_bytes());
    let csum_at = if proto == IPPROTO_TCP {
        l4[4..8].copy_from_slice(&1u32.to_be_bytes()); // sequence
        l4[12] = 5 << 4;
        l4[13] = 0x02; // SYN
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        16
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l4[8..12].copy_from_slice(b"mesh");
        6
    };
    let pseudo = csum::ipv4_pseudo_sum(from.ip().octets(), to.ip().octets(), proto, l4_len as u16);
    let mut c = !csum::fold(csum::sum(&l4, pseudo));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&l4);
    f
}

/// The headers of a packet as the program left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Headers {
    pub src: String,
    pub dst: String,
    pub proto: &'static str,
    /// TCP flags (syn, rst, ack), or "" for UDP.
    pub flags: String,
}

/// What came out: the packet's headers, and the VXLAN tunnel around it if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Output {
    pub headers: Option<Headers>,
    /// Outer source, destination, UDP source port and VNI of the encapsulation.
    pub vxlan: Option<Vxlan>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vxlan {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub udp_src_port: u16,
    pub udp_dst_port: u16,
    pub vni: u32,
}

fn headers_of(p: &parse::Parsed) -> Option<Headers> {
    if p.ip_version != 4 || p.l4_off == 0 {
        return None;
    }
    let ip = |a: u32| Ipv4Addr::from(a.to_ne_bytes());
    let flags = if p.l4_proto == IPPROTO_TCP {
        let mut f = Vec::new();
        for (bit, name) in [(0x02, "syn"), (0x10, "ack"), (0x04, "rst"), (0x01, "fin")] {
            if p.tcp_flags & bit != 0 {
                f.push(name);
            }
        }
        f.join(",")
    } else {
        String::new()
    };
    Some(Headers {
        src: format!("{}:{}", ip(p.saddr[0]), p.sport),
        dst: format!("{}:{}", ip(p.daddr[0]), p.dport),
        proto: match p.l4_proto {
            IPPROTO_TCP => "tcp",
            IPPROTO_UDP => "udp",
            _ => "other",
        },
        flags,
    })
}

/// Reads the frame the program left (`vxlan_port`: the data-path port).
pub fn read_output(frame: &[u8], vxlan_port: u16) -> Output {
    let Ok(outer) = parse::parse(&Bytes(frame), vxlan_port) else {
        return Output {
            headers: None,
            vxlan: None,
        };
    };
    if outer.vxlan {
        let inner = frame
            .get(outer.inner_off as usize..)
            .and_then(|b| parse::parse(&Bytes(b), vxlan_port).ok());
        return Output {
            headers: inner.as_ref().and_then(headers_of),
            vxlan: Some(Vxlan {
                outer_src: Ipv4Addr::from(outer.saddr[0].to_ne_bytes()),
                outer_dst: Ipv4Addr::from(outer.daddr[0].to_ne_bytes()),
                udp_src_port: outer.sport,
                udp_dst_port: outer.dport,
                vni: outer.vni,
            }),
        };
    }
    Output {
        headers: headers_of(&outer),
        vxlan: None,
    }
}

/// The program attached through the pinned link or netlink filter `pin`.
pub fn program_of(pin: &crate::datapath::pins::LinkPin) -> Result<OwnedFd, MeshError> {
    let prog_id = pin.program_id()?.ok_or_else(|| {
        trace_err(format!(
            "{} is recorded on ifindex {} but its tc filter is gone (meshctl doctor --fix)",
            pin.hook.program(),
            pin.ifindex
        ))
    })?;
    crate::datapath::sys::program_by_id(prog_id).map_err(|source| MeshError::Io {
        what: format!("opening program {prog_id} of {}", pin.path.display()),
        source,
    })
}

/// A TC return code in words.
pub fn verdict(retval: i32) -> &'static str {
    match retval {
        -1 => {
            "passed on (TCX_NEXT, or TC_ACT_UNSPEC for a netlink filter): not the mesh's, \
             the kernel's stack takes it"
        }
        0 => "passed (TC_ACT_OK), rewritten for the kernel to deliver",
        2 => "dropped (TC_ACT_SHOT)",
        7 => "redirected (TC_ACT_REDIRECT): handed to an interface",
        _ => "another TC action",
    }
}

/// The whole story of one traced packet (what `meshctl trace` prints).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub packet: serde_json::Value,
    pub program: serde_json::Value,
    pub verdict: &'static str,
    pub return_code: i32,
    /// How the frontend matched: this address, any node address, every port of a VIP.
    pub frontend: Option<&'static str>,
    pub service: Option<String>,
    /// The service's frontends, for the reader.
    pub frontends: Vec<String>,
    pub conntrack: &'static str,
    pub maglev: Option<serde_json::Value>,
    /// Why this backend, in words.
    pub why: String,
    pub backend: Option<crate::ctl::inspect::BackendView>,
    pub output: Output,
    pub conntrack_entries_removed: usize,
}

fn trace_err(what: impl Into<String>) -> MeshError {
    MeshError::Trace { what: what.into() }
}

/// Traces a client's first packet `from` -> `to` through this node's program for it (the
/// underlay's; a task's overlay veth's for a VIP on Docker's overlay), in the mesh pinned
/// at `bpffs` whose agent keeps its state in `state_dir`; the conntrack entries the run
/// makes are removed. The maps are read before the run to explain it: when the agent
/// rewrote the service's table in between (the program chose another backend than the
/// table read names), the trace is taken again, up to three times.
pub fn run(
    state_dir: &Path,
    bpffs: &Path,
    from: SocketAddrV4,
    to: SocketAddrV4,
    proto: crate::model::Protocol,
) -> Result<Report, MeshError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let (report, agrees) = run_once(state_dir, bpffs, from, to, proto)?;
        if agrees || tries == 3 {
            return Ok(report);
        }
    }
}

/// One trace: the report, and whether the program's choice is the one the maps read
/// before it name (`false`: they changed during the run).
fn run_once(
    state_dir: &Path,
    bpffs: &Path,
    from: SocketAddrV4,
    to: SocketAddrV4,
    proto: crate::model::Protocol,
) -> Result<(Report, bool), MeshError> {
    use crate::{ctl::inspect, datapath::pins::Hook, datapath::pins::PinDir, host::preflight};
    use mesh_common::{
        ct::{CtKey, CT_HAIRPIN},
        lb::{maglev_slot, FrontendKey},
    };
    let pins = PinDir::new(bpffs);
    if !pins.has_maps() {
        return Err(MeshError::NotPinned {
            path: bpffs.to_path_buf(),
        });
    }
    let proto_n = proto.number();
    let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    let snap = crate::datapath::maps::read_pinned(bpffs)?;
    let views = inspect::services_pinned(state_dir, bpffs)?;
    // A VIP on Docker's overlay is reached from a task through its overlay veth; anything
    // else arrives on the underlay.
    let vip = snap
        .frontends
        .get(&mesh_common::lb::any_port_vip(ne(*to.ip())))
        .copied();
    let (hook, program) = match vip {
        Some(_) => (Hook::TcOverlayIn, "mesh_tc_overlay_in"),
        None => (Hook::TcUnderlay, "mesh_tc_ingress"),
    };
    let link = pins
        .links()
        .into_iter()
        .find(|l| l.hook == hook && (l.netns == 0 || hook == Hook::TcOverlayIn))
        .ok_or_else(|| trace_err(format!("no {program} is attached here (meshctl status)")))?;
    let (ifname, macs) = if vip.is_some() {
        let task = mesh_common::lb::docker_mac(ne(*from.ip()));
        (
            "a task's overlay veth".to_string(),
            (task, mesh_common::arp::vip_mac(ne(*to.ip()))),
        )
    } else {
        let ifname = preflight::ifname(link.ifindex)
            .ok_or_else(|| trace_err("the underlay interface is gone"))?;
        let node_mac = crate::host::netdev::mac(&ifname)?;
        (ifname, ([0x02, 0, 0, 0, 0, 0x01], node_mac))
    };
    // What the maps say before the run: frontend, service, Maglev slot, backend.
    let exact = FrontendKey {
        addr: ne(*to.ip()),
        port: to.port().to_be(),
        proto: proto_n,
        _pad: 0,
    };
    let any = FrontendKey { addr: 0, ..exact };
    let (fe_kind, fe) = match (vip, snap.frontends.get(&exact)) {
        (Some(fe), _) => ("every port of the VIP", Some(fe)),
        (None, Some(fe)) => ("this address", Some(*fe)),
        (None, None) if snap.node_addrs.contains(&ne(*to.ip())) => {
            ("any node address", snap.frontends.get(&any).copied())
        }
        (None, None) => ("", None),
    };
    let service = fe.and_then(|fe| views.iter().find(|s| s.id == fe.svc_id));
    let key = CtKey::new(
        ne(*from.ip()),
        ne(*to.ip()),
        from.port().to_be(),
        to.port().to_be(),
        proto_n,
    );
    let before: std::collections::HashMap<CtKey, mesh_common::ct::CtEntry> =
        crate::datapath::conntrack::read_conntrack(bpffs)?
            .into_iter()
            .collect();
    let tracked = before.get(&key).copied();
    let maglev = fe.and_then(|fe| {
        let svc = snap.services.get(&fe.svc_id)?;
        if svc.maglev_size == 0 {
            return None;
        }
        let slot = maglev_slot(svc, key.saddr, key.daddr, key.sport, key.dport, proto_n, 0);
        let id = snap.tables.get(&fe.svc_id)?.get(slot as usize).copied()?;
        Some((slot, svc.maglev_size, id))
    });
    let frame = first_packet(macs.0, macs.1, from, to, proto_n);
    let prog = program_of(&link)?;
    let (retval, out) = crate::datapath::sys::test_run(&prog, &frame)?;
    // Leave conntrack as it was: the entries the run created go; an entry it changed (a
    // real flow's, on the same tuple, or sharing the reply tuple) gets its old value back.
    // (Real traffic on those very tuples during the run itself can still be disturbed.)
    let mut removed = 0;
    // The backend the program gave a new flow (its conntrack entry says).
    let mut ran_backend = None;
    {
        use aya::maps::{HashMap, Map, MapData};
        let err = |source| MeshError::Map {
            map: mesh_common::maps::CONNTRACK.name,
            source,
        };
        let data = MapData::from_pin(bpffs.join(mesh_common::maps::CONNTRACK.name)).map_err(err)?;
        let mut ct: HashMap<MapData, CtKey, mesh_common::ct::CtEntry> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(err)?;
        if let Ok(e) = ct.get(&key, 0) {
            ran_backend = Some(e.backend_id);
            let client = if e.flags & CT_HAIRPIN != 0 {
                e.hairpin_addr
            } else {
                key.saddr
            };
            let rev = CtKey::new(e.nat_addr, client, e.nat_port, key.sport, proto_n);
            for k in [key, rev] {
                match before.get(&k) {
                    Some(old) => ct.insert(k, old, 0).map_err(err)?,
                    None => {
                        if ct.remove(&k).is_ok() {
                            removed += 1;
                        }
                    }
                }
            }
        }
    }
    let port = crate::agent::state::agent_status(state_dir, bpffs)
        .map(|s| s.data_path_port)
        .filter(|p| *p != 0)
        .unwrap_or(mesh_common::proto::VXLAN_PORT_DEFAULT);
    let output = read_output(&out, port);
    let chosen =
        maglev.and_then(|(_, _, id)| service.and_then(|s| s.backends.iter().find(|b| b.id == id)));
    let tracked_backend = tracked
        .and_then(|e| service.and_then(|s| s.backends.iter().find(|b| b.id == e.backend_id)));
    let why = if let Some(e) = tracked {
        format!(
            "conntrack hit: an existing flow on this tuple keeps backend {}",
            e.backend_id
        )
    } else if let (Some((slot, size, _)), Some(b)) = (maglev, chosen) {
        format!(
            "new flow; Maglev slot {slot} of {size} names backend {} (only backends taking new \
             flows are in the table{})",
            b.id,
            if service.is_some_and(|s| s.affinity) {
                "; client-ip affinity hashes the client address alone"
            } else {
                ""
            }
        )
    } else if service.is_some() {
        "the service has no backend taking new flows: refused".to_string()
    } else {
        "no frontend: not the mesh's".to_string()
    };
    let agrees =
        tracked.is_some() || ran_backend.is_none() || maglev.map(|(_, _, id)| id) == ran_backend;
    let report = Report {
        packet: serde_json::json!({
            "from": from.to_string(), "to": to.to_string(),
            "proto": format!("{proto:?}").to_lowercase(),
        }),
        program: serde_json::json!({ "name": program, "interface": ifname }),
        verdict: verdict(retval),
        return_code: retval,
        frontend: fe.map(|_| fe_kind),
        service: service.map(|s| s.name.clone()),
        frontends: service
            .map(|s| s.frontends.iter().map(|f| f.to_string()).collect())
            .unwrap_or_default(),
        conntrack: if tracked.is_some() {
            "hit: an existing flow keeps its backend"
        } else {
            "new flow"
        },
        maglev: maglev.map(
            |(slot, size, id)| serde_json::json!({"slot": slot, "size": size, "backend_id": id}),
        ),
        why,
        backend: tracked_backend.or(chosen).cloned(),
        output,
        conntrack_entries_removed: removed,
    };
    Ok((report, agrees))
}

impl Report {
    /// The report as meshctl prints it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let p = &self.packet;
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        let _ = writeln!(
            o,
            "packet:   {} {} -> {}, a first packet (SYN for TCP)",
            s(&p["proto"]),
            s(&p["from"]),
            s(&p["to"])
        );
        let _ = writeln!(
            o,
            "program:  {} on {} (BPF_PROG_TEST_RUN; nothing sent)",
            s(&self.program["name"]),
            s(&self.program["interface"])
        );
        let _ = writeln!(o, "verdict:  {} [{}]", self.verdict, self.return_code);
        match (&self.frontend, &self.service) {
            (Some(kind), Some(svc)) => {
                let _ = writeln!(
                    o,
                    "frontend: {} matches service {svc} ({kind}; its frontends: {})",
                    s(&p["to"]),
                    self.frontends.join(", ")
                );
            }
            _ => {
                let _ = writeln!(o, "frontend: none for {}: not the mesh's", s(&p["to"]));
            }
        }
        let _ = writeln!(o, "why:      {}", self.why);
        if let Some(b) = &self.backend {
            let _ = writeln!(
                o,
                "backend:  {}{} {} ({}, {})",
                b.addr,
                b.port.map(|p| format!(":{p}")).unwrap_or_default(),
                b.task.as_deref().unwrap_or(""),
                b.state,
                b.at
            );
        }
        match &self.output.headers {
            Some(h) => {
                let _ = writeln!(
                    o,
                    "out:      {} {} -> {} {}",
                    h.proto, h.src, h.dst, h.flags
                );
            }
            None => {
                let _ = writeln!(o, "out:      (nothing readable)");
            }
        }
        if let Some(v) = &self.output.vxlan {
            let _ = writeln!(
                o,
                "vxlan:    {} -> {} udp {} -> {} vni {}",
                v.outer_src, v.outer_dst, v.udp_src_port, v.udp_dst_port, v.vni
            );
        }
        let _ = writeln!(
            o,
            "cleanup:  {} conntrack entries of the run removed",
            self.conntrack_entries_removed
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_packet_parses_as_what_it_claims() {
        let from: SocketAddrV4 = "10.9.0.1:40000".parse().unwrap();
        let to: SocketAddrV4 = "192.168.1.10:8080".parse().unwrap();
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let f = first_packet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], from, to, proto);
            let p = parse::parse(&Bytes(&f), 4789).expect("well-formed");
            assert_eq!((p.sport, p.dport, p.l4_proto), (40000, 8080, proto));
            let o = read_output(&f, 4789);
            assert_eq!(o.headers.as_ref().unwrap().src, "10.9.0.1:40000");
            assert_eq!(o.headers.as_ref().unwrap().dst, "192.168.1.10:8080");
            assert_eq!(o.vxlan, None);
            // The checksums hold: IPv4 header sums to zero, as does L4 with its pseudo
            // header.
            assert_eq!(csum::checksum(&f[14..34]), 0);
            let l4 = &f[34..];
            let pseudo =
                csum::ipv4_pseudo_sum(from.ip().octets(), to.ip().octets(), proto, l4.len() as u16);
            assert_eq!(csum::fold(csum::sum(l4, pseudo)), 0xffff);
        }
        let syn = read_output(&first_packet([0; 6], [0; 6], from, to, IPPROTO_TCP), 4789);
        assert_eq!(syn.headers.unwrap().flags, "syn");
    }
}
