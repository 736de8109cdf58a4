//! `cargo xtask dist`: the `bitmesh` binary for one architecture, with the eBPF
//! object embedded, packaged as a `.deb` (no compiler needed where it is installed).
//!
//! The package's files come from `dist/` (the systemd unit, the example configs,
//! the maintainer scripts) and `docs/`; dpkg-deb writes the archive, dpkg-shlibdeps
//! computes the `Depends:` line from the libraries the binary links.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::{output, repo_root, run, step};
use crate::cross::{target_dir, Target};
use crate::{ebpf, provision};

/// The package version: the workspace's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `dist` made, with the sizes the report asks for.
pub struct Package {
    pub deb: PathBuf,
    pub deb_bytes: u64,
    pub binary_bytes: u64,
    pub depends: String,
}

/// Build and package for `triple` (the host's when `None`).
pub fn dist(triple: Option<&str>) -> Result<Package> {
    let target = Target::named(triple)?;
    provision::debian_packages(&["dpkg-dev"])?;
    target.provision()?;
    if target.is_cross() {
        // dpkg-shlibdeps maps a library to its package through the dpkg database:
        // the target's libc must be installed (multiarch) for it to name `libc6`.
        provision::foreign_architecture(target.deb_arch)?;
        let libs = ["libc6", "libgcc-s1", "libstdc++6"].map(|p| format!("{p}:{}", target.deb_arch));
        provision::debian_packages(&libs.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    let object = ebpf::build()?;
    let binary = build_binary(&target, &object)?;
    let stage = target_dir().join("dist").join(format!("stage-{}", target.deb_arch));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let installed_binary = stage.join("usr/bin/bitmesh");
    fs::create_dir_all(stage.join("usr/bin"))?;
    // The release profile keeps line tables for backtraces; the package ships
    // without them (a third of the size).
    run(Command::new(target.tool("strip"))
        .arg("--strip-debug")
        .arg("-o")
        .arg(&installed_binary)
        .arg(&binary))
    .with_context(|| format!("stripping with {}; is binutils for {} installed?", target.tool("strip"), target.triple))?;
    stage_files(&stage)?;
    verify_unit(&stage)?;
    let depends = shlib_depends(&target, &installed_binary)?;
    write_control(&stage, &target, &depends)?;
    let deb = target_dir().join("dist").join(format!("bitmesh_{VERSION}_{}.deb", target.deb_arch));
    step(&format!("writing {}", deb.display()));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(Package {
        deb_bytes: fs::metadata(&deb)?.len(),
        binary_bytes: fs::metadata(&installed_binary)?.len(),
        deb,
        depends,
    })
}

/// `cargo build --release` of the `bitmesh` binary for `target`, embedding `object`.
fn build_binary(target: &Target, object: &Path) -> Result<PathBuf> {
    step(&format!("building the bitmesh binary for {} (release)", target.triple));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root())
        .args(["build", "--release", "--package", "bitmesh-userspace", "--bin", "bitmesh", "--target", target.triple])
        .env("BITMESH_EBPF_OBJ", object);
    target.apply_env(&mut cmd);
    run(&mut cmd).context("building the bitmesh binary failed; see the compiler output above")?;
    let binary = target_dir().join(target.triple).join("release").join("bitmesh");
    if !binary.is_file() {
        bail!("the build finished but {} is missing", binary.display());
    }
    Ok(binary)
}

/// Copy one file into the staging tree with `mode`.
fn install(src: &Path, stage: &Path, dest: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let to = stage.join(dest.trim_start_matches('/'));
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, &to).with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Everything but the binary and the control file.
fn stage_files(stage: &Path) -> Result<()> {
    let root = repo_root();
    let dist = root.join("dist");
    install(&dist.join("bitmesh.service"), stage, "/lib/systemd/system/bitmesh.service", 0o644)?;
    install(&dist.join("bitmesh.toml"), stage, "/etc/bitmesh/bitmesh.toml", 0o644)?;
    for entry in fs::read_dir(dist.join("examples"))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        install(&path, stage, &format!("/usr/share/doc/bitmesh/examples/{name}"), 0o644)?;
    }
    install(&root.join("README.md"), stage, "/usr/share/doc/bitmesh/README.md", 0o644)?;
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            install(&path, stage, &format!("/usr/share/doc/bitmesh/{name}"), 0o644)?;
        }
    }
    install(&dist.join("debian/copyright"), stage, "/usr/share/doc/bitmesh/copyright", 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(&dist.join("debian").join(script), stage, &format!("/DEBIAN/{script}"), 0o755)?;
    }
    fs::write(stage.join("DEBIAN/conffiles"), "/etc/bitmesh/bitmesh.toml\n")?;
    Ok(())
}

/// `systemd-analyze verify` the staged unit against the staged binary, with the
/// targets it names taken from this machine's systemd. Unknown keys and bad values
/// are only warnings there, so any output counts as a failure.
fn verify_unit(stage: &Path) -> Result<()> {
    let root = stage.with_file_name(format!(
        "{}-verify",
        stage.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let units = root.join("lib/systemd/system");
    fs::create_dir_all(&units)?;
    fs::create_dir_all(root.join("usr/bin"))?;
    fs::copy(stage.join("usr/bin/bitmesh"), root.join("usr/bin/bitmesh"))?;
    fs::copy(stage.join("lib/systemd/system/bitmesh.service"), units.join("bitmesh.service"))?;
    for target in ["sysinit.target", "basic.target", "multi-user.target", "network-online.target", "shutdown.target"] {
        let host = Path::new("/lib/systemd/system").join(target);
        fs::copy(&host, units.join(target)).with_context(|| format!("{} is missing: is systemd installed?", host.display()))?;
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("bitmesh.service")
        .output()
        .context("could not run systemd-analyze (package systemd)")?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    fs::remove_dir_all(&root)?;
    if !out.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify finds fault with dist/bitmesh.service:\n{}", said.trim());
    }
    step("dist/bitmesh.service passes systemd-analyze verify");
    Ok(())
}

/// The `Depends:` value for `binary`: dpkg-shlibdeps reads its `NEEDED` libraries and
/// the versioned symbols it uses, and names the packages (with minimum versions).
fn shlib_depends(target: &Target, binary: &Path) -> Result<String> {
    // dpkg-shlibdeps insists on a debian/control in its working directory.
    let work = target_dir().join("dist").join(format!("shlibdeps-{}", target.deb_arch));
    fs::create_dir_all(work.join("debian"))?;
    fs::write(
        work.join("debian/control"),
        "Source: bitmesh\n\nPackage: bitmesh\nArchitecture: any\n",
    )?;
    let out = output(Command::new("dpkg-shlibdeps")
        .current_dir(&work)
        .arg("-O")
        .arg(binary)
        .env("DEB_HOST_ARCH", target.deb_arch))
    .context("dpkg-shlibdeps could not work out the binary's library dependencies")?;
    fs::remove_dir_all(&work)?;
    let depends = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends line")?;
    Ok(depends)
}

fn write_control(stage: &Path, target: &Target, depends: &str) -> Result<()> {
    let installed_kib = dir_bytes(stage)? / 1024;
    let control = format!(
        "Package: bitmesh
Version: {VERSION}
Architecture: {arch}
Maintainer: BitMesh maintainers <maintainers@users.noreply.r-seed-e28a10c2.example>
Installed-Size: {installed_kib}
Depends: {depends}
Recommends: hostapd, dnsmasq, nftables
Section: net
Priority: optional
Description: sell WiFi by the byte for Bitcoin (gateway controller)
 BitMesh meters every byte per client MAC in the kernel (an eBPF program, embedded
 in the binary) and drops the traffic of clients that have not paid; the controller
 runs a payment channel with each client, journals every payment in SQLite, raises
 the client's byte budget and settles on chain.
 .
 This package installs the `bitmesh` binary, the bitmesh.service systemd unit,
 /etc/bitmesh/bitmesh.toml and example hostapd, dnsmasq and nftables configurations
 in /usr/share/doc/bitmesh/examples. Start with /usr/share/doc/bitmesh/pi4-setup.md.
",
        arch = target.deb_arch,
    );
    fs::write(stage.join("DEBIAN/control"), control)?;
    Ok(())
}

/// Total size of the regular files under `dir`, for `Installed-Size`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}
