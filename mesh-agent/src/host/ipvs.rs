//! Docker's own mesh beside this one. Docker balances published ports and VIPs with IPVS
//! (in its `ingress_sbox` namespace and each network's load-balancer namespace), which
//! needs the `ip_vs` module; without it Docker's mesh silently does nothing. Where both
//! are active, the mesh's hooks run first on every path (TC on the underlay before
//! iptables and IPVS, the socket hook before Docker's OUTPUT DNAT, TC on a task's overlay
//! veth before the load-balancer namespace), so a port the mesh publishes is the mesh's
//! on every path and Docker's rules for it stay unused: never half of each.

use std::path::Path;

/// What this node shows of Docker's IPVS mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DockerMesh {
    /// The `ip_vs` module is loaded (or built in).
    pub ip_vs: bool,
    /// Docker's ingress namespace exists (`<netns dir>/ingress_sbox`).
    pub ingress_sbox: bool,
    /// IPVS virtual services in it (Docker programs one per published port's mark).
    pub ipvs_services: usize,
}

impl DockerMesh {
    /// Whether Docker's mesh is balancing anything here.
    pub fn active(&self) -> bool {
        self.ip_vs && self.ipvs_services > 0
    }
}

/// Looks: `/sys/module/ip_vs`, and `/proc/net/ip_vs` inside `<netns_dir>/ingress_sbox`.
pub fn detect(sys: &Path, netns_dir: &Path) -> DockerMesh {
    let ip_vs = sys.join("module/ip_vs").exists();
    let sbox = netns_dir.join("ingress_sbox");
    let ingress_sbox = sbox.exists();
    let ipvs_services = if ip_vs && ingress_sbox {
        crate::host::netdev::in_netns(&sbox, || {
            Ok(std::fs::read_to_string("/proc/thread-self/net/ip_vs").unwrap_or_default())
        })
        .map(|t| virtual_services(&t))
        .unwrap_or(0)
    } else {
        0
    };
    DockerMesh {
        ip_vs,
        ingress_sbox,
        ipvs_services,
    }
}

/// Virtual services in the text of `/proc/net/ip_vs` (lines starting with the service's
/// protocol; real servers are indented under them).
pub fn virtual_services(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            ["TCP ", "UDP ", "FWM ", "SCTP "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .count()
}

/// Who owns what, for `meshctl doctor` and the agent's start: (ok, one line). `ports`:
/// the published ports the mesh holds ("8080/tcp"), `vips` its VIPs.
pub fn ownership(d: &DockerMesh, ports: &[String], vips: &[String]) -> (bool, String) {
    let ours = |what: &str, v: &[String]| {
        if v.is_empty() {
            format!("no {what}")
        } else {
            format!("{what} {}", v.join(" "))
        }
    };
    let held = format!("{}; {}", ours("ports", ports), ours("VIPs", vips));
    if d.active() {
        (
            false,
            format!(
                "Docker's IPVS mesh is also active ({} IPVS services in ingress_sbox): both have \
                 rules for the mesh's {held}; the mesh's hooks see that traffic first on every \
                 path, so Docker's rules stay unused. To keep Docker's mesh off: \
                 bootstrap-node.sh --keep-ipvs-off, then reboot",
                d.ipvs_services
            ),
        )
    } else {
        let why = if !d.ip_vs {
            "ip_vs is not loaded"
        } else if !d.ingress_sbox {
            "no ingress_sbox here"
        } else {
            "ingress_sbox has no IPVS services"
        };
        (
            true,
            format!("Docker's IPVS mesh is off ({why}): the mesh alone owns {held}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_IP_VS: &str = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
FWM  00000100 rr
  -> 0A000007:0000      Masq    1      0          0
FWM  00000101 rr
TCP  0A000002:0050 rr
";

    #[test]
    fn counts_virtual_services_not_real_servers() {
        assert_eq!(virtual_services(PROC_IP_VS), 3);
        assert_eq!(virtual_services(""), 0);
    }

    #[test]
    fn says_who_owns_what() {
        let ports = vec!["8080/tcp".to_string(), "5353/udp".to_string()];
        let off = DockerMesh::default();
        let (ok, line) = ownership(&off, &ports, &[]);
        assert!(ok);
        assert_eq!(
            line,
            "Docker's IPVS mesh is off (ip_vs is not loaded): the mesh alone owns ports \
             8080/tcp 5353/udp; no VIPs"
        );
        let idle = DockerMesh {
            ip_vs: true,
            ingress_sbox: true,
            ipvs_services: 0,
        };
        assert!(ownership(&idle, &ports, &[]).0);
        let on = DockerMesh {
            ipvs_services: 2,
            ..idle
        };
        let (ok, line) = ownership(&on, &ports, &["10.0.1.5".into()]);
        assert!(!ok);
        assert!(line.contains("also active (2 IPVS services"), "{line}");
        assert!(
            line.contains("ports 8080/tcp 5353/udp; VIPs 10.0.1.5"),
            "{line}"
        );
        assert!(line.contains("--keep-ipvs-off"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn nothing_on_a_machine_without_the_paths() {
        let d = detect(
            Path::new("/nonexistent-sys"),
            Path::new("/nonexistent-netns"),
        );
        assert_eq!(d, DockerMesh::default());
        assert!(!d.active());
    }
}
