//! /proc readers: which sockets hold a UDP port, and which processes hold a socket.

/// Sockets in `/proc/net/udp` (or `udp6`) text bound to local `port`, by inode.
pub fn udp_port_holders(proc_net_udp: &str, port: u16) -> Vec<u64> {
    proc_net_udp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            (local_port == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// The processes (pid, command) holding the socket of inode `inode`: none for the
/// kernel's own sockets, such as a vxlan device's (Docker's overlays).
pub fn socket_owners(inode: u64) -> Vec<(u32, String)> {
    let target = format!("socket:[{inode}]");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push((pid, comm.trim().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod proc_tests {
    use super::*;

    #[test]
    fn udp_holders_by_port_and_inode() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  12: 00000000:12B5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0
  13: 00000000:12B5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 91234 2 0000000000000000 0
  14: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 555 2 0000000000000000 0
";
        assert_eq!(udp_port_holders(t, 4789), vec![91234]);
        assert_eq!(udp_port_holders(t, 53), vec![555]);
        assert!(udp_port_holders(t, 4790).is_empty());
    }
}
