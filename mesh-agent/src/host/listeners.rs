//! Ports a published service shares with a process on this node. The mesh's hooks take
//! a published port on every node address ahead of the node's stack, so a process that
//! already listens there (nginx on :80, a `docker run -p` container's docker-proxy)
//! silently gets nothing while the service publishes the port. Docker holds ingress
//! ports with listeners of its own (dockerd), and the host-mode ports the mesh serves
//! with docker-proxy: those are not in the way.
//! Read from `/proc/net/{tcp,udp}{,6}` of this network namespace; owners from
//! `/proc/<pid>/fd` where this PID namespace can see them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use crate::model::{Protocol, PublishMode};

/// The ports published on this node: (protocol, port) -> (service, mode).
pub type Published = BTreeMap<(Protocol, u16), (String, PublishMode)>;

/// A socket bound for listening (TCP LISTEN, or UDP bound and unconnected).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub protocol: Protocol,
    pub port: u16,
    pub inode: u64,
}

/// A published port that a process of this node also listens on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct PortInUse {
    pub port: u16,
    pub protocol: Protocol,
    /// The service that publishes it.
    pub service: String,
    /// "nginx (pid 812)".
    pub process: String,
}

impl std::fmt::Display for PortInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "port {}/{} of service {:?} is also listened on by {} on this node: the mesh \
             serves the service there and that process gets no new connection on the \
             node's addresses; move one of them",
            self.port,
            format!("{:?}", self.protocol).to_lowercase(),
            self.service,
            self.process
        )
    }
}

/// The listening sockets in one `/proc/net/{tcp,udp}[6]` table. Pure.
pub fn parse(table: &str, protocol: Protocol) -> Vec<Listener> {
    // TCP_LISTEN is 0A; an unconnected UDP socket shows TCP_CLOSE (07).
    let want = match protocol {
        Protocol::Tcp => "0A",
        Protocol::Udp => "07",
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            // Bound, not connected: the remote side is all zeroes.
            if *state != want || !remote.chars().all(|c| c == '0' || c == ':') {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            Some(Listener {
                protocol,
                port,
                inode: inode.parse().ok()?,
            })
        })
        .filter(|l| l.port != 0)
        .collect()
}

/// This network namespace's listeners, from `proc` (normally `/proc`).
pub fn listeners(proc: &Path) -> Vec<Listener> {
    let mut out = Vec::new();
    for (file, protocol) in [
        ("net/tcp", Protocol::Tcp),
        ("net/tcp6", Protocol::Tcp),
        ("net/udp", Protocol::Udp),
        ("net/udp6", Protocol::Udp),
    ] {
        if let Ok(t) = std::fs::read_to_string(proc.join(file)) {
            out.extend(parse(&t, protocol));
        }
    }
    out
}

/// Socket inode -> (pid, command name) for the `inodes` that visible processes hold.
pub fn owners(proc: &Path, inodes: &BTreeSet<u64>) -> BTreeMap<u64, (u32, String)> {
    let mut out = BTreeMap::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(dir) = std::fs::read_dir(proc) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if inodes.contains(&inode) && !out.contains_key(&inode) {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                out.insert(inode, (pid, comm.trim().to_string()));
            }
        }
    }
    out
}

/// Docker's own holders of a published port: dockerd reserves ingress ports, and
/// docker-proxy holds the host-mode ports of the tasks the mesh serves (on any other
/// port it stands for a `docker run -p` container, which the mesh would cut off).
fn docker_owned(comm: &str, mode: PublishMode) -> bool {
    comm == "dockerd" || (comm == "docker-proxy" && mode == PublishMode::Host)
}

/// The `published` ports ((protocol, port) -> service) that a process other than
/// Docker's listens on. A listener whose owner this PID namespace cannot see is left
/// out unless `unseen_counts` (it may be dockerd's own, which holds every ingress port).
pub fn in_use(
    published: &Published,
    listening: &[Listener],
    owners: &BTreeMap<u64, (u32, String)>,
    unseen_counts: bool,
) -> Vec<PortInUse> {
    // One report per port, naming every process on it (IPv4 and IPv6 listeners of one
    // program, or several programs).
    let mut by_port: BTreeMap<(Protocol, u16), (String, BTreeSet<String>)> = BTreeMap::new();
    for l in listening {
        let Some((service, mode)) = published.get(&(l.protocol, l.port)) else {
            continue;
        };
        let process = match owners.get(&l.inode) {
            Some((_, comm)) if docker_owned(comm, *mode) => continue,
            Some((pid, comm)) => format!("{comm} (pid {pid})"),
            None if unseen_counts => "a process this agent cannot see".to_string(),
            None => continue,
        };
        by_port
            .entry((l.protocol, l.port))
            .or_insert_with(|| (service.clone(), BTreeSet::new()))
            .1
            .insert(process);
    }
    by_port
        .into_iter()
        .map(|((protocol, port), (service, procs))| PortInUse {
            port,
            protocol,
            service,
            process: procs.into_iter().collect::<Vec<_>>().join(", "),
        })
        .collect()
}

/// The ports programmed on this node: `claims` (what the last apply programmed, see
/// [`crate::model::Desired::claims`]), with each one's mode from `model`.
pub fn published(model: &crate::model::Model, claims: &crate::model::Claims) -> Published {
    claims
        .iter()
        .map(|((port, protocol), name)| {
            let mode = model
                .services
                .iter()
                .filter(|s| &s.name == name)
                .flat_map(|s| &s.ports)
                .find(|p| p.published == Some(*port) && p.protocol == *protocol)
                .map_or(PublishMode::Ingress, |p| p.mode);
            let service = name.split('@').next().unwrap_or(name).to_string();
            ((*protocol, *port), (service, mode))
        })
        .collect()
}

/// What [`in_use`] finds in this namespace now, for `published`.
pub fn scan(proc: &Path, published: &Published) -> Vec<PortInUse> {
    let listening: Vec<Listener> = listeners(proc)
        .into_iter()
        .filter(|l| published.contains_key(&(l.protocol, l.port)))
        .collect();
    let inodes = listening.iter().map(|l| l.inode).collect();
    in_use(published, &listening, &owners(proc, &inodes), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1277 1 000000008aaa5de1 100 0 0 10 0
   1: 0100007F:8503 0100007F:9252 01 00000000:00000000 03:00001307 00000000     0        0 0 3 00000000daf49910
   2: 0B00FB0A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 000000008aaa5de1 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3001 2 0000000000000000 0
  101: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 3002 2 0000000000000000 0
";

    #[test]
    fn listeners_are_read_from_the_tables() {
        let t = parse(TCP, Protocol::Tcp);
        assert_eq!(
            t.iter().map(|l| (l.port, l.inode)).collect::<Vec<_>>(),
            vec![(8080, 1277), (80, 2001)],
            "LISTEN only, any local address"
        );
        let u = parse(UDP, Protocol::Udp);
        assert_eq!(
            u.iter().map(|l| (l.port, l.inode)).collect::<Vec<_>>(),
            vec![(5353, 3001)],
            "bound and unconnected only"
        );
    }

    #[test]
    fn docker_s_own_listeners_are_not_in_the_way() {
        let ingress = |s: &str| (s.to_string(), PublishMode::Ingress);
        let mut published = BTreeMap::from([
            ((Protocol::Tcp, 8080), ingress("web")),
            ((Protocol::Tcp, 80), ingress("front")),
            ((Protocol::Udp, 5353), ingress("dns")),
        ]);
        let mut l = parse(TCP, Protocol::Tcp);
        l.extend(parse(UDP, Protocol::Udp));
        let owners = BTreeMap::from([
            (1277, (40, "dockerd".to_string())),
            (2001, (812, "nginx".to_string())),
        ]);
        let found = in_use(&published, &l, &owners, false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].service, "front");
        assert_eq!(found[0].process, "nginx (pid 812)");
        assert!(found[0]
            .to_string()
            .contains("port 80/tcp of service \"front\""));
        // The UDP socket's owner is not visible: counted only when asked to.
        let all = in_use(&published, &l, &owners, true);
        assert_eq!(all.len(), 2, "{all:?}");
        // Two listeners of one port (IPv4 and IPv6): one report naming both.
        let mut twice = l.clone();
        twice.push(Listener {
            inode: 2002,
            ..l[1]
        });
        let owners2 = BTreeMap::from([
            (2001, (812, "nginx".to_string())),
            (2002, (813, "nginx".to_string())),
        ]);
        let found = in_use(&published, &twice, &owners2, false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].process, "nginx (pid 812), nginx (pid 813)");
        // docker-proxy: Docker's own for a host-mode port the mesh serves; for an
        // ingress port, a `docker run -p` container that the mesh cuts off.
        let owners = BTreeMap::from([(2001, (90, "docker-proxy".to_string()))]);
        assert_eq!(in_use(&published, &l, &owners, false).len(), 1);
        published.insert((Protocol::Tcp, 80), ("front".into(), PublishMode::Host));
        assert!(in_use(&published, &l, &owners, false).is_empty());
    }
}
