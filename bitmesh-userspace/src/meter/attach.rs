//! Load and verify the programs, attach them to the client-facing interface, pin
//! the attachments, detach cleanly.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, Link, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcAttachType, TcHandle};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{Program, ProgramError, SchedClassifier, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use bitmesh_common::kernel::{
    GLOBAL_DNS_ALLOWED, GLOBAL_GARDEN_LIMITS, GLOBAL_GATEWAY_IPV4, GLOBAL_GATEWAY_IPV6,
    GLOBAL_PAYMENT_PORT, MAP_BOUND, MAP_CREDIT, MAP_GARDEN, MAP_STATS, MAP_USAGE, PROG_TC_DOWNLOAD,
    PROG_TC_EMPTY, PROG_TC_UPLOAD, PROG_XDP_EMPTY, PROG_XDP_UPLOAD,
};

use super::config::{MeterConfig, UploadHook};
use super::error::{permission_error, root_io_error, MeterError};
use super::maps::MeterMaps;
use super::object::EBPF_OBJECT;

/// `BPF_FS_MAGIC` from statfs(2): the pin directory must live on a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Kernels before 6.6 have no tcx: a TC program hangs on the clsact qdisc as a
/// cls_bpf filter, which has no bpf_link to pin. Ours get this fixed identity
/// (priority 1: the meter sees every frame before any other filter), so a restart
/// replaces each filter in place, atomically, instead of adding a second one, and
/// detach finds and removes them.
const CLSACT_PRIORITY: u16 = 1;
/// See [`CLSACT_PRIORITY`]; "b17" for BitMesh.
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0xb17);

/// The programs of the object, for [`Meter::test_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MeterProgram {
    /// XDP upload meter.
    XdpUpload,
    /// TC ingress upload meter.
    TcUpload,
    /// TC egress download meter.
    TcDownload,
    /// XDP program that only passes (benchmark baseline).
    XdpEmpty,
    /// TC program that only passes (benchmark baseline).
    TcEmpty,
}

impl MeterProgram {
    /// Every program, in load order.
    pub const ALL: [MeterProgram; 5] = [
        MeterProgram::XdpUpload,
        MeterProgram::TcUpload,
        MeterProgram::TcDownload,
        MeterProgram::XdpEmpty,
        MeterProgram::TcEmpty,
    ];

    /// Its function name in the object.
    pub const fn name(self) -> &'static str {
        match self {
            MeterProgram::XdpUpload => PROG_XDP_UPLOAD,
            MeterProgram::TcUpload => PROG_TC_UPLOAD,
            MeterProgram::TcDownload => PROG_TC_DOWNLOAD,
            MeterProgram::XdpEmpty => PROG_XDP_EMPTY,
            MeterProgram::TcEmpty => PROG_TC_EMPTY,
        }
    }

    /// Whether it is an XDP program (else TC).
    pub const fn is_xdp(self) -> bool {
        matches!(self, MeterProgram::XdpUpload | MeterProgram::XdpEmpty)
    }
}

/// An attachment whose link is pinned in bpffs (survives the process).
struct Attachment {
    pin: PathBuf,
    link: FdLink,
}

/// The loaded BitMesh programs and their maps; optionally attached to one interface.
pub struct Meter {
    pub(super) ebpf: Ebpf,
    maps: MeterMaps,
    pin_dir: PathBuf,
    interface: Option<String>,
    upload_hook: Option<UploadHook>,
    attachments: Vec<Attachment>,
    /// clsact filters attached on a kernel without tcx (see [`CLSACT_PRIORITY`]).
    clsact: Vec<TcAttachType>,
}

impl Meter {
    /// Load the embedded object with `config`'s globals, verify every program, and
    /// open the maps pinned in `config.pin_dir` (creating and pinning them if absent,
    /// reusing them with their counters if a previous run left them).
    pub fn load(config: &MeterConfig) -> Result<Meter, MeterError> {
        prepare_pin_dir(&config.pin_dir)?;
        let ipv4 = config.gateway_ipv4.map(|a| a.octets()).unwrap_or([0; 4]);
        let ipv6 = config.gateway_ipv6.map(|a| a.octets()).unwrap_or([0; 16]);
        let port = config.payment_port;
        let dns = u8::from(config.dns_allowed);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&config.pin_dir)
            .override_global(GLOBAL_GATEWAY_IPV4, &ipv4, true)
            .override_global(GLOBAL_GATEWAY_IPV6, &ipv6, true)
            .override_global(GLOBAL_PAYMENT_PORT, &port, true)
            .override_global(GLOBAL_DNS_ALLOWED, &dns, true)
            .override_global(GLOBAL_GARDEN_LIMITS, &config.garden, true)
            .load(EBPF_OBJECT)
            .map_err(load_error)?;
        for program in MeterProgram::ALL {
            load_program(&mut ebpf, program)?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(MeterError::MissingInObject { what: "map", name })
        };
        let (credit, usage, stats) = (take(MAP_CREDIT)?, take(MAP_USAGE)?, take(MAP_STATS)?);
        let (garden, bound) = (take(MAP_GARDEN)?, take(MAP_BOUND)?);
        let mut maps = MeterMaps::from_maps(credit, usage, stats, garden, bound)?;
        maps.set_enforce_bound_ip(config.enforce_bound_ip);
        tracing::info!(pin_dir = %config.pin_dir.display(), "meter programs loaded and verified");
        Ok(Meter {
            ebpf,
            maps,
            pin_dir: config.pin_dir.clone(),
            interface: None,
            upload_hook: None,
            attachments: Vec::new(),
            clsact: Vec::new(),
        })
    }

    /// The maps (read usage, stats).
    pub fn maps(&self) -> &MeterMaps {
        &self.maps
    }

    /// The maps (add/remove clients, raise credit).
    pub fn maps_mut(&mut self) -> &mut MeterMaps {
        &mut self.maps
    }

    /// The upload hook in use, once attached (`Auto` resolved).
    pub fn upload_hook(&self) -> Option<UploadHook> {
        self.upload_hook
    }

    /// Meter `interface`: the upload program on `hook`, the download program on TC
    /// egress. Attachments are pinned under the pin directory, so they outlive this
    /// process; an attachment left by a previous run is taken over atomically (no
    /// window without enforcement). Returns the hook actually used.
    pub fn attach(&mut self, interface: &str, hook: UploadHook) -> Result<UploadHook, MeterError> {
        if nix::net::if_::if_nametoindex(interface).is_err() {
            return Err(MeterError::InterfaceNotFound { interface: interface.to_string() });
        }
        let used = match hook {
            UploadHook::Auto => match self.attach_upload(interface, UploadHook::XdpNative) {
                Ok(()) => UploadHook::XdpNative,
                Err(MeterError::HookUnsupported { source, .. }) => {
                    tracing::info!(interface, error = %source, "native XDP unavailable, using TC ingress");
                    self.attach_upload(interface, UploadHook::Tc)?;
                    UploadHook::Tc
                }
                Err(e) => return Err(e),
            },
            other => {
                self.attach_upload(interface, other)?;
                other
            }
        };
        self.attach_tc(interface, MeterProgram::TcDownload, TcAttachType::Egress)?;
        self.interface = Some(interface.to_string());
        self.upload_hook = Some(used);
        tracing::info!(interface, hook = %used, "meter attached");
        Ok(used)
    }

    fn attach_upload(&mut self, interface: &str, hook: UploadHook) -> Result<(), MeterError> {
        // Another upload hook pinned by an earlier run (other hook choice) must go,
        // or the interface would be metered twice.
        for stale in [UploadHook::XdpNative, UploadHook::Tc] {
            if stale_kind(stale) != stale_kind(hook) {
                remove_pin(&self.link_pin(interface, stale_kind(stale)))?;
            }
        }
        if stale_kind(hook) != stale_kind(UploadHook::Tc) && !tcx_kernel() {
            // An ingress filter left by a run with the TC hook, on a kernel without tcx.
            detach_clsact(interface, TcAttachType::Ingress);
        }
        match hook {
            UploadHook::XdpNative => self.attach_xdp(interface, XdpMode::Driver, hook),
            UploadHook::XdpGeneric => self.attach_xdp(interface, XdpMode::Skb, hook),
            UploadHook::Tc | UploadHook::Auto => {
                self.attach_tc(interface, MeterProgram::TcUpload, TcAttachType::Ingress)
            }
        }
    }

    fn link_pin(&self, interface: &str, kind: &str) -> PathBuf {
        self.pin_dir.join(format!("link_{interface}_{kind}"))
    }

    fn attach_xdp(&mut self, interface: &str, mode: XdpMode, hook: UploadHook) -> Result<(), MeterError> {
        // XDP mode flags are fixed at link creation, so the pin name does not carry
        // the mode: switching native <-> generic needs a detach first.
        self.attach_pinned::<Xdp>(interface, MeterProgram::XdpUpload, "upload_xdp", mode, hook)
    }

    fn attach_tc(&mut self, interface: &str, program: MeterProgram, at: TcAttachType) -> Result<(), MeterError> {
        let kind = match at {
            TcAttachType::Egress => "download_tc",
            _ => "upload_tc",
        };
        if !tcx_kernel() {
            return self.attach_clsact(interface, program, at);
        }
        self.attach_pinned::<SchedClassifier>(interface, program, kind, at, UploadHook::Tc)
    }

    /// TC on a kernel without tcx: a cls_bpf filter on the clsact qdisc with our fixed
    /// identity. One left by a previous run is replaced in place (the kernel swaps the
    /// program atomically: no window without enforcement, never two meters).
    fn attach_clsact(&mut self, interface: &str, program: MeterProgram, at: TcAttachType) -> Result<(), MeterError> {
        // The clsact qdisc may exist already.
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            tracing::debug!(interface, error = %e, "clsact qdisc not added (usually: exists already)");
        }
        let name = program.name();
        let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
        let ours = SchedClassifierLink::attached(interface, at, CLSACT_PRIORITY, CLSACT_HANDLE, None)
            .map_err(|_| MeterError::InterfaceNotFound { interface: interface.to_string() })?;
        let id = match prog.attach_to_link(ours) {
            Ok(id) => {
                tracing::info!(interface, program = name, "clsact filter of a previous run taken over");
                id
            }
            // No filter of ours there yet (ENOENT): add it.
            Err(_) => prog
                .attach_with_options(
                    interface,
                    at,
                    TcAttachOptions::Netlink(NlOptions { priority: CLSACT_PRIORITY, handle: CLSACT_HANDLE, ..NlOptions::default() }),
                )
                .map_err(|source| attach_error(source, UploadHook::Tc, interface))?,
        };
        let link = prog.take_link(id).map_err(|source| MeterError::Program { operation: "take link", program: name, source: Box::new(source) })?;
        // aya detaches a filter when its link value drops; this one must outlive the
        // process, as a pinned link does. It is plain data (no descriptor): nothing leaks.
        std::mem::forget(link);
        self.clsact.push(at);
        Ok(())
    }

    /// Attach `program` to `interface` at `target`, pinned as `link_<interface>_<kind>`:
    /// the one takeover path for every hook. A link pinned by a previous run is
    /// taken over atomically (the new program replaces the old one in place, no
    /// window without enforcement); a missing or unusable pin means a fresh attach.
    fn attach_pinned<P: PinnableProgram>(
        &mut self,
        interface: &str,
        program: MeterProgram,
        kind: &str,
        target: P::Target,
        hook: UploadHook,
    ) -> Result<(), MeterError>
    where
        for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        let name = program.name();
        let pin = self.link_pin(interface, kind);
        let prog: &mut P = program_mut(&mut self.ebpf, name)?;
        let id = match reuse_link(&pin).and_then(|l| P::Link::try_from(l).ok()) {
            Some(link) => match prog.take_over(link) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(error = %e, "pinned {} link unusable, re-attaching", P::HOOK);
                    None
                }
            },
            None => None,
        };
        let id = match id {
            Some(id) => id,
            None => {
                remove_pin(&pin)?;
                prog.attach_new(interface, target).map_err(|source| attach_error(source, hook, interface))?
            }
        };
        let link = prog.take_link_of(id).map_err(|source| MeterError::Program { operation: "take link", program: name, source: Box::new(source) })?;
        match link.try_into() {
            Ok(link) => self.keep_pinned(pin, link, name),
            Err(e) => {
                // Kernels without a bpf_link for this hook (XDP before 5.9, TC before
                // 6.6) attach through netlink: not pinnable, the program stays
                // attached until detached or the interface goes away.
                tracing::warn!(error = %e, "{} attached through netlink; it will not be taken over after a restart", P::HOOK);
                Ok(())
            }
        }
    }

    fn keep_pinned(&mut self, pin: PathBuf, link: FdLink, program: &'static str) -> Result<(), MeterError> {
        if !pin.exists() {
            // `pin` consumes the link; reopen the pin to keep an fd for detaching.
            let pinned = link
                .pin(&pin)
                .map_err(|e| MeterError::Link { operation: "pin", program, source: Box::new(e) })?;
            self.attachments.push(Attachment { pin, link: FdLink::from(pinned) });
        } else {
            self.attachments.push(Attachment { pin, link });
        }
        Ok(())
    }

    /// Detach from the interface and remove the pinned attachments. The maps stay
    /// pinned (counters and credit survive); see [`Meter::remove_pinned_maps`].
    /// Call it in the interface's network namespace, as [`Meter::attach`]: without
    /// tcx the filters are found by interface name over netlink.
    pub fn detach(mut self) -> Result<(), MeterError> {
        self.detach_links()
    }

    fn detach_links(&mut self) -> Result<(), MeterError> {
        for Attachment { pin, link } in self.attachments.drain(..) {
            remove_pin(&pin)?;
            // Dropping the last reference to the link detaches it.
            drop(link);
        }
        let clsact: Vec<TcAttachType> = self.clsact.drain(..).collect();
        if let Some(interface) = self.interface.take() {
            for at in clsact {
                detach_clsact(&interface, at);
            }
            tracing::info!(interface, "meter detached");
        }
        Ok(())
    }

    /// Delete the pinned maps (all counters and credit!) from the pin directory.
    /// For tests and `uninstall`; never for a restart.
    pub fn remove_pinned_maps(pin_dir: &Path) -> Result<(), MeterError> {
        for name in [MAP_CREDIT, MAP_USAGE, MAP_STATS, MAP_GARDEN, MAP_BOUND] {
            remove_pin(&pin_dir.join(name))?;
        }
        Ok(())
    }
}

/// A program whose attachment is a bpf_link that can be pinned and taken over.
/// aya 0.14 generates the same link methods for every program type (one macro,
/// `define_link_wrapper!`, gives each its `attach_to_link`, `take_link` and the
/// `FdLink` conversions both ways); this trait names them once, so the takeover in
/// [`Meter::attach_pinned`] is written once for every hook.
trait PinnableProgram {
    /// Where it attaches on an interface: the XDP mode, the TC direction.
    type Target;
    /// Its link type, convertible from and to the pinnable [`FdLink`].
    type Link: TryFrom<FdLink> + TryInto<FdLink, Error = LinkError>;
    /// The id aya hands out for an attachment.
    type LinkId;
    /// The hook's name in log lines.
    const HOOK: &'static str;

    /// Attach to `interface` afresh.
    fn attach_new(&mut self, interface: &str, target: Self::Target) -> Result<Self::LinkId, ProgramError>;
    /// Replace the program of an existing link with this one, atomically.
    fn take_over(&mut self, link: Self::Link) -> Result<Self::LinkId, ProgramError>;
    /// Take ownership of an attachment (dropping the link detaches it).
    fn take_link_of(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError>;
}

/// Implements [`PinnableProgram`] by forwarding to aya's methods of the same job.
macro_rules! pinnable_program {
    ($program:ty, $target:ty, $link:ty, $link_id:ty, $hook:literal) => {
        impl PinnableProgram for $program {
            type Target = $target;
            type Link = $link;
            type LinkId = $link_id;
            const HOOK: &'static str = $hook;

            fn attach_new(&mut self, interface: &str, target: $target) -> Result<$link_id, ProgramError> {
                self.attach(interface, target)
            }
            fn take_over(&mut self, link: $link) -> Result<$link_id, ProgramError> {
                self.attach_to_link(link)
            }
            fn take_link_of(&mut self, id: $link_id) -> Result<$link, ProgramError> {
                self.take_link(id)
            }
        }
    };
}

pinnable_program!(Xdp, XdpMode, XdpLink, XdpLinkId, "XDP");
pinnable_program!(SchedClassifier, TcAttachType, SchedClassifierLink, SchedClassifierLinkId, "TC");

/// Whether TC programs attach through tcx links (kernel 6.6 and later), as aya decides.
fn tcx_kernel() -> bool {
    aya::util::KernelVersion::current().map(|v| v >= aya::util::KernelVersion::new(6, 6, 0)).unwrap_or(false)
}

/// Remove our clsact filter at `at` on `interface`, if there is one.
fn detach_clsact(interface: &str, at: TcAttachType) {
    let removed = SchedClassifierLink::attached(interface, at, CLSACT_PRIORITY, CLSACT_HANDLE, None)
        .map_err(|e| e.to_string())
        .and_then(|link| link.detach().map_err(|e| e.to_string()));
    if let Err(e) = removed {
        tracing::debug!(interface, error = %e, "no clsact filter of ours to remove");
    }
}

/// Group the upload hooks by program family: one pinned upload link per family.
fn stale_kind(hook: UploadHook) -> &'static str {
    match hook {
        UploadHook::XdpNative | UploadHook::XdpGeneric => "upload_xdp",
        UploadHook::Tc | UploadHook::Auto => "upload_tc",
    }
}

fn reuse_link(pin: &Path) -> Option<FdLink> {
    PinnedLink::from_pin(pin).ok().map(FdLink::from)
}

fn remove_pin(path: &Path) -> Result<(), MeterError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MeterError::PinDir { path: path.to_path_buf(), source }),
    }
}

/// The conventional bpffs mount point, mounted by systemd on most distributions.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> Result<bool, MeterError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| MeterError::PinDir {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    })?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mount bpffs on /sys/fs/bpf when a pin directory under it is asked for and
/// nothing is mounted there (minimal systems and containers without systemd),
/// exactly as systemd would.
fn ensure_bpffs_root(dir: &Path) -> Result<(), MeterError> {
    let root = Path::new(BPFFS_ROOT);
    if !dir.starts_with(root) || !root.is_dir() || is_bpffs(root)? {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (src, target, fstype) = (c("bpf"), c(BPFFS_ROOT), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let source = io::Error::last_os_error();
        if let Some(e) = permission_error("mounting bpffs on /sys/fs/bpf", &source) {
            return Err(e);
        }
        return Err(MeterError::NotBpfFs { path: dir.to_path_buf() });
    }
    tracing::info!("mounted bpffs on {BPFFS_ROOT}");
    Ok(())
}

fn prepare_pin_dir(dir: &Path) -> Result<(), MeterError> {
    ensure_bpffs_root(dir)?;
    if let Err(source) = fs::create_dir_all(dir) {
        if let Some(e) = permission_error("creating the pin directory", &source) {
            return Err(e);
        }
        return Err(MeterError::PinDir { path: dir.to_path_buf(), source });
    }
    if !is_bpffs(dir)? {
        return Err(MeterError::NotBpfFs { path: dir.to_path_buf() });
    }
    drop_outgrown_stats(dir);
    Ok(())
}

/// A `STATS` map pinned by an older build with fewer slots (before `PassPortal`) would
/// be reused as is, and the new slots could be neither counted nor read. Its counters
/// are statistics only (no credit, no usage), so it is unpinned and recreated.
fn drop_outgrown_stats(dir: &Path) {
    let path = dir.join(MAP_STATS);
    let Ok(map) = aya::maps::MapData::from_pin(&path) else { return };
    let entries = map.info().map(|i| i.max_entries());
    if matches!(entries, Ok(n) if n != bitmesh_common::kernel::STATS_LEN) {
        tracing::warn!(path = %path.display(), ?entries, "pinned STATS map from an older build: recreating it (frame counters restart at zero)");
        let _ = fs::remove_file(&path);
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, MeterError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(MeterError::MissingInObject { what: "program", name })?;
    prog.try_into().map_err(|source| MeterError::Program { operation: "look up", program: name, source: Box::new(source) })
}

fn load_program(ebpf: &mut Ebpf, program: MeterProgram) -> Result<(), MeterError> {
    let name = program.name();
    let result = if program.is_xdp() {
        program_mut::<Xdp>(ebpf, name)?.load()
    } else {
        program_mut::<SchedClassifier>(ebpf, name)?.load()
    };
    result.map_err(|source| match source {
        ProgramError::LoadError { ref io_error, ref verifier_log } => {
            match permission_error("loading BPF programs", io_error) {
                // EACCES with a log is the verifier talking, not a permission problem.
                Some(e) if verifier_log.to_string().len() < 8 => e,
                _ => MeterError::VerifierRejected { program: name, log: verifier_log.to_string(), source: Box::new(source) },
            }
        }
        source => MeterError::Program { operation: "load", program: name, source: Box::new(source) },
    })
}

fn load_error(error: EbpfError) -> MeterError {
    if let Some(io) = root_io_error(&error) {
        if let Some(e) = permission_error("creating BPF maps", io) {
            return e;
        }
    }
    MeterError::Load(Box::new(error))
}

fn attach_error(source: ProgramError, hook: UploadHook, interface: &str) -> MeterError {
    if let Some(io) = root_io_error(&source) {
        if let Some(e) = permission_error("attaching BPF programs", io) {
            return e;
        }
    }
    MeterError::HookUnsupported { hook: hook.to_string(), interface: interface.to_string(), source: Box::new(source) }
}
