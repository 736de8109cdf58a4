//! Debian arm64 packages for the guest, fetched with apt under a private
//! configuration in the cache: its own sources (bookworm, its updates and security
//! suites, and bookworm-backports), lists and status file. The machine's apt
//! sources and dpkg database stay as they are.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use crate::cache::{output, run, step};

/// Debian's archive key, as shipped by `debian-archive-keyring` on every Debian.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Refresh the package lists when they are older than this.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The suites the guest's packages come from.
const SOURCES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
];

/// apt for one foreign architecture, rooted in a cache directory.
pub struct Apt {
    root: PathBuf,
    arch: &'static str,
}

/// One version of a package and the suite it comes from.
#[derive(Clone, Debug)]
pub struct Offer {
    pub version: String,
    pub suite: String,
}

impl Apt {
    /// Set up (once) and refresh (daily) the private apt root under `root`.
    pub fn new(root: PathBuf, arch: &'static str) -> Result<Apt> {
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing; install it with: sudo apt-get install debian-archive-keyring");
        }
        for dir in ["lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"] {
            fs::create_dir_all(root.join(dir))?;
        }
        let sources: String = SOURCES
            .iter()
            .map(|(uri, suite)| format!("deb [arch={arch} signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        fs::write(root.join("sources.list"), sources)?;
        if !root.join("status").exists() {
            fs::write(root.join("status"), "")?;
        }
        let apt = Apt { root, arch };
        let fresh = fs::metadata(apt.root.join("lists/updated"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if !fresh {
            step(&format!("updating the private apt lists for {arch} (bookworm, -updates, -security, -backports)"));
            run(apt.command("apt-get").args(["update", "-qq"]))
                .context("apt-get update failed; check that deb.debian.org is reachable")?;
            fs::write(apt.root.join("lists/updated"), "")?;
        }
        Ok(apt)
    }

    /// `program` (apt-get or apt-cache) with every path pointed into the private root.
    fn command(&self, program: &str) -> Command {
        let r = self.root.display();
        let mut cmd = Command::new(program);
        for opt in [
            format!("Dir::Etc::SourceList={r}/sources.list"),
            format!("Dir::Etc::SourceParts={r}/sources.list.d"),
            format!("Dir::Etc::PreferencesParts={r}/preferences.d"),
            format!("Dir::Etc::Preferences={r}/preferences"),
            format!("Dir::State::Lists={r}/lists"),
            format!("Dir::State::status={r}/status"),
            format!("Dir::Cache={r}/cache"),
            format!("APT::Architecture={}", self.arch),
            format!("APT::Architectures={}", self.arch),
            // The cache is root's; apt's download user could not write there.
            "APT::Sandbox::User=root".to_string(),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// Every version of `package` the sources offer, with its suite (`apt-cache madison`).
    pub fn offers(&self, package: &str) -> Result<Vec<Offer>> {
        let out = output(self.command("apt-cache").args(["madison", package]))?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split('|').map(str::trim).collect();
                let (version, source) = (cols.get(1)?, cols.get(2)?);
                // "http://deb.debian.org/debian bookworm-backports/main arm64 Packages"
                let suite = source.split_whitespace().nth(1)?.split('/').next()?;
                Some(Offer { version: version.to_string(), suite: suite.to_string() })
            })
            .collect())
    }

    /// The first `Depends:` package of `package=version` (a metapackage's target).
    pub fn first_dependency(&self, package: &str, version: &str) -> Result<String> {
        let out = output(self.command("apt-cache").args(["show", &format!("{package}={version}")]))?;
        out.lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([',', ' ']).next())
            .map(str::to_string)
            .with_context(|| format!("{package} {version} has no Depends line"))
    }

    /// Download `package` (optionally `=version`) into `dir`, once; returns the .deb.
    pub fn download(&self, package: &str, version: Option<&str>, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let spec = match version {
            Some(v) => format!("{package}={v}"),
            None => package.to_string(),
        };
        let has_deb = |dir: &Path| -> Result<Option<PathBuf>> {
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with(&format!("{package}_")) && name.ends_with(&format!("_{}.deb", self.arch)) {
                    let ver = name.trim_start_matches(&format!("{package}_")).trim_end_matches(&format!("_{}.deb", self.arch));
                    // apt writes an epoch's colon as %3a in file names.
                    if version.is_none_or(|v| v.replace(':', "%3a") == ver) {
                        return Ok(Some(path));
                    }
                }
            }
            Ok(None)
        };
        if let Some(deb) = has_deb(dir)? {
            return Ok(deb);
        }
        step(&format!("downloading {spec}:{}", self.arch));
        run(self.command("apt-get").current_dir(dir).args(["download", "-qq", &spec]))?;
        has_deb(dir)?.with_context(|| format!("apt-get download {spec} left no .deb in {}", dir.display()))
    }
}

/// Unpack a .deb's files into `into` (`dpkg-deb -x`).
pub fn extract(deb: &Path, into: &Path) -> Result<()> {
    fs::create_dir_all(into)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

/// Whether Debian version `a` is newer than `b` (`dpkg --compare-versions`).
pub fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg").args(["--compare-versions", a, "gt", b]).status().is_ok_and(|s| s.success())
}
