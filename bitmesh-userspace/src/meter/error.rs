//! Every way the meter can fail, each message saying what to do about it.

use std::io;
use std::path::PathBuf;

use bitmesh_common::kernel::Mac;

/// Errors of the loader and the map accessors.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The interface does not exist.
    #[error("interface {interface} not found: check the name with `ip link` (the meter attaches to the client-facing interface, e.g. wlan0)")]
    InterfaceNotFound {
        /// The name asked for.
        interface: String,
    },

    /// Not root (no CAP_BPF / CAP_NET_ADMIN).
    #[error("{operation} needs root (CAP_BPF and CAP_NET_ADMIN): run the controller as root")]
    NotRoot {
        /// What was attempted.
        operation: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// Root, but the kernel still refuses BPF.
    #[error("the kernel refused {operation} although we are root: BPF is disabled here (kernel lockdown, a container's seccomp profile, or a kernel without CONFIG_BPF_SYSCALL); run on a host that allows BPF")]
    BpfNotPermitted {
        /// What was attempted.
        operation: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// The pin directory is not on a bpffs.
    #[error("{path} is not on a BPF filesystem: mount it with `mount -t bpf bpf /sys/fs/bpf` or choose a pin directory under a bpffs")]
    NotBpfFs {
        /// The pin directory.
        path: PathBuf,
    },

    /// Creating or cleaning the pin directory failed.
    #[error("cannot use pin directory {path}")]
    PinDir {
        /// The pin directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },

    /// Maps were asked for from a pin directory that has none.
    #[error("no pinned BitMesh maps in {path}: start the controller (`bitmesh run`) first, or pass the pin directory it uses")]
    NotPinned {
        /// The pin directory.
        path: PathBuf,
        /// The open error.
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// The verifier refused a program (a bug in bitmesh-ebpf or an unsupported kernel).
    #[error("the kernel verifier rejected program {program}; this kernel cannot run this build of bitmesh-ebpf (report it with this log):\n{log}")]
    VerifierRejected {
        /// Program name.
        program: &'static str,
        /// The verifier log.
        log: String,
        /// The load error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// The hook cannot be used on this interface.
    #[error("hook {hook} is not supported on interface {interface}: choose another hook (`tc` works everywhere; `xdp-generic` works on any driver)")]
    HookUnsupported {
        /// The hook asked for.
        hook: String,
        /// The interface.
        interface: String,
        /// The attach error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// Parsing or creating the object's maps failed.
    #[error("loading the BitMesh eBPF object failed (rebuild it with `cargo xtask build-ebpf`; if the pinned maps in the pin directory come from an incompatible version, remove them)")]
    Load(#[source] Box<aya::EbpfError>),

    /// The object lacks a program or map it must have (stale object).
    #[error("the eBPF object has no {what} named {name}: rebuild it with `cargo xtask build-ebpf`")]
    MissingInObject {
        /// "program" or "map".
        what: &'static str,
        /// The name looked for.
        name: &'static str,
    },

    /// Any other program operation (load, attach, detach, test run).
    #[error("{operation} of program {program} failed")]
    Program {
        /// What was attempted.
        operation: &'static str,
        /// Program name.
        program: &'static str,
        /// The aya error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// A link operation (pin, reuse after restart) failed.
    #[error("{operation} of the {program} attachment failed")]
    Link {
        /// What was attempted.
        operation: &'static str,
        /// Program name.
        program: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A map operation failed.
    #[error("{operation} on map {map} failed")]
    Map {
        /// What was attempted.
        operation: &'static str,
        /// Map name.
        map: &'static str,
        /// The aya error.
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// The credit of a MAC may only increase.
    #[error("credit of {mac} can only increase: it is {current} bytes, {requested} requested")]
    CreditDecrease {
        /// The client.
        mac: Mac,
        /// Credit in the map.
        current: u64,
        /// Credit asked for.
        requested: u64,
    },

    /// Credit was raised for a MAC the kernel does not meter. Raising credit never
    /// creates a client (a replayed update of a closed channel must not bring one
    /// back): entries are created only when a channel opens.
    #[error("{mac} is not metered: credit is raised only for a client whose channel is open (its entries are created when the channel is funded)")]
    NotMetered {
        /// The client.
        mac: Mac,
    },

    /// The MAC is broadcast/multicast and can never be a client.
    #[error("{mac} is a group (broadcast/multicast) address, not a client")]
    GroupMac {
        /// The address.
        mac: Mac,
    },
}

/// Map an `io::Error` from a BPF syscall to not-root / not-permitted, if it is one.
pub(super) fn permission_error(operation: &'static str, error: &io::Error) -> Option<MeterError> {
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            let source = io::Error::from_raw_os_error(error.raw_os_error().unwrap_or(libc::EPERM));
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                Some(MeterError::NotRoot { operation, source })
            } else {
                Some(MeterError::BpfNotPermitted { operation, source })
            }
        }
        _ => None,
    }
}

/// The `io::Error` at the bottom of an aya error chain, if any.
pub(super) fn root_io_error<'a>(mut error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    loop {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Some(io);
        }
        error = error.source()?;
    }
}

// aya's errors are large; they are boxed so `Result<_, MeterError>` stays small on
// every caller's hot path (clippy::result_large_err).
const _: () = assert!(std::mem::size_of::<MeterError>() <= 64);
