use super::*;
use crate::{
    datapath::maps::MemMaps,
    model::{desired, from_yaml, Model},
};

fn resolve(name: &str) -> Result<(u32, [u8; 6]), crate::MeshError> {
    Ok((name.len() as u32 + 10, [2, 0, 0, 0, 0, 1]))
}

fn model(backends: &[(&str, &str)]) -> Model {
    let mut y = String::from(
            "node_addrs: [192.168.1.10]\nservices:\n  - name: web\n    ports: [{published: 8080, target: 80}]\n    vips: [10.0.1.2]\n    backends:\n",
        );
    for (a, s) in backends {
        y.push_str(&format!("      - {{addr: {a}, state: {s}}}\n"));
    }
    y.push_str("endpoints:\n");
    for (a, _) in backends {
        y.push_str(&format!(
            "  - {{addr: {a}, interface: v{a}, mac: \"02:42:00:00:00:01\"}}\n"
        ));
    }
    from_yaml(&y).unwrap()
}

const ACTIVE: &str = "active";

/// Applies op by op and checks, after every single write, that every frontend
/// resolves a spread of flows to live, active backends or to "no backend" (never to
/// a dangling id): no packet can see a half-written service.
fn apply_checked(maps: &mut MemMaps, ops: &[Op]) {
    for (i, op) in ops.iter().enumerate() {
        maps.apply(op);
        if let Err(e) = maps.check_consistent() {
            panic!("after op {i} ({op:?}): {e}");
        }
    }
}

#[test]
fn first_apply_then_nothing_to_do() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let d = desired(
        &model(&[
            ("10.0.1.4", ACTIVE),
            ("10.0.1.5", ACTIVE),
            ("10.0.1.6", ACTIVE),
        ]),
        resolve,
    )
    .unwrap();
    let ops = r.plan(&d).unwrap();
    apply_checked(&mut maps, &ops);
    // 1 node addr, 3 endpoints and their idle timeouts, 3 backends, 2039 slots, 1
    // service, 2 frontends.
    assert_eq!(
        ops.iter().map(Op::writes).sum::<usize>(),
        1 + 3 + 3 + 3 + 2039 + 1 + 2
    );
    assert!(
        r.plan(&d).unwrap().is_empty(),
        "a second apply writes nothing"
    );
    // Flows spread over the three.
    let mut seen = BTreeSet::new();
    for port in 0..300u16 {
        seen.insert(
            maps.lookup([192, 168, 1, 10], 8080, 6, [10, 9, 9, 9], 1000 + port)
                .unwrap(),
        );
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn adding_a_backend_writes_only_the_slots_that_move() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let three = [
        ("10.0.1.4", ACTIVE),
        ("10.0.1.5", ACTIVE),
        ("10.0.1.6", ACTIVE),
    ];
    apply_checked(
        &mut maps,
        &r.plan(&desired(&model(&three), resolve).unwrap()).unwrap(),
    );
    let four = [three[0], three[1], three[2], ("10.0.1.7", ACTIVE)];
    let ops = r.plan(&desired(&model(&four), resolve).unwrap()).unwrap();
    apply_checked(&mut maps, &ops);
    let slots: usize = ops
        .iter()
        .filter(|o| matches!(o, Op::PutSlots(_)))
        .map(Op::writes)
        .sum();
    // Same size class (2039): about a quarter of the slots move to the newcomer.
    assert!(slots > 400 && slots < 650, "{slots} slots rewritten");
    assert!(
        matches!(ops[0], Op::PutEndpoint(..)),
        "endpoint before anything points at it"
    );
    let kinds: Vec<_> = ops.iter().map(std::mem::discriminant).collect();
    let pos = |o: &Op| {
        kinds
            .iter()
            .position(|k| *k == std::mem::discriminant(o))
            .unwrap()
    };
    assert!(pos(&Op::PutBackend(0, Backend::default())) < pos(&Op::PutSlots(vec![])));
    assert!(pos(&Op::PutSlots(vec![])) < pos(&Op::PutService(0, Service::default())));
}

#[test]
fn draining_leaves_the_table_and_removal_deletes_last() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let all = [
        ("10.0.1.4", ACTIVE),
        ("10.0.1.5", ACTIVE),
        ("10.0.1.6", ACTIVE),
    ];
    apply_checked(
        &mut maps,
        &r.plan(&desired(&model(&all), resolve).unwrap()).unwrap(),
    );
    let drain = [all[0], ("10.0.1.5", "draining"), all[2]];
    let ops = r.plan(&desired(&model(&drain), resolve).unwrap()).unwrap();
    apply_checked(&mut maps, &ops);
    assert!(!maps.table_backends(8080).is_empty());
    assert!(maps.table_backends(8080).iter().all(|a| a != "10.0.1.5:80"));
    assert!(maps.backend_state("10.0.1.5") == Some(BackendState::Draining));
    // Resized table (2 active -> 1021 slots): a fresh region, then the service flips.
    let removed = [all[0], all[2]];
    let ops = r
        .plan(&desired(&model(&removed), resolve).unwrap())
        .unwrap();
    apply_checked(&mut maps, &ops);
    assert!(maps.backend_state("10.0.1.5").is_none());
    assert!(matches!(ops.last(), Some(Op::DelEndpoint(_))));
}

#[test]
fn no_backends_and_back() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    apply_checked(
        &mut maps,
        &r.plan(&desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap())
            .unwrap(),
    );
    apply_checked(
        &mut maps,
        &r.plan(&desired(&model(&[]), resolve).unwrap()).unwrap(),
    );
    assert_eq!(
        maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 5),
        None
    );
    apply_checked(
        &mut maps,
        &r.plan(&desired(&model(&[("10.0.1.9", ACTIVE)]), resolve).unwrap())
            .unwrap(),
    );
    assert_eq!(
        maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 5)
            .as_deref(),
        Some("10.0.1.9:80")
    );
}

#[test]
fn removing_the_service_cleans_every_map() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    apply_checked(
        &mut maps,
        &r.plan(&desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap())
            .unwrap(),
    );
    let empty = Desired::default();
    apply_checked(&mut maps, &r.plan(&empty).unwrap());
    assert!(maps.is_empty(), "{maps:?}");
}

/// A backend leaving one service while another gains one, in one plan: the newcomer
/// must not take the leaver's id (its delete would run after the put, and the
/// leaver's tracked flows would find the newcomer).
#[test]
fn ids_are_never_reused() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let mut m = model(&[("10.0.1.4", ACTIVE)]);
    let mut other = m.services[0].clone();
    other.name = "api".into();
    other.vips = vec!["10.0.1.3".parse().unwrap()];
    other.ports[0].published = Some(9090);
    other.backends.clear();
    m.services.push(other);
    apply_checked(&mut maps, &r.plan(&desired(&m, resolve).unwrap()).unwrap());
    let first: BTreeSet<u32> = r.backends.keys().copied().collect();
    m.services[1].backends = vec![crate::model::BackendSpec {
        addr: "10.0.1.4".parse().unwrap(),
        state: crate::model::Health::Active,
        node: None,
        network: None,
        task: None,
    }];
    m.services[0].backends.clear();
    apply_checked(&mut maps, &r.plan(&desired(&m, resolve).unwrap()).unwrap());
    assert_eq!(
        maps.lookup([192, 168, 1, 10], 9090, 6, [1, 2, 3, 4], 5)
            .as_deref(),
        Some("10.0.1.4:80")
    );
    assert_eq!(first.len(), 1);
    assert_eq!(r.backends.len(), 1);
    assert!(
        r.backends.keys().all(|id| !first.contains(id)),
        "id reused: {first:?} -> {:?}",
        r.backends.keys()
    );
}

/// Backends on other nodes: tunnels, peers, networks and this node are written before
/// any slot points at them; a node that disappears takes its tasks out of the table
/// before its tunnels go.
#[test]
fn remote_backends_and_a_node_leaving() {
    let yaml = |with_n2: bool| {
        let n2 = if with_n2 {
            "      - {addr: 10.0.0.12, node: 192.168.1.11}\n"
        } else {
            ""
        };
        from_yaml(&format!(
            r#"underlay: eth0
node: {{addr: 192.168.1.10}}
node_addrs: [192.168.1.10]
networks: [{{name: ingress, vni: 4096, local_addr: 10.0.0.2}}]
peers: [{{addr: 192.168.1.11}}, {{addr: 192.168.1.12, stock: true}}]
services:
  - name: web
    ports: [{{published: 8080, target: 80}}]
    backends:
      - {{addr: 10.0.0.11}}
      - {{addr: 10.0.0.13, node: 192.168.1.12}}
{n2}endpoints: [{{addr: 10.0.0.11, interface: v1, mac: "02:42:0a:00:00:0b"}}]
"#
        ))
        .unwrap()
    };
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let ops = r.plan(&desired(&yaml(true), resolve).unwrap()).unwrap();
    apply_checked(&mut maps, &ops);
    assert_eq!(maps.table_backends(8080).len(), 3);
    let ops = r.plan(&desired(&yaml(false), resolve).unwrap()).unwrap();
    apply_checked(&mut maps, &ops);
    assert_eq!(maps.table_backends(8080).len(), 2);
    assert!(ops.iter().any(|o| matches!(o, Op::DelTunnel(_))));
    let kinds: Vec<_> = ops.iter().map(std::mem::discriminant).collect();
    let pos = |o: &Op| {
        kinds
            .iter()
            .position(|k| *k == std::mem::discriminant(o))
            .unwrap()
    };
    assert!(pos(&Op::PutSlots(vec![])) < pos(&Op::DelTunnel(0)));
}

#[test]
fn regions_are_reused_only_after_a_plan() {
    let mut reg = Regions::new(100);
    let a = reg.alloc(60).unwrap();
    reg.release(a, 60);
    assert_eq!(reg.alloc(60), None, "quarantined");
    reg.settle();
    assert_eq!(reg.alloc(100), Some(0), "merged back");
}

fn two_services(web: &[(&str, &str)], api: bool) -> Model {
    let mut y = String::from("node_addrs: [192.168.1.10]\nservices:\n");
    y.push_str("  - name: web\n    ports: [{published: 8080, target: 80}]\n    backends:\n");
    for (a, st) in web {
        y.push_str(&format!("      - {{addr: {a}, state: {st}}}\n"));
    }
    if api {
        y.push_str("  - name: api\n    ports: [{published: 9090, target: 80}]\n    backends: [{addr: 10.0.1.4}, {addr: 10.0.1.5}]\n");
    }
    y.push_str("endpoints:\n");
    for a in ["10.0.1.4", "10.0.1.5", "10.0.1.6"] {
        y.push_str(&format!(
            "  - {{addr: {a}, interface: v{a}, mac: \"02:42:00:00:00:01\"}}\n"
        ));
    }
    from_yaml(&y).unwrap()
}

/// A full Maglev array freezes only what does not fit: a new service with no room is
/// left out (no frontend, a shortfall the agent reports), while the one that fits keeps
/// being reconciled (a drain applied); once room is freed (and out of quarantine) the
/// left-out service is programmed.
#[test]
fn a_group_that_does_not_fit_is_left_out_and_the_rest_reconciled() {
    // Room for one 2039-slot table and not even a 251-slot one beside it.
    let slots = 2039 + 100;
    let mut r = Reconciler::new(slots);
    let mut maps = MemMaps::new(slots);
    let three = [
        ("10.0.1.4", ACTIVE),
        ("10.0.1.5", ACTIVE),
        ("10.0.1.6", ACTIVE),
    ];
    let ops = r
        .plan(&desired(&two_services(&three, false), resolve).unwrap())
        .unwrap();
    apply_checked(&mut maps, &ops);
    // api comes: 1021 slots due, 100 free.
    let ops = r
        .plan(&desired(&two_services(&three, true), resolve).unwrap())
        .unwrap();
    apply_checked(&mut maps, &ops);
    assert_eq!(
        r.shortfalls(),
        &[Shortfall {
            group: GroupName("api/tcp/80".into()),
            want: 1021,
            got: None
        }]
    );
    assert!(r.shortfalls()[0]
        .problem()
        .to_string()
        .contains("raise --maglev-slots"));
    let web = |maps: &MemMaps| maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 1000);
    assert!(web(&maps).is_some());
    assert_eq!(
        maps.lookup([192, 168, 1, 10], 9090, 6, [1, 2, 3, 4], 1000),
        None
    );
    // web's drain is still carried out.
    let drained = [
        ("10.0.1.4", "draining"),
        ("10.0.1.5", ACTIVE),
        ("10.0.1.6", ACTIVE),
    ];
    let ops = r
        .plan(&desired(&two_services(&drained, true), resolve).unwrap())
        .unwrap();
    assert!(!ops.is_empty());
    apply_checked(&mut maps, &ops);
    for sport in 0..200 {
        let b = maps
            .lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], sport)
            .unwrap();
        assert_ne!(b, "10.0.1.4:80", "a new flow to web's draining backend");
    }
    // web leaves: its region is free after this plan; api gets it in the next.
    let only_api = |api| {
        let mut m = two_services(&[], api);
        m.services.retain(|s| s.name == "api");
        desired(&m, resolve).unwrap()
    };
    apply_checked(&mut maps, &r.plan(&only_api(true)).unwrap());
    assert_eq!(r.shortfalls().len(), 1, "quarantined for one plan");
    apply_checked(&mut maps, &r.plan(&only_api(true)).unwrap());
    assert!(r.shortfalls().is_empty());
    assert!(maps
        .lookup([192, 168, 1, 10], 9090, 6, [1, 2, 3, 4], 1000)
        .is_some());
}

/// Without room for its due table a growing service gets the largest that fits (and
/// can hold its backends), and its due one once there is room.
#[test]
fn a_growing_group_gets_a_smaller_table_when_the_array_is_full() {
    let slots = 2039 + 600;
    let mut r = Reconciler::new(slots);
    let mut maps = MemMaps::new(slots);
    let m = |n: usize| {
        let addrs: Vec<String> = (0..n).map(|i| format!("10.0.1.{}", 4 + i)).collect();
        let mut y = String::from("node_addrs: [192.168.1.10]\nservices:\n  - name: web\n    ports: [{published: 8080, target: 80}]\n    backends:\n");
        for a in &addrs {
            y.push_str(&format!("      - {{addr: {a}}}\n"));
        }
        y.push_str("endpoints:\n");
        for a in &addrs {
            y.push_str(&format!(
                "  - {{addr: {a}, interface: v{a}, mac: \"02:42:00:00:00:01\"}}\n"
            ));
        }
        desired(&from_yaml(&y).unwrap(), resolve).unwrap()
    };
    // 3 backends: 2039 slots. 6 call for 4093: no room; 509 is the largest that fits
    // beside the 2039 still held.
    apply_checked(&mut maps, &r.plan(&m(3)).unwrap());
    apply_checked(&mut maps, &r.plan(&m(6)).unwrap());
    assert_eq!(
        r.shortfalls(),
        &[Shortfall {
            group: GroupName("web/tcp/80".into()),
            want: 4093,
            got: Some(2039)
        }]
    );
    let mut seen = BTreeSet::new();
    for sport in 0..600 {
        seen.insert(
            maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], sport)
                .unwrap(),
        );
    }
    assert_eq!(seen.len(), 6, "every backend takes flows: {seen:?}");
}

/// Where a spread of flows to the published port and the VIP land.
fn spread(maps: &MemMaps) -> Vec<Option<String>> {
    (0..200u16)
        .flat_map(|sport| {
            [
                maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 1000 + sport),
                maps.lookup([10, 0, 1, 2], 80, 6, [1, 2, 3, 4], 1000 + sport),
            ]
        })
        .collect()
}

#[test]
fn an_adopting_reconciler_has_nothing_to_do() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let d = desired(
        &model(&[("10.0.1.4", ACTIVE), ("10.0.1.5", "draining")]),
        resolve,
    )
    .unwrap();
    apply_checked(&mut maps, &r.plan(&d).unwrap());
    let mut adopted = Reconciler::adopt(&maps.snapshot(), &r.names(), 1 << 16);
    assert_eq!(adopted.plan(&d).unwrap(), vec![]);
    assert_eq!(adopted.names(), r.names());
}

/// An agent killed after any number of a plan's writes: the next agent adopts the
/// maps as they are (with the names saved before the writes) and converges, every
/// single write keeping the maps consistent, to what the full plan gives.
#[test]
fn adopting_a_plan_cut_short_converges() {
    let before = model(&[
        ("10.0.1.4", ACTIVE),
        ("10.0.1.5", ACTIVE),
        ("10.0.1.6", ACTIVE),
    ]);
    let after = model(&[
        ("10.0.1.4", ACTIVE),
        ("10.0.1.6", "draining"),
        ("10.0.1.7", ACTIVE),
        ("10.0.1.8", ACTIVE),
    ]);
    let (d1, d2) = (
        desired(&before, resolve).unwrap(),
        desired(&after, resolve).unwrap(),
    );
    let mut full = MemMaps::new(1 << 16);
    let mut r = Reconciler::new(1 << 16);
    apply_checked(&mut full, &r.plan(&d1).unwrap());
    let ops = r.plan(&d2).unwrap();
    apply_checked(&mut full, &ops);
    for cut in 0..=ops.len() {
        let mut maps = MemMaps::new(1 << 16);
        let mut r = Reconciler::new(1 << 16);
        apply_checked(&mut maps, &r.plan(&d1).unwrap());
        let ops = r.plan(&d2).unwrap();
        let names = r.names();
        apply_checked(&mut maps, &ops[..cut]);
        let mut adopted = Reconciler::adopt(&maps.snapshot(), &names, 1 << 16);
        apply_checked(&mut maps, &adopted.plan(&d2).unwrap());
        assert_eq!(spread(&maps), spread(&full), "cut after {cut} ops");
        assert_eq!(maps.backend_state("10.0.1.6"), Some(BackendState::Draining));
        assert_eq!(adopted.plan(&d2).unwrap(), vec![], "converged");
    }
}

#[test]
fn adopting_without_names_replaces_groups_and_never_reuses_ids() {
    let mut r = Reconciler::new(1 << 16);
    let mut maps = MemMaps::new(1 << 16);
    let d = desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap();
    apply_checked(&mut maps, &r.plan(&d).unwrap());
    let old_ids: BTreeSet<u32> = maps.snapshot().backends.keys().copied().collect();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), &Names::default(), 1 << 16);
    apply_checked(&mut maps, &adopted.plan(&d).unwrap());
    let snap = maps.snapshot();
    assert_eq!(snap.services.len(), 1, "the unnamed group was removed");
    assert!(snap.backends.keys().all(|id| !old_ids.contains(id)));
    assert_eq!(
        maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 5)
            .as_deref(),
        Some("10.0.1.4:80")
    );
}

/// Issue 19's planner property test: seeded random sequences of models (services coming
/// and going, backends joining, draining and leaving, some steps too big for a small
/// Maglev table), each planned and applied write by write. After every write every
/// frontend resolves to a live backend or to none; a service without room is left as it
/// was (its flows unchecked) or given a smaller table, the rest planned; after every step
/// a second plan has nothing to do (unless a service waits for room), and each
/// service's flows land only on its active backends (none when it has none), a removed
/// service's on nothing.
#[test]
fn random_model_sequences_keep_the_maps_consistent() {
    let mut seed = 0x6d65_7368_0019_u64;
    let mut next = move |n: u64| {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    // Room for two 2039-slot tables: most steps leave a service short of room.
    let slots = 1 << 12;
    let mut r = Reconciler::new(slots);
    let mut maps = MemMaps::new(slots);
    let (mut applied, mut refused, mut smaller, mut writes) = (0, 0, 0, 0);
    for step in 0..300 {
        // Up to 5 services, each up to 5 of 8 task addresses, active or draining.
        let mut y = String::from("node_addrs: [192.168.1.10]\nservices:\n");
        let mut want: Vec<(u16, Vec<String>)> = Vec::new();
        for s in 0..5u16 {
            if next(3) == 0 {
                continue;
            }
            let port = 8000 + s;
            y.push_str(&format!(
                "  - name: svc{s}\n    ports: [{{published: {port}, target: 80}}]\n    backends:\n"
            ));
            let mut active = Vec::new();
            for b in 0..8u64 {
                if next(8) < 3 {
                    let state = if next(4) == 0 { "draining" } else { ACTIVE };
                    y.push_str(&format!(
                        "      - {{addr: 10.0.1.{}, state: {state}}}\n",
                        4 + b
                    ));
                    if state == ACTIVE {
                        active.push(format!("10.0.1.{}:80", 4 + b));
                    }
                }
            }
            if !y.ends_with("backends:\n") {
                want.push((port, active));
            } else {
                y.push_str("      []\n");
                want.push((port, Vec::new()));
            }
        }
        y.push_str("endpoints:\n");
        for b in 0..8 {
            y.push_str(&format!(
                "  - {{addr: 10.0.1.{}, interface: v{b}, mac: \"02:42:00:00:00:01\"}}\n",
                4 + b
            ));
        }
        let d = desired(&from_yaml(&y).unwrap(), resolve).unwrap();
        let ops = r.plan(&d).unwrap_or_else(|e| panic!("step {step}: {e}"));
        writes += ops.iter().map(Op::writes).sum::<usize>();
        apply_checked(&mut maps, &ops);
        // Left as they were for want of room: checked for consistency only.
        let frozen: BTreeSet<u16> = r
            .shortfalls()
            .iter()
            .filter(|f| f.got.is_none())
            .map(|f| 8000 + f.group.0[3..4].parse::<u16>().unwrap())
            .collect();
        if !frozen.is_empty() {
            refused += 1;
        }
        if r.shortfalls().iter().any(|f| f.got.is_some()) {
            smaller += 1;
        }
        let again = r.plan(&d).unwrap();
        if frozen.is_empty() {
            assert_eq!(again, vec![], "step {step}: a second plan");
        } else {
            apply_checked(&mut maps, &again);
        }
        for port in 8000..8005u16 {
            if frozen.contains(&port) {
                continue;
            }
            let active = want.iter().find(|(p, _)| *p == port).map(|(_, a)| a);
            for sport in 0..60u16 {
                let got = maps.lookup([192, 168, 1, 10], port, 6, [1, 2, 3, 4], 1000 + sport);
                match (active, &got) {
                    (Some(a), Some(b)) => {
                        assert!(a.contains(b), "step {step}: {port} -> {b}, not in {a:?}")
                    }
                    (Some(a), None) => {
                        assert!(a.is_empty(), "step {step}: {port} -> none, with {a:?}")
                    }
                    (None, Some(b)) => panic!("step {step}: {port} (removed) -> {b}"),
                    (None, None) => {}
                }
            }
        }
        applied += 1;
    }
    assert!(
        refused > 10 && smaller > 10,
        "{refused} with a service left as it was, {smaller} with a smaller table"
    );
    println!(
        "planner: 300 random steps on a {slots}-slot array, {applied} applied ({writes} writes, \
         each checked): {refused} with a service left as it was for want of room, {smaller} \
         with a smaller table"
    );
}
