//! The agent's state directory, which meshctl also reads: where each file of a mesh pinned
//! at a bpffs directory lives (`<state-dir>/<pins>.names.json`, `.status.json`), what the
//! status file says, and which live process wrote it.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;

use crate::{plan::Names, source::swarm::Draining};

/// Where the agent keeps the names the maps cannot hold, for a mesh pinned at `bpffs`.
pub fn names_path(state_dir: &Path, bpffs: &Path) -> std::path::PathBuf {
    state_file(state_dir, bpffs, "names")
}

/// Where the agent says how it is doing (rewritten after every reconcile).
pub fn status_path(state_dir: &Path, bpffs: &Path) -> std::path::PathBuf {
    state_file(state_dir, bpffs, "status")
}

/// Where the agent keeps the backends draining because they left (so that a restarted
/// agent finishes their drains).
pub fn draining_path(state_dir: &Path, bpffs: &Path) -> std::path::PathBuf {
    state_file(state_dir, bpffs, "draining")
}

/// Every file of the state directory for the mesh pinned at `bpffs` (`--uninstall`
/// removes them).
pub fn all_paths(state_dir: &Path, bpffs: &Path) -> [std::path::PathBuf; 3] {
    [
        names_path(state_dir, bpffs),
        status_path(state_dir, bpffs),
        draining_path(state_dir, bpffs),
    ]
}

/// The drains in progress, as the state directory keeps them: read once at start,
/// written when the set of draining backends changes.
pub struct DrainFile {
    path: std::path::PathBuf,
    written: Option<Vec<(String, std::net::Ipv4Addr)>>,
}

impl DrainFile {
    /// The file at `path` and the drains it holds (none when it is missing or unreadable:
    /// a drain then ends early, as before the file existed).
    pub fn open(path: std::path::PathBuf) -> (Self, Vec<Draining>) {
        let drains = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        (
            DrainFile {
                path,
                written: None,
            },
            drains,
        )
    }

    /// Records `drains` if they are not the ones last written. Best effort: a file that
    /// cannot be written costs only a restart's drains, and is said once per change.
    pub fn save(&mut self, drains: &[Draining]) {
        let keys: Vec<_> = drains
            .iter()
            .map(|d| (d.service.clone(), d.backend.addr))
            .collect();
        if self.written.as_ref() == Some(&keys) {
            return;
        }
        let json = serde_json::to_vec(drains).expect("drains serialize");
        if let Err(e) = crate::host::files::write_atomic(&self.path, &json) {
            tracing::warn!(
                "could not record the drains in {}: {e}",
                self.path.display()
            );
        }
        self.written = Some(keys);
    }
}

fn state_file(state_dir: &Path, bpffs: &Path, what: &str) -> std::path::PathBuf {
    let tag = bpffs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mesh".into());
    state_dir.join(format!("{tag}.{what}.json"))
}

/// What the agent last said in its status file (for the mesh pinned at `bpffs`).
pub fn agent_status(state_dir: &Path, bpffs: &Path) -> Option<AgentStatus> {
    std::fs::read(status_path(state_dir, bpffs))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Every service the maps pinned at `bpffs` hold, named and with its traffic.
/// This process's PID namespace (inode of /proc/self/ns/pid; 0 if unreadable).
pub fn own_pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// The live mesh-agent that wrote `st`, as a PID of this PID namespace: the recorded PID
/// if the agent shares our namespace, else (an agent in a container) the process whose
/// innermost PID and namespace match. A reused PID is some other program: None.
pub fn live_agent_pid(st: &AgentStatus) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let is_agent = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "mesh-agent")
    };
    if st.pid_ns == 0 || st.pid_ns == own_pid_ns() {
        return is_agent(&st.pid.to_string()).then_some(st.pid);
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let pid: u32 = name.parse().ok()?;
        if !is_agent(&name) {
            return None;
        }
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?.ino();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        (ns == st.pid_ns && innermost_pid(&status) == Some(st.pid)).then_some(pid)
    })
}

/// The last PID of /proc/PID/status's `NSpid:` line (the PID in the innermost namespace).
fn innermost_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[cfg(test)]
#[test]
fn the_innermost_pid_is_the_last_of_nspid() {
    assert_eq!(
        innermost_pid("Name:\tmesh-agent\nNSpid:\t48211\t1\n"),
        Some(1)
    );
    assert_eq!(innermost_pid("NSpid:\t77\n"), Some(77));
    assert_eq!(innermost_pid("Name:\tx\n"), None);
}
/// What the agent writes to its status file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct AgentStatus {
    /// In the agent's own PID namespace (1 when it is a container's entrypoint).
    pub pid: u32,
    /// That PID namespace (inode of /proc/self/ns/pid), to find the agent from another.
    #[serde(default)]
    pub pid_ns: u64,
    pub started_unix: f64,
    pub last_reconcile_unix: f64,
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub events: u64,
    /// Docker event -> maps written, recent quantiles, seconds.
    pub event_lag_p50_s: Option<f64>,
    pub event_lag_p99_s: Option<f64>,
    /// "docker" or "config".
    pub source: String,
    /// The agent's VXLAN data-path port.
    #[serde(default)]
    pub data_path_port: u16,
    /// How a --data-path-port that differs from the swarm's was overruled.
    #[serde(default)]
    pub data_path_port_mismatch: Option<String>,
    /// The Docker socket it follows (with `source` docker).
    #[serde(default)]
    pub docker: String,
    /// Where it serves its peers (and `meshctl trace --node`); 0: nowhere.
    #[serde(default)]
    pub peer_port: u16,
    /// Docker's task names by task address, for meshctl's tables.
    #[serde(default)]
    pub tasks: BTreeMap<String, String>,
    /// What the agent last wrote: backends by service (`addr:port`, port 0 for every
    /// port), which `meshctl doctor` compares with the maps.
    #[serde(default)]
    pub applied: BTreeMap<String, Vec<String>>,
    /// Docker's IPVS mesh as the agent last saw it (with `source` docker).
    #[serde(default)]
    pub docker_mesh: Option<crate::host::ipvs::DockerMesh>,
    /// The host port, when on: where the socket programs are attached, its address,
    /// how many network namespaces are in its scope.
    #[serde(default)]
    pub host_ports: Option<HostPortsStatus>,
    /// The kernel's release (`uname -r`) where the agent loaded the datapath.
    #[serde(default)]
    pub kernel: String,
    /// What that kernel lacks and what the mesh does instead (empty: nothing).
    #[serde(default)]
    pub fallbacks: Vec<crate::datapath::features::Fallback>,
    /// What the model asks for that the agent left out, and why (empty: nothing).
    #[serde(default)]
    pub problems: Vec<crate::model::Problem>,
    /// The swarm's nodes that run no mesh agent (stock Docker), by underlay address.
    #[serde(default)]
    pub stock_peers: Vec<String>,
    /// Published ports a process of this node also listens on (as far as the agent's
    /// PID namespace shows their owners).
    #[serde(default)]
    pub ports_in_use: Vec<crate::host::listeners::PortInUse>,
    /// The ports this node publishes, "8080/tcp" -> "service ingress|host" (for
    /// `meshctl doctor`).
    #[serde(default)]
    pub published: BTreeMap<String, String>,
}

/// The host port as the status file records it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct HostPortsStatus {
    pub cgroup: String,
    pub host_addr: String,
    pub namespaces: usize,
}
/// The saved names (empty when the file is missing: services then show by id).
pub fn read_names(path: &Path) -> Names {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
#[test]
fn the_names_file_sits_next_to_the_state_of_its_pins() {
    assert_eq!(
        names_path(Path::new("/run/mesh"), Path::new("/sys/fs/bpf/mesh-n1")),
        Path::new("/run/mesh/mesh-n1.names.json")
    );
}
