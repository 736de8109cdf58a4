//! BitMesh userspace: each module has one job; `gateway` is the only place that
//! wires meter + channel + chain + store together. The channel library is the
//! `bitmesh-channel` crate; the client agent (`bitmesh pay`, `bitmesh refund`) is
//! `bitmesh-client`.

/// Load, attach, pin, read and credit the kernel maps (the only code that touches aya).
pub mod meter;
/// Channel script, funding check, update verification, close and refund (pure, no I/O):
/// the `bitmesh-channel` crate, shared with the client. Re-exported under the paths it had
/// inside this crate (`crate::channel`, `crate::chain`) so the move needs no edits here.
pub use bitmesh_channel as channel;
/// The chain trait and its backends (Bitcoin Core RPC, Esplora), in `bitmesh-channel`.
pub use bitmesh_channel::chain;
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

/// The captive portal: redirect listener, nftables table, page, TLS.
pub mod portal;
