//! BitMesh userspace: each module has one job; `gateway` is the only place that
//! wires meter + channel + chain + store together. The channel library is the
//! `bitmesh-channel` crate; the client agent (`bitmesh pay`, `bitmesh refund`) is
//! `bitmesh-client`.

/// Load, attach, pin, read and credit the kernel maps (the only code that touches aya).
pub mod meter;
/// SQLite schema, migrations, the durable payment journal.
pub mod store;
/// `bitmesh run` flags and the policy they configure.
pub mod config;
/// The client-facing HTTP API: decoding, limits, error codes.
pub mod api;
/// The operator's unix-socket API and what the CLI prints.
pub mod admin;
/// The controller: verify, persist, credit, ack.
pub mod gateway;
/// The Lightning rail: the embedded node, bundles, purchase tokens, its event loop.
pub mod lightning;
/// systemd readiness notification (`Type=notify`): READY=1, STOPPING=1.
pub mod notify;
/// The capabilities `bitmesh run` needs (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON).
pub mod privileges;
/// The captive portal: redirect listener, nftables table, page, TLS.
pub mod portal;
