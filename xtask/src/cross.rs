//! Building for another architecture: the Rust target, Debian's cross compilers,
//! and the environment cargo and the `cc` crate need to use them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::{output, repo_root, run, step};
use crate::provision;

/// A Rust target we package for, with what building and packaging for it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Rust target triple (`aarch64-unknown-linux-gnu`).
    pub triple: &'static str,
    /// Debian architecture name (`arm64`).
    pub deb_arch: &'static str,
    /// Prefix of Debian's GNU cross tools (`aarch64-linux-gnu`), `None` for the host.
    cross_prefix: Option<&'static str>,
}

/// The targets `dist` knows: the x86-64 build host and the Pi 4 (64-bit).
const TARGETS: &[Target] = &[
    Target { triple: "x86_64-unknown-linux-gnu", deb_arch: "amd64", cross_prefix: None },
    Target { triple: "aarch64-unknown-linux-gnu", deb_arch: "arm64", cross_prefix: Some("aarch64-linux-gnu") },
];

impl Target {
    /// The target named `triple`, or the build host's when `None`.
    pub fn named(triple: Option<&str>) -> Result<Target> {
        let host = host_triple()?;
        let want = triple.unwrap_or(&host);
        let Some(found) = TARGETS.iter().find(|t| t.triple == want) else {
            let known: Vec<&str> = TARGETS.iter().map(|t| t.triple).collect();
            bail!("cannot package for {want}: known targets are {}", known.join(", "));
        };
        // A cross prefix is needed only when the target is not the machine we build on.
        let mut target = *found;
        if target.triple == host {
            target.cross_prefix = None;
        }
        Ok(target)
    }

    /// The GNU tool `name` for this target (`aarch64-linux-gnu-strip`, or `strip`).
    pub fn tool(&self, name: &str) -> String {
        match self.cross_prefix {
            Some(prefix) => format!("{prefix}-{name}"),
            None => name.to_string(),
        }
    }

    /// Whether building needs Debian's cross compilers.
    pub fn is_cross(&self) -> bool {
        self.cross_prefix.is_some()
    }

    /// Install what building for this target needs: the Rust target and, when
    /// crossing, Debian's C and C++ cross compilers (the `cc` crate builds SQLite,
    /// libsecp256k1 and Bitcoin Core's consensus code with them).
    pub fn provision(&self) -> Result<()> {
        if let Some(prefix) = self.cross_prefix {
            let gcc = format!("gcc-{prefix}");
            let gxx = format!("g++-{prefix}");
            provision::debian_packages(&[gcc.as_str(), gxx.as_str()])?;
        }
        let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
            .context("rustup is needed to add Rust targets")?;
        if !installed.lines().any(|l| l.trim() == self.triple) {
            step(&format!("adding the Rust target {}", self.triple));
            run(Command::new("rustup").args(["target", "add", self.triple]))?;
        }
        Ok(())
    }

    /// Point cargo and the `cc` crate at this target's linker and compilers. The same
    /// variables every time, so builds for the target stay cached between commands.
    pub fn apply_env(&self, cmd: &mut Command) {
        let Some(prefix) = self.cross_prefix else { return };
        let upper = self.triple.to_uppercase().replace('-', "_");
        let lower = self.triple.replace('-', "_");
        cmd.env(format!("CARGO_TARGET_{upper}_LINKER"), format!("{prefix}-gcc"))
            .env(format!("CC_{lower}"), format!("{prefix}-gcc"))
            .env(format!("CXX_{lower}"), format!("{prefix}-g++"))
            .env(format!("AR_{lower}"), format!("{prefix}-ar"));
    }

    /// Extra flags for the target's own code (never build scripts): `+crt-static`
    /// makes a binary that needs no libraries at run time, as the emulated guest of
    /// `pi-check` has none.
    pub fn apply_static(&self, cmd: &mut Command) {
        let upper = self.triple.to_uppercase().replace('-', "_");
        cmd.env(format!("CARGO_TARGET_{upper}_RUSTFLAGS"), "-C target-feature=+crt-static");
    }
}

/// The build host's target triple (`rustc -vV`).
pub fn host_triple() -> Result<String> {
    let out = output(Command::new("rustc").arg("-vV"))?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("rustc -vV printed no host line")
}

/// The cargo target directory (`CARGO_TARGET_DIR`, else `<repo>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"))
}
