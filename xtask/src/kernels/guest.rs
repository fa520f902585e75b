//! One guest: qemu with TCG (this machine's /dev/kvm cannot boot a stock kernel), no
//! network device, the host's root as a read-only 9p share and the run's directory as a
//! writable one. Its console goes to `console.log` in that directory; the guest's own
//! status lines are printed as they come. Killed (by the PID we started) at its deadline.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use super::debian::Kernel;
use crate::cmd::root;

pub struct Guest<'a> {
    pub kernel: &'a Kernel,
    pub initramfs: PathBuf,
    /// Shared with the guest (writable): steps.sh in, results and logs out.
    pub run_dir: PathBuf,
    pub timeout: Duration,
}

pub struct Ran {
    pub wall: Duration,
    pub timed_out: bool,
}

impl Guest<'_> {
    pub fn run(&self) -> anyhow::Result<Ran> {
        let share = |id: &str, path: &Path, ro: bool| {
            [
                "-fsdev".to_string(),
                format!(
                    "local,id={id},path={},security_model=none,multidevs=remap{}",
                    path.display(),
                    if ro { ",readonly=on" } else { "" }
                ),
                "-device".to_string(),
                format!("virtio-9p-pci,fsdev={id},mount_tag={id}"),
            ]
        };
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-cpu",
            "max,la57=off",
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args([
            "-nodefaults",
            "-nic",
            "none",
            "-vga",
            "none",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&self.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&self.initramfs)
        // The checkout is shared on its own too: it may live under a directory the
        // guest covers with tmpfs (a CI clone in /tmp).
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off mesh.src={}",
            root().display()
        ))
        .args(share("hostroot", Path::new("/"), true))
        .args(share("meshsrc", &root(), true))
        .args(share("meshrun", &self.run_dir, false))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = c.spawn().context("starting qemu-system-x86_64")?;
        let pid = child.id();
        let console_path = self.run_dir.join("console.log");
        let mut console = std::fs::File::create(&console_path)
            .with_context(|| format!("creating {}", console_path.display()))?;
        let tag = self.kernel.series;
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = writeln!(console, "{line}");
                if let Some(l) = line.strip_prefix("mesh-kernels: ") {
                    println!("kernels: [{tag}] {l}");
                }
            }
        });
        // qemu's own complaints (a bad option, a missing share) end up in the report.
        let err_path = self.run_dir.join("qemu.stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
            let _ = std::fs::write(err_path, s);
        });
        let deadline = start + self.timeout;
        let timed_out = loop {
            if child.try_wait()?.is_some() {
                break false;
            }
            if Instant::now() >= deadline {
                println!(
                    "kernels: [{tag}] no poweroff after {} s: killing qemu (pid {pid})",
                    self.timeout.as_secs()
                );
                // Kill only the qemu we started, by its PID (Child::kill).
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _ = reader.join();
        let _ = err_reader.join();
        Ok(Ran {
            wall: start.elapsed(),
            timed_out,
        })
    }
}
