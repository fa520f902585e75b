//! Any answer a peer gives to the agents' exchange: decoded as the agent decodes it
//! and, when it is a report, carried into a node's model as the agent carries one (a
//! manager's labels, published ports and protocols; a node's unhealthy tasks; a
//! manager's stopping tasks) and on through the planner to the maps. A report must
//! never panic the agent or leave its maps inconsistent, and decoding what it encodes
//! gives the same report.
#![no_main]

use std::{collections::BTreeMap, collections::BTreeSet, net::Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    model::from_yaml,
    source::{
        peers::{credible, decode, manager_facts, unseen},
        swarm::{apply_labels, apply_published},
    },
};

/// A node (10.0.0.1, a manager) with a service of three tasks, one of them local.
const NODE: &str = "
underlay: eth0
node_addrs: [10.0.0.1]
peers: [{addr: 10.0.0.2}, {addr: 10.0.0.3}]
node: {addr: 10.0.0.1}
networks: [{name: ingress, vni: 4096, local_addr: 10.255.0.2}]
services:
  - name: web
    ports: [{published: 8080, target: 80}]
    backends:
      - {addr: 10.255.0.5}
      - {addr: 10.255.0.6, node: 10.0.0.2, network: ingress}
      - {addr: 10.255.0.7, node: 10.0.0.3, network: ingress}
endpoints:
  - {addr: 10.255.0.5, interface: veth5, mac: '02:42:0a:ff:00:05'}
";

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let Some(report) = decode(body) else { return };
    let again = decode(&serde_json::to_string(&report).expect("a report encodes"));
    assert_eq!(again.as_ref(), Some(&report), "decode(encode(r)) != r");

    let mut model = from_yaml(NODE).expect("the fixed node's model reads");
    let manager: Ipv4Addr = "10.0.0.1".parse().unwrap();
    let reports = BTreeMap::from([(manager, report)]);
    let managers = BTreeSet::from([manager]);
    let tasks = BTreeMap::from([("t5".to_string(), vec!["10.255.0.5".parse().unwrap()])]);
    if let Some(facts) = manager_facts(&reports, &managers) {
        apply_published(&mut model, &facts);
        apply_labels(&mut model, &facts.labels);
    }
    let (sick, stopping) = credible(&model, &reports, &managers, &tasks);
    let _ = unseen(&model, &reports);
    for b in model.services.iter_mut().flat_map(|s| &mut s.backends) {
        if sick.contains(&b.addr) || stopping.contains(&b.addr) {
            b.state = mesh_agent::model::Health::Draining;
        }
    }
    mesh_fuzz::through_the_planner(&[model]);
});
