use super::*;
use mesh_common::lb::{BackendState, FE_HOST, FE_INGRESS, UDP_IDLE_DEFAULT_S};

const YAML: &str = r#"
underlay: eth0
node_addrs: [192.168.1.10]
services:
  - name: web
    ports:
      - {published: 8080, target: 80}
      - {published: 8081, target: 80, mode: host}
      - {published: 5353, target: 53, protocol: udp}
    vips: [10.0.1.2]
    backends:
      - {addr: 10.0.1.4}
      - {addr: 10.0.1.5, state: draining, node: 192.168.1.11}
      - {addr: 10.0.1.6, node: 192.168.1.12}
    tcp_idle: 86400
    affinity: true
endpoints:
  - {addr: 10.0.1.4, interface: veth4, mac: "02:42:0a:00:01:04"}
node: {addr: 192.168.1.10}
peers: [{addr: 192.168.1.11}, {addr: 192.168.1.12, stock: true}]
networks: [{name: ingress, vni: 4096, local_addr: 10.0.1.2}]
"#;

fn resolve(name: &str) -> Result<(u32, [u8; 6]), crate::MeshError> {
    Ok((name.len() as u32, [2, 0, 0, 0, 0, 1]))
}

#[test]
fn yaml_to_desired() {
    let m = from_yaml(YAML).unwrap();
    let d = desired(&m, resolve).unwrap();
    assert_eq!(d.node_addrs.len(), 1);
    // 8080 (ingress), 8081 (host), 5353/udp, VIP:80/tcp, VIP:53/udp.
    assert_eq!(d.frontends.len(), 5);
    let (g, flags) = &d.frontends[&fe_key(0, 8081, PROTO_TCP)];
    assert_eq!(*flags, FE_HOST);
    // Host mode: only the local task.
    assert_eq!(d.groups[g].backends.len(), 1);
    assert!(d.groups[g]
        .backends
        .contains_key(&("10.0.1.4".parse().unwrap(), 80)));
    let (g, flags) = &d.frontends[&fe_key(0, 8080, PROTO_TCP)];
    assert_eq!(*flags, FE_INGRESS);
    let grp = &d.groups[g];
    assert_eq!(grp.backends.len(), 3);
    assert_eq!(
        grp.backends[&("10.0.1.5".parse().unwrap(), 80)],
        BackendState::Draining
    );
    assert_eq!(grp.tcp_idle_s, 86400);
    assert_eq!(grp.udp_idle_s, UDP_IDLE_DEFAULT_S);
    assert!(grp.affinity);
    // The overlay: two tunnels, the stock node's flagged; this node's underlay.
    assert_eq!(d.tunnels.len(), 2);
    let stock = d.tunnels[&"10.0.1.6".parse().unwrap()];
    assert_eq!(stock.flags, mesh_common::lb::TUN_STOCK);
    assert_eq!(stock.vni, 4096);
    assert_eq!(d.local.unwrap().addr, u32::from_ne_bytes([192, 168, 1, 10]));
    assert_eq!(
        d.local.unwrap().ifindex,
        4,
        "resolved from `underlay: eth0`"
    );
    let vip = u32::from_ne_bytes([10, 0, 1, 2]);
    assert_eq!(
        d.frontends[&fe_key(vip, 80, PROTO_TCP)].0,
        *g,
        "VIP shares the ingress group"
    );
    assert_eq!(d.endpoints.len(), 1);
}

/// The README's example is a valid model.
#[test]
fn readme_example_is_valid() {
    let readme = include_str!("../../../README.md");
    let start = readme.find("```yaml\n").expect("a yaml block in README") + 8;
    let end = start + readme[start..].find("```").unwrap();
    let m = from_yaml(&readme[start..end]).unwrap_or_else(|e| panic!("README model: {e}"));
    let d = desired(&m, resolve).unwrap_or_else(|e| panic!("README model: {e}"));
    assert!(!d.frontends.is_empty() && !d.tunnels.is_empty());
}

#[test]
fn yaml_round_trips() {
    let m = from_yaml(YAML).unwrap();
    assert_eq!(from_yaml(&to_yaml(&m)).unwrap(), m);
}

#[test]
fn host_mode_port_without_local_task_is_not_claimed() {
    let mut m = from_yaml(YAML).unwrap();
    m.endpoints.clear();
    m.services[0].backends[0].node = Some("192.168.1.11".parse().unwrap());
    let d = desired(&m, resolve).unwrap();
    assert!(!d.frontends.contains_key(&fe_key(0, 8081, PROTO_TCP)));
    assert!(d.frontends.contains_key(&fe_key(0, 8080, PROTO_TCP)));
}

/// Problems name what to fix, and cost only what they concern.
#[test]
fn errors_name_what_to_fix_and_leave_the_rest() {
    let problems = |m: &Model| -> (Desired, String) {
        let d = desired(m, resolve).unwrap();
        let text = d
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        (d, text)
    };
    let mut m = from_yaml(YAML).unwrap();
    m.services.push(m.services[0].clone());
    let (d, e) = problems(&m);
    assert!(e.contains("\"web\" is defined twice"), "{e}");
    assert!(
        d.frontends.contains_key(&fe_key(0, 8080, PROTO_TCP)),
        "the first stays"
    );

    let mut m = from_yaml(YAML).unwrap();
    let mut other = m.services[0].clone();
    other.name = "www".into();
    other.vips.clear();
    other.ports.push(PortSpec {
        published: Some(9000),
        target: 90,
        protocol: Protocol::Tcp,
        mode: PublishMode::Ingress,
    });
    m.services.push(other);
    let (d, e) = problems(&m);
    assert!(
        e.contains("published port 8080") && e.contains("\"www\": port 8080/tcp left out"),
        "{e}"
    );
    // `www` loses only the ports `web` holds (first by name); `web` keeps them, `www` its own.
    assert_eq!(d.frontends[&fe_key(0, 8080, PROTO_TCP)].0 .0, "web/tcp/80");
    assert_eq!(d.frontends[&fe_key(0, 9000, PROTO_TCP)].0 .0, "www/tcp/90");
    // A service applied before keeps its port against a newcomer, whatever the names.
    let prior = Claims::from([((8080, Protocol::Tcp), "www".to_string())]);
    let d = desired_with(&m, resolve, &prior, &Reserved::default()).unwrap();
    // And again with what that apply held: stable (no flip back by name).
    let d = desired_with(&m, resolve, &d.claims, &Reserved::default()).unwrap();
    assert_eq!(d.frontends[&fe_key(0, 8080, PROTO_TCP)].0 .0, "www/tcp/80");

    let mut m = from_yaml(YAML).unwrap();
    m.services[0].backends[1].node = Some("192.168.1.99".parse().unwrap());
    let (d, e) = problems(&m);
    assert!(
            e.contains("backend 10.0.1.5 left out: backend 10.0.1.5 is on node 192.168.1.99, which is not in `peers`"),
            "{e}"
        );
    assert_eq!(d.groups[&GroupName("web/tcp/80".into())].backends.len(), 2);

    let mut m = from_yaml(YAML).unwrap();
    m.services[0].backends[0].addr = "10.0.1.40".parse().unwrap();
    let (_, e) = problems(&m);
    assert!(
        e.contains("10.0.1.40 is on this node but has no endpoint"),
        "{e}"
    );

    // An interface that cannot be resolved costs its endpoint (and so its backend).
    let m = from_yaml(YAML).unwrap();
    let d = desired(&m, |name| {
        if name == "veth4" {
            Err(crate::MeshError::NoSuchInterface { name: name.into() })
        } else {
            resolve(name)
        }
    })
    .unwrap();
    assert!(d.endpoints.is_empty());
    assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
    assert!(d.frontends.contains_key(&fe_key(0, 8080, PROTO_TCP)));

    let mut m = from_yaml(YAML).unwrap();
    m.endpoints.push(m.endpoints[0].clone());
    let e = desired(&m, resolve).unwrap_err().to_string();
    assert!(e.contains("endpoint 10.0.1.4 is listed twice"), "{e}");

    let e = from_yaml("services: [{name: x, portz: []}]").unwrap_err();
    assert!(e.contains("unknown field `portz`"), "{e}");
    let e = from_yaml("endpoints: [{addr: 10.0.0.1, interface: v, mac: zz}]").unwrap_err();
    assert!(e.contains("not a MAC address"), "{e}");
}

/// `-p 5353:53/tcp -p 5353:53/udp` (every DNS server): one service, both protocols,
/// and a port written twice is one port, not a clash with itself.
#[test]
fn one_port_on_tcp_and_udp() {
    let mut m = from_yaml(YAML).unwrap();
    let p = |protocol| PortSpec {
        published: Some(5300),
        target: 53,
        protocol,
        mode: PublishMode::Ingress,
    };
    m.services[0].ports = vec![
        p(Protocol::Tcp),
        p(Protocol::Udp),
        p(Protocol::Tcp),
        p(Protocol::Udp),
    ];
    let d = desired(&m, resolve).unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert!(d.frontends.contains_key(&fe_key(0, 5300, PROTO_TCP)));
    assert!(d.frontends.contains_key(&fe_key(0, 5300, PROTO_UDP)));
    // Across services: TCP in one, UDP in the other.
    let mut other = m.services[0].clone();
    other.name = "dns-udp".into();
    other.vips.clear();
    other.ports = vec![PortSpec {
        published: Some(5301),
        ..p(Protocol::Udp)
    }];
    m.services[0].ports = vec![PortSpec {
        published: Some(5301),
        ..p(Protocol::Tcp)
    }];
    m.services.push(other);
    let d = desired(&m, resolve).unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends[&fe_key(0, 5301, PROTO_TCP)].0 .0, "web/tcp/53");
    assert_eq!(
        d.frontends[&fe_key(0, 5301, PROTO_UDP)].0 .0,
        "dns-udp/udp/53"
    );
}

/// Issue 19's "ports the mesh needs": a service publishing the agents' peer port, Swarm's
/// ports or the data-path port loses that port (with an error naming it), keeps the rest.
#[test]
fn reserved_ports_are_never_published() {
    let mut m = from_yaml(YAML).unwrap();
    let port = |published: u16, protocol| PortSpec {
        published: Some(published),
        target: 80,
        protocol,
        mode: PublishMode::Ingress,
    };
    m.services[0].ports.extend([
        port(9478, Protocol::Tcp),
        port(2377, Protocol::Tcp),
        port(7946, Protocol::Tcp),
        port(7946, Protocol::Udp),
        port(4789, Protocol::Udp),
        // The same numbers in the other protocol are nobody's.
        port(9478, Protocol::Udp),
        port(4789, Protocol::Tcp),
    ]);
    let d = desired(&m, resolve).unwrap();
    let text: Vec<String> = d.problems.iter().map(|p| p.to_string()).collect();
    for (p, why) in [
        ("9478/tcp", "the mesh agents' peer port"),
        ("2377/tcp", "Swarm's cluster management port"),
        ("7946/tcp", "Swarm's gossip port"),
        ("7946/udp", "Swarm's gossip port"),
        ("4789/udp", "the swarm's data-path (VXLAN) port"),
    ] {
        assert!(
            text.iter()
                .any(|t| t.contains(&format!("\"web\": port {p} left out: {p} is {why}"))),
            "{p}: {text:?}"
        );
        let (n, proto) = p.split_once('/').unwrap();
        let proto = if proto == "tcp" { PROTO_TCP } else { PROTO_UDP };
        assert!(
            !d.frontends
                .contains_key(&fe_key(0, n.parse().unwrap(), proto)),
            "{p}"
        );
    }
    assert_eq!(d.problems.len(), 5, "{text:?}");
    for (n, proto) in [(8080, PROTO_TCP), (9478, PROTO_UDP), (4789, PROTO_TCP)] {
        assert!(
            d.frontends.contains_key(&fe_key(0, n, proto)),
            "{n}/{proto}"
        );
    }
    // Another data-path port and the exchange off: 4789/udp and 9478/tcp are free.
    let d = desired_with(&m, resolve, &Claims::new(), &Reserved::new(7789, 0)).unwrap();
    assert_eq!(d.problems.len(), 3, "{:?}", d.problems);
    assert!(d.frontends.contains_key(&fe_key(0, 4789, PROTO_UDP)));
    assert!(d.frontends.contains_key(&fe_key(0, 9478, PROTO_TCP)));
}
