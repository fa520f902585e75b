//! The contenders, all in the node namespace of one [`LbTopo`], each with its own port
//! range on the node's address so that no flow of one ever meets another's state:
//! services `base+1 ..= base+N` (HTTP, 3 backends; the measured one is the last),
//! `base-1` (TCP throughput, 1 backend: iperf3's control and data connections must meet
//! one server) and `base-2`/udp (3 backends). All are installed for a scale at once and
//! switched on one at a time with an O(1) step (mesh: TC links attached; iptables: the
//! PREROUTING jump; nft: the prerouting rule; HAProxy: its process), so only the
//! measured contender sees the traffic.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use mesh_agent::{
    datapath::loader::Datapath,
    datapath::mesh::Mesh,
    model::{
        BackendSpec, EndpointSpec, Health, MacAddr, Model, PortSpec, Protocol, PublishMode,
        ServiceSpec,
    },
};
use mesh_common::config::MeshConfig;

use super::work::{HTTP_PORTS, IPERF_PORT, UDP_PORT};
use crate::{
    lbtopo::{task_mac, LbTopo, NODE, TASKS},
    measure::{spawn_in, Child},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Direct,
    Iptables,
    Nft,
    Haproxy,
    Mesh,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Iptables,
        Kind::Nft,
        Kind::Haproxy,
        Kind::Mesh,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Iptables => "iptables",
            Kind::Nft => "nftables",
            Kind::Haproxy => "haproxy",
            Kind::Mesh => "mesh (tc)",
        }
    }

    fn base(self) -> u16 {
        match self {
            Kind::Direct => 0,
            Kind::Mesh => 20000,
            Kind::Iptables => 30000,
            Kind::Nft => 40000,
            Kind::Haproxy => 50000,
        }
    }

    /// The tasks' HTTP port this contender's services deliver to.
    pub fn http_port(self) -> u16 {
        let i = Kind::ALL.iter().position(|k| *k == self).unwrap_or(0) as u16;
        HTTP_PORTS.start() + i
    }

    /// (address, port) of the measured HTTP service, TCP throughput and UDP services.
    pub fn targets(self, scale: u32) -> (String, u16, u16, u16) {
        match self {
            Kind::Direct => (
                TASKS[0].into(),
                Kind::Direct.http_port(),
                IPERF_PORT,
                UDP_PORT,
            ),
            k => (
                NODE.into(),
                k.base() + scale as u16,
                k.base() - 1,
                k.base() - 2,
            ),
        }
    }
}

/// kube-proxy's iptables layout for `scale` services (nat table, KUBE-SERVICES matched
/// in order; `statistic --mode random` picks the endpoint; one KUBE-SEP chain per task
/// port, shared by the services: the per-packet work is the same as one per service).
pub fn iptables_rules(scale: u32) -> String {
    let base = Kind::Iptables.base() as u32;
    let http = Kind::Iptables.http_port();
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let sep = |i: usize, port: u16| format!("KUBE-SEP-{i}-{port}");
    for port in [http, UDP_PORT, IPERF_PORT] {
        for i in 0..3 {
            r += &format!(":{} - [0:0]\n", sep(i, port));
        }
    }
    let svc_chain = |r: &mut String, name: &str, port: u16, n: usize, proto: &str| {
        *r += &format!(":{name} - [0:0]\n");
        for i in 0..n {
            let left = (n - i) as f64;
            if i + 1 < n {
                *r += &format!(
                    "-A {name} -m statistic --mode random --probability {:.5} -j {}\n",
                    1.0 / left,
                    sep(i, port)
                );
            } else {
                *r += &format!("-A {name} -j {}\n", sep(i, port));
            }
        }
        let _ = proto;
    };
    for s in 1..=scale {
        svc_chain(&mut r, &format!("KUBE-SVC-{s}"), http, 3, "tcp");
        r += &format!(
            "-A KUBE-SERVICES -d {NODE}/32 -p tcp --dport {} -j KUBE-SVC-{s}\n",
            base + s
        );
    }
    svc_chain(&mut r, "KUBE-SVC-IPERF", IPERF_PORT, 1, "tcp");
    r += &format!(
        "-A KUBE-SERVICES -d {NODE}/32 -p tcp --dport {} -j KUBE-SVC-IPERF\n",
        base - 1
    );
    svc_chain(&mut r, "KUBE-SVC-UDP", UDP_PORT, 3, "udp");
    r += &format!(
        "-A KUBE-SERVICES -d {NODE}/32 -p udp --dport {} -j KUBE-SVC-UDP\n",
        base - 2
    );
    for port in [http, UDP_PORT, IPERF_PORT] {
        let proto = if port == UDP_PORT { "udp" } else { "tcp" };
        for (i, t) in TASKS.iter().enumerate() {
            r += &format!(
                "-A {} -p {proto} -j DNAT --to-destination {t}:{port}\n",
                sep(i, port)
            );
        }
    }
    r + "COMMIT\n"
}

/// kube-proxy's nftables layout: one `daddr . l4proto . dport` verdict map, a chain per
/// service choosing with `numgen random`, endpoint chains that DNAT.
pub fn nft_rules(scale: u32) -> String {
    let base = Kind::Nft.base() as u32;
    let http = Kind::Nft.http_port();
    let mut r = String::from("table ip kp {\n");
    for port in [http, UDP_PORT, IPERF_PORT] {
        for (i, t) in TASKS.iter().enumerate() {
            r += &format!(
                "  chain ep_{i}_{port} {{ meta l4proto {{ tcp, udp }} dnat to {t}:{port}; }}\n"
            );
        }
    }
    let svc = |name: &str, port: u16, n: usize| {
        let v: Vec<String> = (0..n)
            .map(|i| format!("{i} : goto ep_{i}_{port}"))
            .collect();
        format!(
            "  chain {name} {{ numgen random mod {n} vmap {{ {} }}; }}\n",
            v.join(", ")
        )
    };
    let mut elems = Vec::new();
    for s in 1..=scale {
        r += &svc(&format!("svc_{s}"), http, 3);
        elems.push(format!("{NODE} . tcp . {} : goto svc_{s}", base + s));
    }
    r += &svc("svc_iperf", IPERF_PORT, 1);
    elems.push(format!("{NODE} . tcp . {} : goto svc_iperf", base - 1));
    r += &svc("svc_udp", UDP_PORT, 3);
    elems.push(format!("{NODE} . udp . {} : goto svc_udp", base - 2));
    r += "  map services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n";
    r += &elems
        .iter()
        .map(|e| format!("      {e}"))
        .collect::<Vec<_>>()
        .join(",\n");
    r += "\n    }\n  }\n";
    r += "  chain prerouting { type nat hook prerouting priority dstnat; }\n}\n";
    r
}

const NFT_JUMP: &str =
    "add rule ip kp prerouting ip daddr . meta l4proto . th dport vmap @services";

/// HAProxy in TCP mode: the HTTP service round-robin over the three tasks, the
/// throughput service to task 1.
pub fn haproxy_cfg() -> String {
    let (_, http, tput, _) = Kind::Haproxy.targets(1);
    let mut c = String::from(
        "global\n  maxconn 4000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    );
    c += &format!("listen web\n  bind {NODE}:{http}\n  balance roundrobin\n");
    for (i, t) in TASKS.iter().enumerate() {
        c += &format!("  server t{i} {t}:{}\n", Kind::Haproxy.http_port());
    }
    c += &format!(
        "listen tput\n  bind {NODE}:{tput}\n  server t0 {}:{IPERF_PORT}\n",
        TASKS[0]
    );
    c
}

/// The mesh's model for `scale` services (published ports on the node, as Docker's
/// ingress publishes them).
pub fn mesh_model(scale: u32, backends_per_service: usize) -> Model {
    let base = Kind::Mesh.base() as u32;
    let addrs: Vec<Ipv4Addr> = (0..backends_per_service.max(3))
        .map(|i| {
            if i < 3 {
                TASKS[i].parse().unwrap()
            } else {
                Ipv4Addr::new(10, 211, 1, i as u8)
            }
        })
        .collect();
    let be = |n: usize| -> Vec<BackendSpec> {
        addrs[..n]
            .iter()
            .map(|a| BackendSpec {
                addr: *a,
                state: Health::Active,
                node: None,
                network: None,
                task: None,
            })
            .collect()
    };
    let svc =
        |name: String, published: u32, target: u16, protocol: Protocol, n: usize| ServiceSpec {
            name,
            ports: vec![PortSpec {
                published: Some(published as u16),
                target,
                protocol,
                mode: PublishMode::Ingress,
            }],
            vips: vec![],
            backends: be(n),
            tcp_idle: None,
            udp_idle: None,
            affinity: false,
            every_port: false,
        };
    let mut services: Vec<ServiceSpec> = (1..=scale)
        .map(|s| {
            let http = Kind::Mesh.http_port();
            svc(
                format!("svc-{s}"),
                base + s,
                http,
                Protocol::Tcp,
                backends_per_service,
            )
        })
        .collect();
    services.push(svc("iperf".into(), base - 1, IPERF_PORT, Protocol::Tcp, 1));
    services.push(svc("udp".into(), base - 2, UDP_PORT, Protocol::Udp, 3));
    Model {
        underlay: Some("un".into()),
        node_addrs: vec![NODE.parse().unwrap()],
        services,
        // Extra backend addresses (memory figures) are delivered through task 1's veth.
        endpoints: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| EndpointSpec {
                addr: *a,
                interface: format!("h{}", i.min(2) + 1),
                mac: MacAddr(task_mac(i.min(2))),
                delivery_addr: None,
            })
            .collect(),
        ..Default::default()
    }
}

/// Maglev slots the bench loads the mesh with: room for 10,000 services of 3 backends
/// (2039 slots each) and the planner's make-before-break copies.
pub const BENCH_MAGLEV_SLOTS: u32 = 1 << 25;

fn run_input(ns: &str, cmd: &[&str], input: &str) -> anyhow::Result<()> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    c.stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn run_ns(ns: &str, cmd: &[&str]) -> anyhow::Result<()> {
    run_input(ns, cmd, "")
}

/// (contender, seconds per add, seconds per remove).
pub type Churn = (Kind, Vec<f64>, Vec<f64>);

/// Every contender installed for one scale; at most one enabled.
pub struct Installed {
    pub scale: u32,
    ns: String,
    pub mesh: Mesh,
    haproxy: Option<Child>,
    haproxy_cfg: std::path::PathBuf,
    /// Install times (control plane), seconds.
    pub install_s: Vec<(Kind, f64)>,
}

impl Installed {
    pub fn new(topo: &LbTopo, object: &Path, scale: u32, scratch: &Path) -> anyhow::Result<Self> {
        let ns = topo.n.name().to_string();
        let mut install_s = Vec::new();
        let t = Instant::now();
        run_input(&ns, &["iptables-legacy-restore"], &iptables_rules(scale))?;
        install_s.push((Kind::Iptables, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        run_input(&ns, &["nft", "-f", "-"], &nft_rules(scale))?;
        install_s.push((Kind::Nft, t.elapsed().as_secs_f64()));
        let dp = Datapath::load_sized(object, &MeshConfig::DEFAULT, BENCH_MAGLEV_SLOTS)?;
        let mut mesh = Mesh::new(dp);
        let model = mesh_model(scale, 3);
        let t = Instant::now();
        topo.n.enter(|| mesh.apply(&model))?;
        install_s.push((Kind::Mesh, t.elapsed().as_secs_f64()));
        let cfg_path = scratch.join("haproxy.cfg");
        std::fs::write(&cfg_path, haproxy_cfg())?;
        Ok(Installed {
            scale,
            ns,
            mesh,
            haproxy: None,
            haproxy_cfg: cfg_path,
            install_s,
        })
    }

    /// Adds (`-A`) or deletes (`-D`) the PREROUTING jump that switches iptables on.
    fn kube_services_jump(&self, op: &str) -> anyhow::Result<()> {
        let cmd = [
            "iptables-legacy",
            "-t",
            "nat",
            op,
            "PREROUTING",
            "-j",
            "KUBE-SERVICES",
        ];
        run_ns(&self.ns, &cmd)
    }

    pub fn enable(&mut self, topo: &LbTopo, k: Kind) -> anyhow::Result<()> {
        match k {
            Kind::Direct => Ok(()),
            Kind::Iptables => self.kube_services_jump("-A"),
            Kind::Nft => run_input(&self.ns, &["nft", "-f", "-"], NFT_JUMP),
            Kind::Haproxy => {
                let cfg = self.haproxy_cfg.to_string_lossy().into_owned();
                self.haproxy = Some(spawn_in(&topo.n, &["haproxy", "-db", "-f", &cfg]));
                wait_listening(topo, Kind::Haproxy.targets(1).1)
            }
            Kind::Mesh => {
                let m = &mut self.mesh;
                topo.n.enter(|| -> anyhow::Result<()> {
                    m.dp.attach_tc_ingress("un")?;
                    for h in ["h1", "h2", "h3"] {
                        m.dp.attach_tc_task(h)?;
                    }
                    Ok(())
                })
            }
        }
    }

    pub fn disable(&mut self, topo: &LbTopo, k: Kind) -> anyhow::Result<()> {
        match k {
            Kind::Direct => Ok(()),
            Kind::Iptables => self.kube_services_jump("-D"),
            Kind::Nft => run_ns(
                &self.ns,
                &["nft", "flush", "chain", "ip", "kp", "prerouting"],
            ),
            Kind::Haproxy => {
                self.haproxy = None;
                Ok(())
            }
            Kind::Mesh => {
                let m = &mut self.mesh;
                topo.n.enter(|| m.dp.detach_tc()).map_err(Into::into)
            }
        }
    }

    /// Removes the iptables and nft rule sets (the mesh's maps go with `self`).
    pub fn uninstall(self) {
        let _ = run_ns(&self.ns, &["iptables-legacy", "-t", "nat", "-F"]);
        let _ = run_ns(&self.ns, &["iptables-legacy", "-t", "nat", "-X"]);
        let _ = run_ns(&self.ns, &["nft", "delete", "table", "ip", "kp"]);
    }

    /// Adds then removes one service, `ops` times each, for every rule-based contender
    /// (the mesh through its planner, iptables as kube-proxy's partial sync rewrites
    /// KUBE-SERVICES, nft element + chain): per-op latencies in seconds.
    pub fn churn(
        &mut self,
        topo: &LbTopo,
        ops: usize,
        ipt_ops: usize,
    ) -> anyhow::Result<Vec<Churn>> {
        let mut out = Vec::new();
        // Mesh.
        let base = mesh_model(self.scale, 3);
        let mut plus = base.clone();
        let extra = Kind::Mesh.base() as u32 + self.scale + 1;
        plus.services.push(ServiceSpec {
            name: "extra".into(),
            ..base.services[0].clone()
        });
        plus.services.last_mut().unwrap().ports[0].published = Some(extra as u16);
        let (mut add, mut del) = (Vec::new(), Vec::new());
        for _ in 0..ops {
            let t = Instant::now();
            topo.n.enter(|| self.mesh.apply(&plus))?;
            add.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            topo.n.enter(|| self.mesh.apply(&base))?;
            del.push(t.elapsed().as_secs_f64());
        }
        out.push((Kind::Mesh, add, del));
        // iptables: KUBE-SERVICES rewritten whole (with or without the new service's
        // jump), the new service chain alone.
        let services_chain = |with: bool| {
            let full = iptables_rules(self.scale);
            // Declaring a chain in `--noflush` mode flushes it, as kube-proxy does.
            let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n");
            if with {
                r += &format!(
                    "-A KUBE-SVC-X -j KUBE-SEP-0-{}\n",
                    Kind::Iptables.http_port()
                );
            }
            for l in full.lines().filter(|l| l.starts_with("-A KUBE-SERVICES ")) {
                r += l;
                r.push('\n');
            }
            if with {
                r += &format!(
                    "-A KUBE-SERVICES -d {NODE}/32 -p tcp --dport {} -j KUBE-SVC-X\n",
                    Kind::Iptables.base() as u32 + self.scale + 1
                );
            } else {
                r += "-X KUBE-SVC-X\n";
            }
            r + "COMMIT\n"
        };
        let (add_rules, del_rules) = (services_chain(true), services_chain(false));
        let (mut add, mut del) = (Vec::new(), Vec::new());
        for _ in 0..ipt_ops {
            let t = Instant::now();
            run_input(
                &self.ns,
                &["iptables-legacy-restore", "--noflush"],
                &add_rules,
            )?;
            add.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            run_input(
                &self.ns,
                &["iptables-legacy-restore", "--noflush"],
                &del_rules,
            )?;
            del.push(t.elapsed().as_secs_f64());
        }
        out.push((Kind::Iptables, add, del));
        // nft: one chain and one map element.
        let port = Kind::Nft.base() as u32 + self.scale + 1;
        let add_rules = format!(
            "add chain ip kp svc_x {{ numgen random mod 3 vmap {{ 0 : goto ep_0_{h}, 1 : goto ep_1_{h}, 2 : goto ep_2_{h} }}; }}\nadd element ip kp services {{ {NODE} . tcp . {port} : goto svc_x }}\n",
            h = Kind::Nft.http_port()
        );
        let del_rules = format!(
            "delete element ip kp services {{ {NODE} . tcp . {port} }}\ndelete chain ip kp svc_x\n"
        );
        let (mut add, mut del) = (Vec::new(), Vec::new());
        for _ in 0..ops {
            let t = Instant::now();
            run_input(&self.ns, &["nft", "-f", "-"], &add_rules)?;
            add.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            run_input(&self.ns, &["nft", "-f", "-"], &del_rules)?;
            del.push(t.elapsed().as_secs_f64());
        }
        out.push((Kind::Nft, add, del));
        Ok(out)
    }
}

/// Until something accepts on the node's `port` (HAProxy bound).
fn wait_listening(topo: &LbTopo, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let up = topo.n.enter(|| {
            std::net::TcpStream::connect_timeout(
                &(NODE.parse::<Ipv4Addr>().unwrap(), port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
        });
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("haproxy did not listen on {NODE}:{port} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
#[test]
fn rule_sets_put_the_measured_service_last_and_cover_every_service() {
    let r = iptables_rules(4);
    let jumps: Vec<&str> = r
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES"))
        .collect();
    assert_eq!(jumps.len(), 6);
    assert!(jumps[3].contains("--dport 30004"), "{}", jumps[3]);
    assert_eq!(r.matches("--probability 0.33333").count(), 5);
    let n = nft_rules(4);
    assert_eq!(n.matches(" : goto svc_").count(), 6);
    assert!(n.contains("10.210.0.1 . tcp . 40004 : goto svc_4"));
    let m = mesh_model(4, 3);
    assert_eq!(m.services.len(), 6);
    assert_eq!(m.services[3].ports[0].published, Some(20004));
    assert_eq!(mesh_model(2, 10).services[0].backends.len(), 10);
    assert!(haproxy_cfg().contains("bind 10.210.0.1:50001"));
}
