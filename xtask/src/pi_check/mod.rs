//! `cargo xtask pi-check`: the kernel tests on Debian's arm64 kernels, emulated.
//!
//! Cross-builds the kernel verdict tests (BPF_PROG_TEST_RUN) and the namespace
//! metering tests as static aarch64 binaries, packs them with busybox, Debian's
//! arm64 iproute2 (the tests make namespaces and veth pairs with `ip`, which
//! busybox's cannot) and the kernel modules they need into an initramfs, boots
//! Debian 12's arm64 kernel (6.1: no tcx, so TC attaches through clsact) under
//! `qemu-system-aarch64` on a Cortex-A72 like the Pi 4's, and reads the results
//! from the console. When bookworm-backports offers a newer arm64 kernel (with
//! tcx), the same tests run on it too.

mod apt;
mod cpio;
mod guest;

use std::collections::BTreeSet;
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cache::{cache_dir, output, repo_root, run, step};
use crate::cross::{target_dir, Target};
use crate::{ebpf, provision};
use apt::Apt;
use guest::{Boot, Outcome};

/// What runs in the guest: the kernel verdict tests (BPF_PROG_TEST_RUN) and the
/// namespace metering tests, modules of bitmesh-tests' `kernel` test binary, chosen
/// with libtest filters (the other modules are benchmarks and an unprivileged check).
fn guest_suites() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![("kernel", vec!["verdicts::", "netns_metering::"])]
}

/// Kernel modules the tests need, loaded in this order (no `modules.dep` ships in
/// the kernel package, so they are loaded by path): veth pairs, the clsact qdisc
/// (sch_ingress provides it) and the BPF classifier behind it.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];

/// arm64 packages of the guest's userland: busybox, and iproute2's `ip` and `tc`
/// with every library they load (checked against their ELF `NEEDED` entries below).
const USERLAND_PACKAGES: &[&str] = &[
    "busybox-static",
    "iproute2",
    "libc6",
    "libbpf1",
    "libelf1",
    "zlib1g",
    "libzstd1",
    "libmnl0",
    "libbsd0",
    "libmd0",
    "libcap2",
    "libxtables12",
];

/// The dynamically linked programs of the userland the tests run.
const USERLAND_PROGRAMS: &[&str] = &["bin/ip", "sbin/tc"];

/// A Debian arm64 kernel, unpacked.
struct Kernel {
    /// Where it comes from, for the table.
    suite: String,
    /// `uname -r`, e.g. `6.1.0-28-arm64`.
    release: String,
    /// Debian package version.
    version: String,
    /// The unpacked package.
    root: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

pub fn pi_check(stable_only: bool, timeout_mins: u64) -> Result<()> {
    let started = Instant::now();
    let target = Target::named(Some("aarch64-unknown-linux-gnu"))?;
    provision::debian_packages(&["qemu-system-arm", "dpkg-dev", "xz-utils", "zstd", "debian-archive-keyring"])?;
    target.provision()?;
    // Fetch first: a mirror problem shows before minutes of compiling.
    let cache = cache_dir()?.join("pi-check");
    let apt = Apt::new(cache.join("apt-arm64"), "arm64")?;
    let userland = userland(&apt, &cache, &target)?;
    let kernels = kernels(&apt, &cache, stable_only)?;
    let object = ebpf::build()?;
    let out = target_dir().join("pi-check");
    fs::create_dir_all(&out)?;
    let tests = build_tests(&target, &object, &out)?;
    let prepared = started.elapsed();
    let timeout = Duration::from_secs(timeout_mins.max(1) * 60);
    let mut boots = Vec::new();
    for kernel in &kernels {
        let initrd = out.join(format!("initrd-{}.cpio", kernel.release));
        write_initramfs(&initrd, kernel, &userland, &tests)?;
        let log = out.join(format!("console-{}.log", kernel.release));
        step(&format!(
            "booting {} ({}) under qemu-system-aarch64 -cpu cortex-a72; console in {}",
            kernel.release,
            kernel.suite,
            log.display()
        ));
        let boot = guest::boot(&kernel.vmlinuz(), &initrd, &log, timeout, true)?;
        boots.push(boot);
    }
    print_table(&kernels, &boots);
    println!(
        "pi-check: {:.0} s in all ({:.0} s building and fetching, then {})",
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64(),
        kernels
            .iter()
            .zip(&boots)
            .map(|(k, b)| format!("{:.0} s in the {} guest", b.wall.as_secs_f64(), k.release))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let failed: Vec<&str> = kernels.iter().zip(&boots).filter(|(_, b)| !b.passed()).map(|(k, _)| k.release.as_str()).collect();
    if !failed.is_empty() {
        bail!("pi-check failed on {}; the consoles are in {}", failed.join(", "), out.display());
    }
    Ok(())
}

/// Cross-build the guest's test binaries, static, and strip them into `out/tests`.
fn build_tests(target: &Target, object: &Path, out: &Path) -> Result<Vec<GuestSuite>> {
    step(&format!("building the kernel and namespace tests for {} (static)", target.triple));
    let suites = guest_suites();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root())
        .args(["test", "--no-run", "--package", "bitmesh-tests", "--target", target.triple, "--message-format=json-render-diagnostics"])
        .env("BITMESH_EBPF_OBJ", object);
    for (name, _) in &suites {
        cmd.args(["--test", name]);
    }
    target.apply_env(&mut cmd);
    target.apply_static(&mut cmd);
    let json = output(&mut cmd).context("building the tests for aarch64 failed; see the compiler output above")?;
    let dir = out.join("tests");
    fs::create_dir_all(&dir)?;
    let mut tests = Vec::new();
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str()) else { continue };
        if let Some((_, filters)) = suites.iter().find(|(n, _)| *n == name) {
            let to = dir.join(name);
            run(Command::new(target.tool("strip")).arg("-o").arg(&to).arg(exe))?;
            tests.push(GuestSuite { name: name.to_string(), exe: to, filters: filters.clone() });
        }
    }
    if tests.len() != suites.len() {
        bail!("cargo built {} of the {} test binaries", tests.len(), suites.len());
    }
    Ok(tests)
}

/// A test binary for the guest, stripped, and the libtest filters it runs with.
struct GuestSuite {
    name: String,
    exe: PathBuf,
    filters: Vec<&'static str>,
}

/// Busybox, iproute2 and its libraries, unpacked into one tree (cached).
fn userland(apt: &Apt, cache: &Path, target: &Target) -> Result<PathBuf> {
    let debs = cache.join("debs");
    let mut names = Vec::new();
    for package in USERLAND_PACKAGES {
        let deb = apt.download(package, None, &debs)?;
        names.push(deb.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    // Keyed by the exact package files: a new Debian point release unpacks afresh.
    let key = names.join("\n");
    let root = cache.join("userland");
    if fs::read_to_string(root.join(".packages")).ok().as_deref() != Some(key.as_str()) {
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        for name in &names {
            apt::extract(&debs.join(name), &root)?;
        }
        fs::write(root.join(".packages"), &key)?;
    }
    check_libraries(&root, target)?;
    Ok(root)
}

/// Fail early, naming the library, when `ip` or `tc` would not start in the guest.
fn check_libraries(root: &Path, target: &Target) -> Result<()> {
    let mut todo = Vec::new();
    for program in USERLAND_PROGRAMS {
        let path = root.join(program);
        if !path.is_file() {
            bail!("{program} is not in the unpacked arm64 packages (USERLAND_PACKAGES in xtask/src/pi_check/mod.rs)");
        }
        todo.push(path);
    }
    let lib_dirs = ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"];
    let mut seen = BTreeSet::new();
    while let Some(elf) = todo.pop() {
        let dynamic = output(Command::new(target.tool("readelf")).arg("-d").arg(&elf))?;
        for lib in dynamic.lines().filter_map(|l| l.split("Shared library: [").nth(1)?.strip_suffix(']')) {
            if !seen.insert(lib.to_string()) {
                continue;
            }
            match lib_dirs.iter().map(|d| root.join(d).join(lib)).find(|p| p.exists()) {
                Some(path) => todo.push(path),
                None => bail!("{} needs {lib}, which no package in USERLAND_PACKAGES (xtask/src/pi_check/mod.rs) provides", elf.display()),
            }
        }
    }
    Ok(())
}

/// Debian 12's arm64 kernel, and bookworm-backports' when there is one (and wanted).
fn kernels(apt: &Apt, cache: &Path, stable_only: bool) -> Result<Vec<Kernel>> {
    let offers = apt.offers("linux-image-arm64")?;
    let pick = |backports: bool| {
        offers
            .iter()
            .filter(|o| o.suite.ends_with("-backports") == backports)
            .fold(None::<&apt::Offer>, |best, o| match best {
                Some(b) if !apt::newer(&o.version, &b.version) => Some(b),
                _ => Some(o),
            })
            .cloned()
    };
    let stable = pick(false).context("apt offers no linux-image-arm64 for bookworm")?;
    let mut chosen = vec![stable];
    match pick(true) {
        Some(bpo) if !stable_only => chosen.push(bpo),
        Some(bpo) => step(&format!("skipping bookworm-backports' kernel {} (--stable-only)", bpo.version)),
        None => step("bookworm-backports offers no arm64 kernel: only Debian 12's runs"),
    }
    let mut kernels = Vec::new();
    for offer in chosen {
        let package = apt.first_dependency("linux-image-arm64", &offer.version)?;
        let release = package.trim_start_matches("linux-image-").to_string();
        let dir = cache.join("kernels").join(format!("{package}_{}", offer.version));
        if !dir.join(".unpacked").exists() {
            let deb = apt.download(&package, None, &dir)?;
            let root = dir.join("root");
            if root.exists() {
                fs::remove_dir_all(&root)?;
            }
            step(&format!("unpacking {}", deb.display()));
            apt::extract(&deb, &root)?;
            // The package is only needed unpacked (it is about 60 MB).
            fs::remove_file(&deb)?;
            fs::write(dir.join(".unpacked"), "")?;
        }
        kernels.push(Kernel { suite: offer.suite, release, version: offer.version, root: dir.join("root") });
    }
    Ok(kernels)
}

/// A module's file under the kernel's module tree, uncompressed (busybox's insmod
/// reads plain ELF); `None` when the kernel has it built in.
fn module(kernel: &Kernel, name: &str) -> Result<Option<Vec<u8>>> {
    let dir = kernel.modules_dir();
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    if builtin.lines().any(|l| l.rsplit('/').next() == Some(&format!("{name}.ko"))) {
        return Ok(None);
    }
    let wanted = [format!("{name}.ko"), format!("{name}.ko.xz"), format!("{name}.ko.zst")];
    let found = find_file(&dir.join("kernel"), &wanted)?
        .with_context(|| format!("kernel {} has no module {name} and does not build it in", kernel.release))?;
    let file = found.to_string_lossy().into_owned();
    if file.ends_with(".xz") {
        Ok(Some(output_bytes(Command::new("xz").arg("-dc").arg(&found))?))
    } else if file.ends_with(".zst") {
        Ok(Some(output_bytes(Command::new("zstd").arg("-dcq").arg(&found))?))
    } else {
        Ok(Some(fs::read(&found)?))
    }
}

fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn find_file(dir: &Path, names: &[String]) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, names)? {
                return Ok(Some(found));
            }
        } else if path.file_name().is_some_and(|n| names.iter().any(|w| n == w.as_str())) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The guest's root: /init, busybox, iproute2 and libraries, the modules, the tests.
fn write_initramfs(path: &Path, kernel: &Kernel, userland: &Path, tests: &[GuestSuite]) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut cpio = cpio::Cpio::new(BufWriter::new(file));
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "var", "modules", "tests"] {
        cpio.dir(dir, 0o755)?;
    }
    cpio.symlink("var/run", "/run")?;
    add_tree(&mut cpio, userland, userland)?;
    // The interpreter of /init; init.sh links the other applets.
    cpio.symlink("bin/sh", "busybox")?;
    cpio.file("init", 0o755, include_bytes!("init.sh"))?;
    let mut order = String::new();
    for name in MODULES {
        if let Some(data) = module(kernel, name)? {
            cpio.file(&format!("modules/{name}.ko"), 0o644, &data)?;
            order.push_str(&format!("{name}.ko\n"));
        }
    }
    cpio.file("modules/order", 0o644, order.as_bytes())?;
    let mut order = String::new();
    for suite in tests {
        cpio.file(&format!("tests/{}", suite.name), 0o755, &fs::read(&suite.exe)?)?;
        // One line per run: the binary, then its filters (init.sh reads them).
        order.push_str(&format!("{} {}\n", suite.name, suite.filters.join(" ")));
    }
    cpio.file("tests/order", 0o644, order.as_bytes())?;
    cpio.finish()?;
    Ok(())
}

/// Add everything under `dir` (relative to `base`) but documentation.
fn add_tree<W: std::io::Write>(cpio: &mut cpio::Cpio<W>, base: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(base)?.to_string_lossy().into_owned();
        if rel == "usr/share" || rel.starts_with('.') {
            continue;
        }
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            cpio.symlink(&rel, &fs::read_link(&path)?.to_string_lossy())?;
        } else if meta.is_dir() {
            cpio.dir(&rel, mode)?;
            add_tree(cpio, base, &path)?;
        } else if meta.is_file() {
            cpio.file(&rel, mode, &fs::read(&path)?)?;
        }
    }
    Ok(())
}

/// One row per test, one column per kernel.
fn print_table(kernels: &[Kernel], boots: &[Boot]) {
    let mut rows: Vec<String> = Vec::new();
    for boot in boots {
        for bin in &boot.binaries {
            for (test, _) in &bin.tests {
                let row = format!("{}::{test}", bin.name);
                if !rows.contains(&row) {
                    rows.push(row);
                }
            }
        }
    }
    let width = rows.iter().map(String::len).max().unwrap_or(10).max(10);
    println!();
    for (k, b) in kernels.iter().zip(boots) {
        let tc = if tcx_kernel(&k.release) { "tcx" } else { "clsact" };
        println!("kernel {} ({} {}, TC via {tc}): guest reports {}", k.release, k.suite, k.version, if b.kernel.is_empty() { "nothing" } else { &b.kernel });
    }
    let header: Vec<String> = kernels.iter().map(|k| format!("{:>16}", k.release)).collect();
    println!("{:width$}  {}", "test", header.join(" "));
    for row in &rows {
        let (bin, test) = row.split_once("::").unwrap_or((row, ""));
        let cells: Vec<String> = boots
            .iter()
            .map(|b| {
                let outcome = b.binaries.iter().find(|r| r.name == bin).and_then(|r| r.tests.iter().find(|(t, _)| t == test));
                let cell = match outcome {
                    Some((_, Outcome::Passed)) => "pass",
                    Some((_, Outcome::Failed)) => "FAIL",
                    Some((_, Outcome::Ignored)) => "ignored",
                    None => "not run",
                };
                format!("{cell:>16}")
            })
            .collect();
        println!("{row:width$}  {}", cells.join(" "));
    }
    for (k, b) in kernels.iter().zip(boots) {
        for bin in &b.binaries {
            println!(
                "{}: {} exited {} after {} s",
                k.release,
                bin.name,
                bin.exit.map(|c| c.to_string()).unwrap_or_else(|| "never (guest died)".into()),
                bin.secs.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
            );
        }
        for m in &b.insmod_failures {
            println!("{}: insmod {m} FAILED", k.release);
        }
        if b.timed_out {
            println!("{}: TIMED OUT after {:.0} s", k.release, b.wall.as_secs_f64());
        } else if !b.done {
            println!("{}: the guest stopped before finishing its script", k.release);
        }
        println!("{}: {}", k.release, if b.passed() { "PASS" } else { "FAIL" });
    }
}

/// Kernels from 6.6 on attach TC programs through tcx links; before, through clsact.
fn tcx_kernel(release: &str) -> bool {
    let mut parts = release.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}
