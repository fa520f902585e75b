use super::*;

/// Shaped as `docker network inspect --verbose ingress` printed on a real swarm here.
const WEB: &str = r#"{
        "VIP": "10.0.0.3",
        "Ports": ["Target: 80, Publish: 8080"],
        "LocalLBIndex": 256,
        "Tasks": [
            {"Name": "web.1.yz6us", "EndpointID": "a", "EndpointIP": "10.0.0.4", "Info": {"Host IP": "10.251.0.11"}},
            {"Name": "web.2.k2jq1", "EndpointID": "b", "EndpointIP": "10.0.0.5", "Info": {"Host IP": "10.251.0.12"}}
        ]
    }"#;

fn ingress() -> NetworkView {
    NetworkView {
        id: "ingressid".into(),
        name: "ingress".into(),
        ingress: true,
        vnis: vec![4096],
        subnets: vec!["10.0.0.0/24".parse().unwrap()],
        local_addr: Some("10.0.0.2".parse().unwrap()),
        peers: vec![
            "10.251.0.11".parse().unwrap(),
            "10.251.0.12".parse().unwrap(),
        ],
        services: BTreeMap::from([("web".into(), serde_json::from_str(WEB).unwrap())]),
    }
}

/// `docker network create --ingress ... myingress` (row 2.4/custom-ingress): its
/// sandbox's endpoint is `myingress-sbox`; once only `ingress-sbox` was looked for,
/// and a re-created ingress network served no published port.
#[test]
fn a_network_keeps_its_subnets_through_the_model_file() {
    let m = model_from(&[ingress()], "10.251.0.11".parse().unwrap(), "eth0");
    let subnets = &m.networks[0].subnets;
    assert_eq!(subnets, &vec!["10.0.0.0/24".parse().unwrap()]);
    assert!(subnets[0].contains("10.0.0.2".parse().unwrap()));
    let yaml = crate::model::to_yaml(&m);
    assert!(yaml.contains("10.0.0.0/24"), "{yaml}");
    assert_eq!(crate::model::from_yaml(&yaml).unwrap(), m);
}

#[test]
fn the_local_endpoint_of_any_ingress_network() {
    assert_eq!(local_endpoint_key("ingress", true), "ingress-sbox");
    assert_eq!(local_endpoint_key("myingress", true), "myingress-sbox");
    assert_eq!(local_endpoint_key("two", false), "lb-two");
}

#[test]
fn labels_set_what_docker_cannot_express() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let mut n = ingress();
    n.services
        .insert("db".into(), serde_json::from_str(WEB).unwrap());
    let label = |k: &str, v: &str| (k.to_string(), v.to_string());
    let labels = BTreeMap::from([
        (
            "web".to_string(),
            BTreeMap::from([
                label("mesh.idle-timeout", "2h"),
                label("mesh.affinity", "client-ip"),
                label("mesh.colour", "blue"),
            ]),
        ),
        (
            "db".to_string(),
            BTreeMap::from([label("mesh.disable", "true")]),
        ),
    ]);
    let mut m = model_from(&[n], me, "eth0");
    let bad = apply_labels(&mut m, &labels);
    assert_eq!(bad, vec!["web: unknown label mesh.colour".to_string()]);
    assert!(m.services.iter().all(|s| s.name != "db"), "opted out");
    assert_eq!(web(&m).tcp_idle, Some(7200));
    assert!(web(&m).affinity);
    assert_eq!(duration_s("90m"), Some(5400));
    assert_eq!(duration_s("300"), Some(300));
    assert_eq!(duration_s("x"), None);
}

#[test]
fn host_mode_ports_come_from_local_containers() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let mut m = model_from(&[ingress()], me, "eth0");
    let hp = |addr: &str| crate::source::facts::HostPort {
        service: "hm".into(),
        protocol: Protocol::Tcp,
        published: 8090,
        target: 80,
        addr: addr.parse().unwrap(),
    };
    add_host_ports(&mut m, &[hp("172.18.0.3"), hp("172.18.0.4")]);
    let s = m
        .services
        .iter()
        .find(|s| s.name == "hm@host/tcp/8090")
        .unwrap();
    assert_eq!(s.ports[0].mode, PublishMode::Host);
    assert_eq!((s.ports[0].published, s.ports[0].target), (Some(8090), 80));
    assert_eq!(s.backends.len(), 2);
    assert!(s.backends.iter().all(|b| b.node.is_none()));
}

#[test]
fn task_ids_map_to_their_addresses() {
    let t = task_addrs(&[ingress()]);
    assert_eq!(t["yz6us"], vec!["10.0.0.4".parse::<Ipv4Addr>().unwrap()]);
    assert_eq!(t.len(), 2);
}

#[test]
fn ports_parse() {
    assert_eq!(parse_port("Target: 80, Publish: 8080"), Some((80, 8080)));
    assert_eq!(parse_port("Target: 80"), None);
    assert_eq!(parse_port("garbage"), None);
}

#[test]
fn published_port_with_local_and_remote_tasks() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let m = model_from(&[ingress()], me, "eth0");
    assert_eq!(
        m.peers,
        vec![PeerSpec {
            addr: "10.251.0.12".parse().unwrap(),
            stock: false
        }]
    );
    assert_eq!(m.networks[0].vni, 4096);
    let web = &m.services[0];
    assert_eq!(web.name, "web");
    // Delivered on the published port: the task redirects it to 80 itself.
    assert_eq!(
        (web.ports[0].published, web.ports[0].target),
        (Some(8080), 8080)
    );
    assert_eq!(web.backends.len(), 2);
    assert_eq!(web.backends[0].node, None, "the task on this node is local");
    assert_eq!(web.backends[1].node, Some("10.251.0.12".parse().unwrap()));
}

#[test]
fn published_ports_take_the_managers_protocols() {
    let mut m = model_from(&[ingress()], "10.251.0.11".parse().unwrap(), "eth0");
    assert_eq!(
        web(&m).ports[0].protocol,
        Protocol::Tcp,
        "assumed without a manager"
    );
    let published = web(&m).ports[0].published.unwrap();
    let udp =
        crate::source::facts::Protocols::from([("web".into(), vec![(published, Protocol::Udp)])]);
    let mut only_udp = m.clone();
    apply_protocols(&mut only_udp, &udp);
    let p: Vec<Protocol> = web(&only_udp).ports.iter().map(|p| p.protocol).collect();
    assert_eq!(p, vec![Protocol::Udp]);
    let both = crate::source::facts::Protocols::from([(
        "web".into(),
        vec![(published, Protocol::Udp), (published, Protocol::Tcp)],
    )]);
    apply_protocols(&mut m, &both);
    let p: Vec<Protocol> = web(&m).ports.iter().map(|p| p.protocol).collect();
    assert_eq!(p, vec![Protocol::Tcp, Protocol::Udp]);
    // Two groups, one per protocol (endpoints do not matter here), named by the
    // port they deliver to.
    m.services
        .iter_mut()
        .for_each(|s| s.backends.retain(|b| b.node.is_some()));
    let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).expect("both protocols are valid");
    assert!(d
        .groups
        .keys()
        .any(|g| g.0 == format!("web/udp/{published}")));
    assert!(d
        .groups
        .keys()
        .any(|g| g.0 == format!("web/tcp/{published}")));
}

/// `service update --publish-rm 80 --publish-add 8221:80`: until the old tasks are
/// gone Docker's view shows 8220 or 8221 at random with each read (seen on 20.10 and
/// 28.5: the port answered now and then, on no node for 20 s). The manager's spec
/// decides; a service it does not list yet keeps the gossip's ports.
#[test]
fn published_ports_follow_the_spec_not_the_gossip() {
    use crate::source::facts::{IngressPort, ServiceFacts};
    let me = "10.251.0.11".parse().unwrap();
    let mut n = ingress();
    n.services
        .insert("gone".into(), serde_json::from_str(WEB).unwrap());
    n.services
        .insert("new".into(), serde_json::from_str(WEB).unwrap());
    let mut m = model_from(&[n], me, "eth0");
    let port = |published, target, protocol| IngressPort {
        published,
        target,
        protocol,
    };
    let facts = ServiceFacts {
        ingress: Some(BTreeMap::from([
            (
                "web".to_string(),
                vec![
                    port(8221, 80, Protocol::Udp),
                    port(8221, 80, Protocol::Tcp),
                    port(8221, 80, Protocol::Tcp),
                ],
            ),
            ("gone".to_string(), vec![]),
        ])),
        ..Default::default()
    };
    apply_published(&mut m, &facts);
    let ports = |m: &Model, name: &str| -> Vec<(Option<u16>, u16, Protocol)> {
        m.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| {
                s.ports
                    .iter()
                    .map(|p| (p.published, p.target, p.protocol))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        ports(&m, "web"),
        vec![
            (Some(8221), 8221, Protocol::Tcp),
            (Some(8221), 8221, Protocol::Udp)
        ]
    );
    assert!(
        !m.services.iter().any(|s| s.name == "gone"),
        "listed without ingress ports: nothing to serve"
    );
    assert_eq!(ports(&m, "new"), vec![(Some(8080), 8080, Protocol::Tcp)]);
    // An older manager's report (protocols only) still applies.
    let mut old = model_from(&[ingress()], me, "eth0");
    let facts = ServiceFacts {
        protocols: BTreeMap::from([("web".into(), vec![(8080, Protocol::Udp)])]),
        ..Default::default()
    };
    apply_published(&mut old, &facts);
    assert_eq!(ports(&old, "web"), vec![(Some(8080), 8080, Protocol::Udp)]);
}

/// `-p 5353:53/tcp -p 5353:53/udp`: the gossip lists the port twice, without
/// protocols. With the managers' facts both are served; without them, TCP; never a
/// clash of the service with itself (which once froze every service on the node).
#[test]
fn one_port_on_tcp_and_udp_in_one_service() {
    let mut n = ingress();
    n.services.get_mut("web").unwrap().ports = Some(vec![
        "Target: 53, Publish: 5353".into(),
        "Target: 53, Publish: 5353".into(),
    ]);
    let m = model_from(&[n], "10.251.0.99".parse().unwrap(), "eth0");
    let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let both = crate::source::facts::Protocols::from([(
        "web".into(),
        vec![(5353, Protocol::Tcp), (5353, Protocol::Udp)],
    )]);
    let mut m = m;
    apply_protocols(&mut m, &both);
    let p: Vec<Protocol> = web(&m).ports.iter().map(|p| p.protocol).collect();
    assert_eq!(p, vec![Protocol::Tcp, Protocol::Udp]);
    let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends.len(), 2);
}

/// `--subnet` twice: Docker carries each subnet on its own VNI, and VXLAN for any
/// of them must pass the underlay hook (only the first once did: the second
/// subnet's containers could not reach each other across nodes).
#[test]
fn every_vni_of_a_multi_subnet_network_is_known() {
    assert_eq!(parse_vnis("5101,5102"), vec![5101, 5102]);
    assert_eq!(parse_vnis("4097"), vec![4097]);
    assert!(parse_vnis("5101,x").is_empty(), "half a list is no list");
    assert!(parse_vnis("16777216").is_empty(), "VNIs have 24 bits");
    let mut n = ingress();
    n.ingress = false;
    n.name = "two".into();
    n.vnis = vec![5101, 5102];
    let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
    let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap();
    for vni in [5101, 5102] {
        assert_eq!(
            d.networks.get(&vni).map(|n| n.flags),
            Some(mesh_common::lb::NET_DOCKER),
            "VNI {vni}"
        );
    }
}

/// The swarm's data-path port wins over the flag, and a mismatch is said.
#[test]
fn the_data_path_port_comes_from_the_swarm() {
    assert_eq!(data_path_port(None, None), (4789, None));
    assert_eq!(data_path_port(Some(7789), None), (7789, None));
    assert_eq!(data_path_port(None, Some(7789)), (7789, None));
    assert_eq!(data_path_port(Some(7789), Some(7789)), (7789, None));
    let (p, why) = data_path_port(Some(4789), Some(7789));
    assert_eq!(p, 7789);
    assert!(why
        .unwrap()
        .contains("--data-path-port 4789 differs from the swarm's data-path port 7789"));
}

/// A view that leaves the node's endpoint out (Docker does, now and then) keeps the
/// network, and so the node's published ports; a network gone is forgotten.
#[test]
fn a_local_endpoint_left_out_of_one_view_is_remembered() {
    let mut seen = BTreeMap::new();
    let mut first = vec![ingress()];
    remember_local_addrs(&mut first, &mut seen);
    let mut second = vec![ingress()];
    second[0].local_addr = None;
    remember_local_addrs(&mut second, &mut seen);
    assert_eq!(second[0].local_addr, Some("10.0.0.2".parse().unwrap()));
    let m = model_from(&second, "10.251.0.11".parse().unwrap(), "eth0");
    assert_eq!(m.services.len(), 1, "the published port stays");
    remember_local_addrs(&mut [], &mut seen);
    assert!(seen.is_empty());
}

#[test]
fn a_dnsrr_service_gets_no_vip() {
    let mut n = ingress();
    n.ingress = false;
    n.name = "meshnet".into();
    // endpoint_mode dnsrr: Docker's DNS answers task addresses; there is no VIP.
    n.services.get_mut("web").unwrap().vip = String::new();
    let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
    assert!(m.services.is_empty(), "{:?}", m.services);
}

#[test]
fn vip_on_a_user_network() {
    let mut n = ingress();
    n.ingress = false;
    n.name = "meshnet".into();
    let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
    let s = &m.services[0];
    assert_eq!(s.name, "web@meshnet");
    assert_eq!(s.vips, vec!["10.0.0.3".parse::<Ipv4Addr>().unwrap()]);
    assert!(s.every_port, "Docker's VIPs take every port");
    assert!(s.ports.is_empty());
    // A service nobody publishes still has its VIP.
    let mut n = ingress();
    n.ingress = false;
    n.name = "meshnet".into();
    n.services.get_mut("web").unwrap().ports = None;
    // Seen from a node without tasks: every backend is remote (no endpoints needed).
    let m = model_from(&[n], "10.251.0.99".parse().unwrap(), "eth0");
    assert_eq!(m.services[0].name, "web@meshnet");
    let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap_or_else(|e| panic!("{e}"));
    let vip = u32::from_ne_bytes([10, 0, 0, 3]);
    let (group, flags) = &d.frontends[&mesh_common::lb::any_port_vip(vip)];
    assert_eq!(*flags, mesh_common::lb::FE_VIP);
    assert!(
        d.groups[group].backends.keys().all(|(_, port)| *port == 0),
        "port 0: the port the client dialled"
    );
}

#[test]
fn a_network_without_vni_or_local_endpoint_is_skipped() {
    let mut n = ingress();
    n.local_addr = None;
    let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
    assert!(m.networks.is_empty() && m.services.is_empty());
}

/// The ingress view once the remote task has left it.
fn without_remote_task() -> NetworkView {
    let mut n = ingress();
    n.services
        .get_mut("web")
        .unwrap()
        .tasks
        .as_mut()
        .unwrap()
        .pop();
    n
}

fn web(m: &Model) -> &ServiceSpec {
    m.services.iter().find(|s| s.name == "web").unwrap()
}

fn web_mut(m: &mut Model) -> &mut ServiceSpec {
    m.services.iter_mut().find(|s| s.name == "web").unwrap()
}

#[test]
fn local_tasks_need_a_veth_and_a_passing_healthcheck() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let mut m = model_from(&[ingress()], me, "eth0");
    let local: Ipv4Addr = "10.0.0.4".parse().unwrap();
    // No veth found yet: not a backend; the remote task stays.
    settle_local(&mut m, &BTreeSet::new(), &BTreeSet::new(), &BTreeSet::new());
    assert_eq!(web(&m).backends.len(), 1);
    assert!(web(&m).backends[0].node.is_some());
    let mut m = model_from(&[ingress()], me, "eth0");
    settle_local(
        &mut m,
        &BTreeSet::from([local]),
        &BTreeSet::from([local]),
        &BTreeSet::new(),
    );
    assert_eq!(web(&m).backends[0].state, Health::Draining);
    assert_eq!(web(&m).backends[1].state, Health::Active);
    // Shutting down: drained while another takes new flows, kept while it is the
    // last one.
    let remote: Ipv4Addr = "10.0.0.5".parse().unwrap();
    let mut m = model_from(&[ingress()], me, "eth0");
    settle_local(
        &mut m,
        &BTreeSet::from([local]),
        &BTreeSet::new(),
        &BTreeSet::from([remote]),
    );
    assert_eq!(web(&m).backends[1].state, Health::Draining);
    let mut m = model_from(&[ingress()], me, "eth0");
    let both = BTreeSet::from([local, remote]);
    settle_local(&mut m, &BTreeSet::from([local]), &BTreeSet::new(), &both);
    assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
}

#[test]
fn a_vanished_task_drains_for_the_grace_period() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let t0 = std::time::Instant::now();
    let grace = std::time::Duration::from_secs(10);
    let mut d = DrainTracker::new(grace);
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0);
    assert_eq!(web(&m).backends.len(), 2);
    // The remote task leaves Docker's view.
    let n = without_remote_task();
    let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
    d.apply(&mut m, t0 + std::time::Duration::from_secs(1));
    let gone = web(&m).backends.iter().find(|b| b.node.is_some()).unwrap();
    assert_eq!(gone.state, Health::Draining);
    // Still draining just before the grace period ends, gone after.
    let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
    d.apply(&mut m, t0 + std::time::Duration::from_millis(10_900));
    assert_eq!(web(&m).backends.len(), 2);
    let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
    d.apply(&mut m, t0 + std::time::Duration::from_secs(12));
    assert_eq!(web(&m).backends.len(), 1);
    // And it does not come back.
    let mut m = model_from(&[n], me, "eth0");
    d.apply(&mut m, t0 + std::time::Duration::from_secs(13));
    assert_eq!(web(&m).backends.len(), 1);
}

/// An agent restarted in the middle of a drain (a new tracker, resumed from what the
/// old one left in the state directory) keeps the backend draining for the rest of the
/// grace period, not for none of it (its flows would be reset) nor for a whole new one.
#[test]
fn a_drain_survives_a_restart_of_the_agent() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let s = |n: u64| std::time::Duration::from_secs(n);
    let (t0, wall0) = (std::time::Instant::now(), std::time::SystemTime::now());
    let grace = s(10);
    let mut old = DrainTracker::new(grace);
    old.apply(&mut model_from(&[ingress()], me, "eth0"), t0);
    let n = without_remote_task();
    old.apply(
        &mut model_from(std::slice::from_ref(&n), me, "eth0"),
        t0 + s(2),
    );
    // The agent stops 4 s after the task left; its file says so.
    let saved = old.draining(t0 + s(6), wall0 + s(6));
    assert_eq!(saved.len(), 1);
    let text = serde_json::to_string(&saved).unwrap();
    // The new one starts 1 s later on its own monotonic clock.
    let t1 = t0 + s(100);
    let mut new = DrainTracker::new(grace);
    new.resume(serde_json::from_str(&text).unwrap(), t1, wall0 + s(7));
    let draining = |d: &mut DrainTracker, at| {
        let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
        d.apply(&mut m, at);
        web(&m)
            .backends
            .iter()
            .find(|b| b.node.is_some())
            .map(|b| b.state)
    };
    assert_eq!(draining(&mut new, t1), Some(Health::Draining));
    // 5 s had passed; the other 5 remain.
    assert_eq!(draining(&mut new, t1 + s(4)), Some(Health::Draining));
    assert_eq!(draining(&mut new, t1 + s(6)), None);
    // A drain whose grace ran out while no agent ran is not taken up.
    let mut late = DrainTracker::new(grace);
    late.resume(saved, t1, wall0 + s(30));
    assert!(late.draining(t1, wall0 + s(30)).is_empty());
}

#[test]
fn a_task_that_returns_is_active_again() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let t0 = std::time::Instant::now();
    let mut d = DrainTracker::new(std::time::Duration::from_secs(10));
    d.apply(&mut model_from(&[ingress()], me, "eth0"), t0);
    let n = without_remote_task();
    d.apply(&mut model_from(&[n], me, "eth0"), t0);
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0);
    assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
    assert_eq!(web(&m).backends.len(), 2);
}

#[test]
fn a_service_that_flickers_to_no_backend_keeps_its_last_ones_briefly() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let t0 = std::time::Instant::now();
    let ms = std::time::Duration::from_millis;
    let mut d = DrainTracker::new(ms(10_000));
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0);
    d.hold_warming(&mut m, t0);
    // Docker's view loses both tasks for a moment: they drain, but stay active for
    // the hold, then drain for real.
    let mut n = ingress();
    n.services.get_mut("web").unwrap().tasks = Some(vec![]);
    for (at, active) in [(100, true), (1900, true), (2200, false)] {
        let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
        d.apply(&mut m, t0 + ms(at));
        d.hold_warming(&mut m, t0 + ms(at));
        assert_eq!(web(&m).backends.len(), 2);
        assert!(
            web(&m)
                .backends
                .iter()
                .all(|b| (b.state == Health::Active) == active),
            "at {at} ms: {:?}",
            web(&m).backends
        );
    }
}

#[test]
fn a_new_task_warms_up_unless_it_is_the_only_one() {
    let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
    let t0 = std::time::Instant::now();
    let ms = std::time::Duration::from_millis;
    let mut d = DrainTracker::new(ms(10_000)).with_warmup(ms(1000));
    // What is there at the first look takes flows at once.
    let n = without_remote_task();
    let mut m = model_from(&[n], me, "eth0");
    d.apply(&mut m, t0);
    d.hold_warming(&mut m, t0);
    assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
    // A second task appears: held back for the warm-up, then active.
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0 + ms(100));
    d.hold_warming(&mut m, t0 + ms(100));
    assert_eq!(web(&m).backends[1].state, Health::Draining);
    // ... unless the one ready backend is itself on its way out (settled
    // draining after apply): then the newcomer takes flows at once.
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0 + ms(200));
    web_mut(&mut m).backends[0].state = Health::Draining;
    d.hold_warming(&mut m, t0 + ms(200));
    assert_eq!(web(&m).backends[1].state, Health::Active);
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0 + ms(1200));
    d.hold_warming(&mut m, t0 + ms(1200));
    assert_eq!(web(&m).backends[1].state, Health::Active);
    // A service whose tasks are all new takes them at once.
    let mut d = DrainTracker::new(ms(10_000)).with_warmup(ms(1000));
    d.apply(&mut Model::default(), t0);
    let mut m = model_from(&[ingress()], me, "eth0");
    d.apply(&mut m, t0 + ms(100));
    d.hold_warming(&mut m, t0 + ms(100));
    assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
}
