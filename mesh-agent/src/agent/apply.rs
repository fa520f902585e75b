//! One apply: the model into the maps through the reconciler, the links to follow the
//! tasks' veths, the problems and the port owners reported, the status file written.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use aya::programs::XdpMode;

use crate::{datapath::pins::Hook, host::preflight, model};

use super::runtime::*;

impl Agent {
    /// Says once what the model asked for that cannot be programmed (the rest is
    /// applied), and once when it is programmed again.
    pub(super) fn report_problems(&mut self) {
        let now: Vec<model::Problem> = self.mesh.problems().to_vec();
        for p in now.iter().filter(|p| !self.status.problems.contains(p)) {
            tracing::error!(service = %p.service, "{p}; every other service is applied");
        }
        for p in self.status.problems.iter().filter(|p| !now.contains(p)) {
            tracing::info!(service = %p.service, "{}: no longer left out", p.left_out);
        }
        self.metrics.lock().expect("metrics").problems = now.clone();
        self.status.problems = now;
    }

    /// Finds published ports that a process of this node also listens on, and says
    /// so once each (and once when they are free again). Owners are looked up only
    /// when the listening sockets on published ports change.
    pub(super) fn check_ports(&mut self, model: &model::Model) {
        use crate::host::listeners;
        let published = listeners::published(model, self.mesh.claims());
        let proc = Path::new("/proc");
        let listening: Vec<listeners::Listener> = listeners::listeners(proc)
            .into_iter()
            .filter(|l| published.contains_key(&(l.protocol, l.port)))
            .collect();
        let inodes: BTreeSet<u64> = listening.iter().map(|l| l.inode).collect();
        if inodes != self.port_owners.0 {
            self.port_owners = (inodes.clone(), listeners::owners(proc, &inodes));
        }
        let now = listeners::in_use(&published, &listening, &self.port_owners.1, false);
        for p in now.iter().filter(|p| !self.status.ports_in_use.contains(p)) {
            tracing::error!(port = p.port, service = %p.service, "{p}");
        }
        for p in self.status.ports_in_use.iter().filter(|p| !now.contains(p)) {
            tracing::info!(port = p.port, service = %p.service, "port {} no longer shared with {}", p.port, p.process);
        }
        self.metrics.lock().expect("metrics").ports_in_use = now.clone();
        self.status.ports_in_use = now;
        self.status.published = published
            .into_iter()
            .map(|((proto, port), (svc, mode))| {
                let mode = if mode == model::PublishMode::Host {
                    "host"
                } else {
                    "ingress"
                };
                (
                    format!("{port}/{}", format!("{proto:?}").to_lowercase()),
                    format!("{svc} {mode}"),
                )
            })
            .collect();
    }

    /// Attaches the task program to new endpoints' interfaces, applies the model, and
    /// detaches from interfaces that no longer hold a task.
    pub(super) fn apply(
        &mut self,
        model: &model::Model,
        event: Option<SystemTime>,
    ) -> anyhow::Result<()> {
        let t0 = Instant::now();
        for ep in &model.endpoints {
            if !self.attached.contains(&ep.interface) {
                self.mesh.dp.attach_pinned(
                    Hook::TcTask,
                    &ep.interface,
                    &self.pins,
                    XdpMode::default(),
                )?;
                self.attached.insert(ep.interface.clone());
            }
        }
        self.attach_overlay(&model.overlay_ports);
        if let Some(h) = &self.host {
            self.mesh.extra_node_addrs = h.node_addrs();
        }
        let a = self.mesh.apply(model)?;
        self.report_problems();
        self.check_ports(model);
        self.status.stock_peers = model
            .peers
            .iter()
            .filter(|p| p.stock)
            .map(|p| p.addr.to_string())
            .collect();
        if let Some(h) = &mut self.host {
            let dirs: Vec<PathBuf> = self.docker_netns.iter().cloned().collect();
            let ns = crate::host::hostport::namespaces(&dirs, &self.host_netns);
            h.sync(
                &mut self.mesh.dp,
                &ns,
                &crate::host::hostport::port_vips(model),
            )?;
            self.status.host_ports = Some(crate::agent::state::HostPortsStatus {
                cgroup: h.cgroup.display().to_string(),
                host_addr: h.host_addr.to_string(),
                namespaces: h.scope_len(),
            });
        }
        if let Some(dir) = &self.docker_netns {
            let d = crate::host::ipvs::detect(Path::new("/sys"), dir);
            if d.active() && self.status.docker_mesh.as_ref().is_none_or(|p| !p.active()) {
                tracing::warn!(
                    ipvs_services = d.ipvs_services,
                    "Docker's IPVS mesh is also active on this node: the mesh's hooks see \
                     published-port and VIP traffic first, so Docker's rules stay unused; \
                     `meshctl doctor` lists the ports; bootstrap-node.sh --keep-ipvs-off \
                     keeps ip_vs from loading"
                );
            }
            self.status.docker_mesh = Some(d);
        }
        let want: BTreeSet<&String> = model.endpoints.iter().map(|e| &e.interface).collect();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|i| !want.contains(i))
            .cloned()
            .collect();
        for i in gone {
            // After the maps stopped pointing at it; the veth may already be gone.
            if let Ok(ix) = preflight::ifindex(&i) {
                self.pins.unpin(&self.pins.link(Hook::TcTask, ix))?;
            }
            self.attached.remove(&i);
        }
        let want: BTreeSet<&model::OverlayPortSpec> = model.overlay_ports.iter().collect();
        self.overlay.retain(|p, _| want.contains(p));
        self.prune_task_links()?;
        // The planner's backends, read once for the metrics' names and the status
        // file's record (which `meshctl doctor` compares with the maps).
        let stale = a.ops > 0
            || self.status.applied.is_empty()
            || self
                .metrics
                .lock()
                .expect("metrics")
                .backend_names
                .is_empty();
        let names = stale.then(|| self.mesh.backend_names());
        if let Some(n) = &names {
            let mut applied: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (group, addr, port) in n.values() {
                applied
                    .entry(group.clone())
                    .or_default()
                    .push(format!("{addr}:{port}"));
            }
            self.status.applied = applied;
        }
        let mut m = self.metrics.lock().expect("metrics");
        if let Some(n) = names {
            m.backend_names = n;
        }
        m.reconciles += 1;
        m.map_writes += a.writes as u64;
        m.reconcile_seconds.observe(t0.elapsed());
        m.services = model.services.len() as u64;
        m.backends = model.services.iter().map(|s| s.backends.len() as u64).sum();
        m.endpoints = model.endpoints.len() as u64;
        m.last_reconcile_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.status.last_reconcile_unix = m.last_reconcile_unix;
        if a.ops > 0 || self.status.tasks.is_empty() {
            self.status.tasks = model
                .services
                .iter()
                .flat_map(|s| &s.backends)
                .filter_map(|b| Some((b.addr.to_string(), b.task.clone()?)))
                .collect();
        }
        self.status.reconciles = m.reconciles;
        self.status.reconcile_errors = m.reconcile_errors;
        self.status.events = m.events;
        // Best effort: a status file that cannot be written costs only meshctl's view.
        if let Ok(text) = serde_json::to_vec(&self.status) {
            let _ = crate::host::files::write_atomic(&self.status_file, &text);
        }
        if let Some(at) = event {
            let lag = SystemTime::now().duration_since(at).unwrap_or_default();
            m.event_lag_seconds.observe(lag);
            self.status.event_lag_p50_s = m.event_lag_seconds.quantile(0.5);
            self.status.event_lag_p99_s = m.event_lag_seconds.quantile(0.99);
            tracing::debug!(
                lag_ms = lag.as_secs_f64() * 1e3,
                ops = a.ops,
                "event applied"
            );
        }
        if a.ops > 0 && tracing::enabled!(tracing::Level::DEBUG) {
            for s in &model.services {
                let b: Vec<String> = s
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}{}",
                            b.addr,
                            if b.state == model::Health::Active {
                                ""
                            } else {
                                "(draining)"
                            }
                        )
                    })
                    .collect();
                tracing::debug!(service = %s.name, backends = %b.join(" "), "backends");
            }
        }
        if a.ops > 0 {
            tracing::info!(
                services = model.services.len(),
                endpoints = model.endpoints.len(),
                ops = a.ops,
                writes = a.writes,
                "model applied"
            );
        }
        Ok(())
    }

    /// Attaches the overlay hooks to new overlay veths of tasks. A veth that cannot be
    /// attached (its task is going away) is reported and tried again next time: it must
    /// not hold up the rest of the model.
    pub(super) fn attach_overlay(&mut self, ports: &[model::OverlayPortSpec]) {
        for p in ports {
            if self.overlay.contains_key(p) {
                continue;
            }
            let mut paths = Vec::new();
            for hook in [Hook::TcOverlayIn, Hook::TcOverlayOut] {
                match self
                    .mesh
                    .dp
                    .attach_pinned_in(hook, &p.netns, &p.interface, &self.pins)
                {
                    Ok(path) => paths.push(path),
                    Err(e) => tracing::warn!(
                        netns = %p.netns.display(),
                        interface = %p.interface,
                        "overlay veth not attached yet: {e}"
                    ),
                }
            }
            if paths.len() == 2 {
                self.overlay.insert(p.clone(), paths);
            } else {
                for path in paths {
                    let _ = self.pins.unpin(&path);
                }
            }
        }
    }

    /// Unpins task links whose interface is gone or holds no task now: never a program
    /// left on a vanished interface.
    pub(super) fn prune_task_links(&mut self) -> anyhow::Result<()> {
        let keep: BTreeSet<u32> = self
            .attached
            .iter()
            .filter_map(|i| preflight::ifindex(i).ok())
            .collect();
        for l in self.pins.links() {
            if l.hook == Hook::TcTask && !keep.contains(&l.ifindex) {
                self.pins.unpin(&l.path)?;
            }
        }
        let keep: BTreeSet<&PathBuf> = self.overlay.values().flatten().collect();
        for l in self.pins.links() {
            if l.hook.overlay() && !keep.contains(&l.path) {
                self.pins.unpin(&l.path)?;
            }
        }
        Ok(())
    }
}
