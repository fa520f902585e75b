//! The guest's initramfs: static busybox, the init script, and the kernel modules the
//! guest needs, taken from the unpacked package with their dependencies (read from each
//! module's `.modinfo`, since the package ships no modules.dep) and numbered in load
//! order. Written as a newc cpio archive, uncompressed (the kernel takes it as is).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use super::debian::Kernel;

/// What the guest loads: virtio-pci and 9p for the host's filesystem; veth, vxlan and
/// bridge for the tests' topologies; clsact (sch_ingress) and cls_bpf for TC programs
/// attached through netlink (kernels before tcx). Built-in ones are skipped.
const MODULES: [&str; 8] = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "vxlan",
    "bridge",
    "sch_ingress",
    "cls_bpf",
];

/// The host's busybox (busybox-static): the guest's tools before the host's root is up.
const BUSYBOX: &str = "/bin/busybox";

/// Writes the initramfs for `kernel` to `out`, with `init` as /init. Returns the modules
/// in the order the guest loads them.
pub fn build(kernel: &Kernel, init: &str, out: &Path) -> anyhow::Result<Vec<String>> {
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (busybox-static)"))?;
    if elf_interpreter(&busybox) {
        bail!("{BUSYBOX} is dynamically linked: the initramfs needs busybox-static");
    }
    let modules = resolve(kernel)?;
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "newroot", "modules"] {
        cpio.dir(d);
    }
    // The console the kernel opens for init before devtmpfs is mounted.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, init.as_bytes());
    for (i, (name, bytes)) in modules.iter().enumerate() {
        cpio.file(&format!("modules/{i:02}-{name}.ko"), 0o644, bytes);
    }
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))?;
    Ok(modules.into_iter().map(|(n, _)| n).collect())
}

/// [`MODULES`] and their dependencies, each after what it depends on, decompressed.
fn resolve(kernel: &Kernel) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let index = index(&kernel.modules.join("kernel"))?;
    let builtin: BTreeSet<String> = fs::read_to_string(kernel.modules.join("modules.builtin"))
        .with_context(|| format!("reading {}/modules.builtin", kernel.modules.display()))?
        .lines()
        .filter_map(module_name)
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in MODULES {
        visit(m, &index, &builtin, &mut seen, &mut order)
            .with_context(|| format!("module {m} of {}", kernel.package))?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) || builtin.contains(&name) {
        return Ok(());
    }
    let path = index
        .get(&name)
        .with_context(|| format!("{name}: neither a module file nor built in"))?;
    let bytes = decompress(path)?;
    for dep in modinfo(&bytes, "depends")
        .with_context(|| format!("reading {}", path.display()))?
        .split(',')
        .filter(|d| !d.is_empty())
    {
        visit(dep, index, builtin, seen, order)?;
    }
    order.push((name, bytes));
    Ok(())
}

/// Module name ('-' as '_') -> file, for every module under `dir`.
fn index(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Some(name) = p.to_str().and_then(module_name) {
                out.insert(name, p);
            }
        }
    }
    Ok(out)
}

/// `.../foo-bar.ko[.xz|.zst|.gz]` -> `foo_bar`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split_once(".ko").map(|(s, _)| s)?;
    Some(stem.replace('-', "_"))
}

/// The module's bytes: Debian 13 compresses its modules with xz; busybox's insmod
/// takes plain ones.
fn decompress(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("ko") => return fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("{}: unknown module compression", path.display()),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("starting `{tool} -dc {}`", path.display()))?;
    if !out.status.success() {
        bail!("`{tool} -dc {}` failed ({})", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// A section header: its name (offset in the name table), where it is, how long.
struct Section {
    name: u32,
    offset: u64,
    size: u64,
}

/// The section headers of a 64-bit little-endian ELF file, and the name table's index.
fn sections(elf: &[u8]) -> anyhow::Result<(Vec<Section>, usize)> {
    let u16at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        bail!("not a 64-bit little-endian ELF file");
    }
    let bad = || anyhow::anyhow!("truncated ELF header");
    let shoff = u64at(0x28).ok_or_else(bad)? as usize;
    let shentsize = u16at(0x3a).ok_or_else(bad)? as usize;
    let shnum = u16at(0x3c).ok_or_else(bad)? as usize;
    let shstrndx = u16at(0x3e).ok_or_else(bad)? as usize;
    let mut out = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let h = shoff + i * shentsize;
        let bad = || anyhow::anyhow!("truncated section header {i}");
        out.push(Section {
            name: u32at(h).ok_or_else(bad)?,
            offset: u64at(h + 0x18).ok_or_else(bad)?,
            size: u64at(h + 0x20).ok_or_else(bad)?,
        });
    }
    Ok((out, shstrndx))
}

/// `key=` of the module's `.modinfo` section ("" when absent).
fn modinfo(elf: &[u8], key: &str) -> anyhow::Result<String> {
    let (secs, strndx) = sections(elf)?;
    let strtab = secs.get(strndx).context("no section name table")?;
    let section = |s: &Section| elf.get(s.offset as usize..(s.offset + s.size) as usize);
    let names = section(strtab).context("section name table out of the file")?;
    let info = secs
        .iter()
        .find(|s| {
            names
                .get(s.name as usize..)
                .is_some_and(|n| n.starts_with(b".modinfo\0"))
        })
        .and_then(section)
        .context("no .modinfo section")?;
    let prefix = format!("{key}=");
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|e| std::str::from_utf8(e).ok())
        .find_map(|e| e.strip_prefix(&prefix))
        .unwrap_or("")
        .to_string())
}

/// Whether the ELF executable asks for a dynamic loader (PT_INTERP).
fn elf_interpreter(elf: &[u8]) -> bool {
    let get = |o: usize, n: usize| elf.get(o..o + n);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (get(0x20, 8), get(0x36, 2), get(0x38, 2))
    else {
        return true;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([phentsize[0], phentsize[1]]) as usize;
    let phnum = u16::from_le_bytes([phnum[0], phnum[1]]) as usize;
    (0..phnum).any(|i| get(phoff + i * phentsize, 4) == Some(&3u32.to_le_bytes()[..]))
}

/// A newc ("070701") cpio archive, the format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}
