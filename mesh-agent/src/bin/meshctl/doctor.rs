//! `meshctl doctor`: the checks of what commonly breaks a mesh, and `--fix`.

use super::*;

/// One check of `meshctl doctor`.
#[derive(serde::Serialize)]
pub(crate) struct Check {
    check: &'static str,
    /// ok, warn or fail.
    result: &'static str,
    detail: String,
}

pub(crate) fn check(check: &'static str, result: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        result,
        detail: detail.into(),
    }
}

pub(crate) fn doctor(
    args: &Args,
    fix: bool,
    docker: &str,
    ask_docker: bool,
) -> anyhow::Result<i32> {
    let mut checks = diagnose(args, docker, ask_docker);
    if fix {
        let st = agent_status(args);
        let (Some(st), Some(pid)) = (
            st.clone(),
            st.as_ref().and_then(mesh_agent::inspect::live_agent_pid),
        ) else {
            anyhow::bail!(
                "--fix asks the agent to repair, and no agent is running: start mesh-agent"
            );
        };
        let before = st.last_reconcile_unix;
        // SAFETY: a signal to the running mesh-agent named in its own status file (its
        // command name checked just above).
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        let t = Instant::now();
        // The agent re-reads the maps on the signal and reconciles on its next turn.
        while t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(200));
            if agent_status(args).is_some_and(|s| s.last_reconcile_unix > before + 0.0) {
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
        }
        checks = diagnose(args, docker, ask_docker);
    }
    let failed = checks.iter().any(|c| c.result == "fail");
    if args.json {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let mark = match c.result {
                "ok" => "ok  ",
                "warn" => "WARN",
                _ => "FAIL",
            };
            println!("{mark} {:<16} {}", c.check, c.detail);
        }
    }
    Ok(if failed { 5 } else { 0 })
}

/// The kernel the agent loaded on, and the fallbacks in force there: expected on an
/// older kernel (ok), a warning where they were forced (tests, not production).
pub(crate) fn kernel_check(st: &inspect::AgentStatus) -> Check {
    use mesh_agent::features::Why;
    let kernel = if st.kernel.is_empty() {
        "this kernel".to_string()
    } else {
        format!("Linux {}", st.kernel)
    };
    if st.fallbacks.is_empty() {
        return check(
            "kernel",
            "ok",
            format!("{kernel}: every feature the datapath uses, no fallback in force"),
        );
    }
    let list = st
        .fallbacks
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if st.fallbacks.iter().any(|f| f.why == Why::Forced) {
        check(
            "kernel",
            "warn",
            format!(
                "{kernel}: fallbacks in force: {list}; forced ones come from \
                 MESH_FORCE_FALLBACKS or --tc-attach netlink (for tests)"
            ),
        )
    } else {
        check(
            "kernel",
            "ok",
            format!("{kernel}: fallbacks in force: {list}"),
        )
    }
}

/// Published ports that a process of this node also listens on: looked up here (meshctl
/// on the host sees every process) and as the agent saw them.
pub(crate) fn ports_check(st: &inspect::AgentStatus) -> Check {
    use mesh_agent::{listeners, model::Protocol};
    let published: listeners::Published = st
        .published
        .iter()
        .filter_map(|(k, v)| {
            let (port, proto) = k.split_once('/')?;
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            let (svc, mode) = v.split_once(' ').unwrap_or((v, "ingress"));
            let mode = if mode == "host" {
                mesh_agent::model::PublishMode::Host
            } else {
                mesh_agent::model::PublishMode::Ingress
            };
            Some(((proto, port.parse().ok()?), (svc.to_string(), mode)))
        })
        .collect();
    let mut found = listeners::scan(std::path::Path::new("/proc"), &published);
    for p in &st.ports_in_use {
        if !found
            .iter()
            .any(|f| f.port == p.port && f.protocol == p.protocol)
        {
            found.push(p.clone());
        }
    }
    if found.is_empty() {
        return check(
            "ports",
            "ok",
            format!(
                "no process of this node listens on the {} published ports",
                published.len()
            ),
        );
    }
    let list = found
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    check("ports", "fail", list)
}

/// What the agent left out of the model (every other service is applied).
pub(crate) fn model_check(st: &inspect::AgentStatus) -> Check {
    if st.problems.is_empty() {
        return check("model", "ok", "every service in the model is programmed");
    }
    let list = st
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    check(
        "model",
        "fail",
        format!("left out (every other service is applied): {list}"),
    )
}

pub(crate) fn diagnose(args: &Args, docker: &str, ask_docker: bool) -> Vec<Check> {
    let mut out = Vec::new();
    let pins = PinDir::new(&args.bpffs);
    let bpffs_root = args.bpffs.parent().unwrap_or(&args.bpffs);
    out.push(if preflight::on_bpffs(bpffs_root) {
        check(
            "bpffs",
            "ok",
            format!("{} is a bpffs", bpffs_root.display()),
        )
    } else {
        check(
            "bpffs",
            "fail",
            format!(
                "{} is not a bpffs: `mount -t bpf bpf {}`",
                bpffs_root.display(),
                bpffs_root.display()
            ),
        )
    });
    if !pins.has_maps() {
        out.push(check(
            "maps",
            "fail",
            format!(
                "no mesh is pinned at {}: is mesh-agent running?",
                args.bpffs.display()
            ),
        ));
        return out;
    }
    let missing: Vec<&str> = mesh_agent::pins::PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !pins.map(m).exists())
        .collect();
    out.push(if missing.is_empty() {
        check(
            "maps",
            "ok",
            format!("layout v{}, every map pinned", mesh_common::LAYOUT_VERSION),
        )
    } else {
        check(
            "maps",
            "fail",
            format!(
                "missing: {} (mesh-agent --uninstall, then start it)",
                missing.join(", ")
            ),
        )
    });
    let st = agent_status(args);
    let live = st.as_ref().and_then(mesh_agent::inspect::live_agent_pid);
    let running = live.is_some();
    out.push(if running {
        check(
            "agent",
            "ok",
            format!("running, pid {}", live.unwrap_or_default()),
        )
    } else {
        check(
            "agent",
            "fail",
            "not running: the pinned datapath forwards what it was last told; start mesh-agent",
        )
    });
    if let Some(st) = &st {
        out.push(kernel_check(st));
        out.push(model_check(st));
        out.push(ports_check(st));
        out.push(match &st.data_path_port_mismatch {
            Some(m) => check("data-path port", "warn", m.clone()),
            None => check("data-path port", "ok", format!("{}/udp", st.data_path_port)),
        });
    }
    // Programs where the maps say traffic arrives and tasks live (a netlink filter's
    // record counts only while the kernel still runs the mesh's program there).
    let snap = mesh_agent::maps::read_pinned(&args.bpffs).ok();
    let links: Vec<mesh_agent::pins::LinkPin> = pins
        .links()
        .into_iter()
        .filter(|l| {
            l.kind == mesh_agent::pins::LinkKind::Link || l.program_id().ok().flatten().is_some()
        })
        .collect();
    let has = |hook: mesh_agent::pins::Hook, ix: u32| {
        links
            .iter()
            .any(|l| l.hook == hook && l.netns == 0 && l.ifindex == ix)
    };
    let underlay = snap
        .as_ref()
        .and_then(|s| s.local)
        .map(|l| l.ifindex)
        .or_else(|| {
            links
                .iter()
                .find(|l| l.hook == mesh_agent::pins::Hook::TcUnderlay)
                .map(|l| l.ifindex)
        });
    match underlay {
        Some(ix)
            if has(mesh_agent::pins::Hook::TcUnderlay, ix) && preflight::ifname(ix).is_some() =>
        {
            out.push(check(
                "underlay",
                "ok",
                format!(
                    "mesh_tc_ingress on {}",
                    preflight::ifname(ix).unwrap_or_default()
                ),
            ))
        }
        Some(ix) => out.push(check(
            "underlay",
            "fail",
            format!(
                "no mesh_tc_ingress on the underlay ({}): published ports and the overlay do \
                 not work here; restart mesh-agent",
                preflight::ifname(ix).unwrap_or_else(|| format!("ifindex {ix}, gone"))
            ),
        )),
        None => out.push(check(
            "underlay",
            "fail",
            "no underlay program pinned: restart mesh-agent",
        )),
    }
    if let Some(snap) = &snap {
        let bare: Vec<String> = snap
            .endpoints
            .iter()
            .filter(|(_, ep)| !has(mesh_agent::pins::Hook::TcTask, ep.ifindex))
            .map(|(a, ep)| {
                format!(
                    "{} ({})",
                    preflight::ifname(ep.ifindex)
                        .unwrap_or_else(|| format!("ifindex {}", ep.ifindex)),
                    std::net::Ipv4Addr::from(a.to_ne_bytes())
                )
            })
            .collect();
        out.push(if bare.is_empty() {
            check("tasks", "ok", format!("mesh_tc_task on all {} local task veths", snap.endpoints.len()))
        } else {
            check(
                "tasks",
                "fail",
                format!(
                    "no mesh_tc_task on {}: their replies are not translated (meshctl doctor --fix)",
                    bare.join(", ")
                ),
            )
        });
        // MTU: what the underlay leaves for Docker's overlays (VXLAN takes 50 bytes).
        if let Some(name) = underlay.and_then(preflight::ifname) {
            let mtu = mesh_agent::netdev::mtu(&name);
            out.push(match mtu {
                Some(m) if m >= 1500 => check(
                    "mtu",
                    "ok",
                    format!(
                        "{name} MTU {m}: room for overlays of {} (Docker's default 1450)",
                        m - 50
                    ),
                ),
                Some(m) => check(
                    "mtu",
                    "warn",
                    format!(
                        "{name} MTU {m} leaves {} for overlays, below Docker's default 1450: \
                         create overlays with --opt com.docker.network.driver.mtu={}",
                        m.saturating_sub(50),
                        m.saturating_sub(50)
                    ),
                ),
                None => check("mtu", "warn", format!("cannot read {name}'s MTU")),
            });
        }
    }
    // The data-path port: another socket on it, or a firewall rule dropping it.
    let port = st
        .as_ref()
        .map(|s| s.data_path_port)
        .filter(|p| *p != 0)
        .unwrap_or(4789);
    // A process's socket on the port; the kernel's own (Docker's vxlan devices) are
    // expected on a swarm node.
    let holders: Vec<(u32, String)> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| inspect::udp_port_holders(&t, port))
        .flat_map(inspect::socket_owners)
        .collect();
    out.push(if holders.is_empty() {
        check(
            "data-path port",
            "ok",
            format!("UDP {port}: no process holds it"),
        )
    } else {
        check(
            "data-path port",
            "fail",
            format!(
                "UDP {port} is held by {}: another VXLAN user (Calico, NSX, ...) clashes with \
                 the mesh; free it or use another --data-path-port",
                holders
                    .iter()
                    .map(|(pid, comm)| format!("{comm} (pid {pid})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    });
    if let Ok(o) = std::process::Command::new("iptables")
        .args(["-S", "INPUT"])
        .output()
    {
        let rules = String::from_utf8_lossy(&o.stdout);
        let dropped: Vec<&str> = rules
            .lines()
            .filter(|l| {
                l.contains("-p udp")
                    && l.contains(&format!("--dport {port}"))
                    && (l.contains("-j DROP") || l.contains("-j REJECT"))
            })
            .collect();
        if !dropped.is_empty() {
            out.push(check(
                "firewall",
                "warn",
                format!("iptables drops UDP {port} on INPUT ({}): Docker's own overlay traffic will not arrive", dropped.join("; ")),
            ));
        }
    }
    // Docker's IPVS mesh, as the agent saw it (it knows where Docker's namespaces are),
    // else as seen from here; and what the mesh holds.
    let dm = st
        .as_ref()
        .and_then(|s| s.docker_mesh.clone())
        .unwrap_or_else(|| {
            mesh_agent::ipvs::detect(
                std::path::Path::new("/sys"),
                std::path::Path::new("/var/run/docker/netns"),
            )
        });
    let (mut ports, mut vips) = (Vec::new(), Vec::new());
    if let Some(snap) = &snap {
        for k in snap.frontends.keys() {
            let proto = match k.proto {
                mesh_common::proto::IPPROTO_TCP => "tcp",
                mesh_common::proto::IPPROTO_UDP => "udp",
                _ => "any",
            };
            if k.addr == 0 {
                ports.push(format!("{}/{proto}", u16::from_be(k.port)));
            } else {
                vips.push(std::net::Ipv4Addr::from(u32::from_be(k.addr)).to_string());
            }
        }
    }
    ports.sort();
    ports.dedup();
    vips.sort();
    vips.dedup();
    let (fine, line) = mesh_agent::ipvs::ownership(&dm, &ports, &vips);
    out.push(check("ipvs", if fine { "ok" } else { "warn" }, line));
    if let Some(st) = &st {
        let have: Vec<mesh_agent::pins::Hook> = links.iter().map(|l| l.hook).collect();
        let want = mesh_agent::pins::Hook::SOCK
            .into_iter()
            .chain([mesh_agent::pins::Hook::TcHost]);
        let missing: Vec<&str> = want
            .filter(|h| !have.contains(h))
            .map(|h| h.name())
            .collect();
        out.push(match (&st.host_ports, missing.is_empty()) {
            (Some(h), true) => check(
                "host ports",
                "ok",
                format!(
                    "the node's own sockets and its containers' ({} namespaces) reach published \
                     ports: socket programs on {}, host port {} ({})",
                    h.namespaces,
                    h.cgroup,
                    mesh_agent::hostport::HOST_DEV,
                    h.host_addr
                ),
            ),
            (Some(_), false) => check(
                "host ports",
                "fail",
                format!(
                    "{} not attached: published ports do not answer from this node; restart \
                     mesh-agent",
                    missing.join(", ")
                ),
            ),
            (None, _) if st.fallbacks.iter().any(|f| f.feature == "netns_cookie") => check(
                "host ports",
                "warn",
                "off: this kernel has no SO_NETNS_COOKIE (Linux 5.14), which the socket \
                 programs' scope needs: published ports answer from other hosts only, not \
                 from this node or its containers",
            ),
            (None, _) => check(
                "host ports",
                "warn",
                "off (mesh-agent --host-ports off): published ports answer from other hosts \
                 only, not from this node or its containers",
            ),
        });
    }
    if ask_docker || st.as_ref().is_none_or(|s| s.source == "docker") {
        out.push(docker_check(docker));
    }
    if let Some(st) = &st {
        let views = all_services(args).unwrap_or_default();
        let d = inspect::drift(&st.applied, &views);
        out.push(if d.is_empty() {
            check(
                "drift",
                "ok",
                format!(
                    "the maps hold what the agent wrote ({} services)",
                    views.len()
                ),
            )
        } else {
            check(
                "drift",
                "fail",
                d.iter()
                    .map(|x| {
                        format!(
                            "{}: missing [{}] extra [{}]",
                            x.service,
                            x.missing.join(" "),
                            x.extra.join(" ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " (meshctl doctor --fix)",
            )
        });
    }
    out
}

/// Docker reachable, and in swarm mode.
pub(crate) fn docker_check(socket: &str) -> Check {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return check("docker", "warn", format!("cannot ask Docker: {e}")),
    };
    rt.block_on(async {
        let docker = match mesh_agent::docker::connect(socket).await {
            Ok(d) => d,
            Err(e) => return check("docker", "fail", format!("{socket}: {e}")),
        };
        match tokio::time::timeout(Duration::from_secs(5), docker.info()).await {
            Ok(Ok(info)) => {
                let state = info
                    .swarm
                    .and_then(|s| s.local_node_state)
                    .map(|s| format!("{s:?}").to_lowercase())
                    .unwrap_or_default();
                if state == "active" {
                    check("docker", "ok", format!("{socket}: swarm active"))
                } else {
                    check(
                        "docker",
                        "fail",
                        format!(
                            "{socket}: not in a swarm ({state}): `docker swarm init` or `join`"
                        ),
                    )
                }
            }
            Ok(Err(e)) => check("docker", "fail", format!("{socket}: {e}")),
            Err(_) => check("docker", "fail", format!("{socket}: no answer in 5 s")),
        }
    })
}
