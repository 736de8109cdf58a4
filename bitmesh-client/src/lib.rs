//! The client agent (`bitmesh pay`, `bitmesh refund`, docs/design.md section 6).
//!
//! * [`discovery`]: find the gateway (flag, DHCP captive-portal URI, default route);
//! * [`http`]: the gateway's JSON API (all route paths in one place);
//! * [`terms`]: the user's limits against the gateway's terms (pure);
//! * [`tip`]: the gateway's chain tip (it sets the refund lock) against the agent's own;
//! * [`policy`]: how much to sign next (pure): never above received + one chunk;
//! * [`lightning`]: `bitmesh pay --lightning`, bundles bought with any Lightning wallet;
//! * [`funding`]: build and sign the funding from given keys, or a BIP21 URI + QR;
//! * [`meter`]: the agent's own byte count (interface counters);
//! * [`state`]: durable channel state (0600, atomic, saved before each update);
//! * [`session`]: one pay session, wiring the above;
//! * [`refund`]: the refund after expiry;
//! * [`cli`]: the `pay` and `refund` flags and everything printed;
//! * [`command`]: the `pay`/`refund` subcommands both binaries (`bitmesh-client`, `bitmesh`) run.

pub mod cli;
pub mod command;
pub mod discovery;
pub mod events;
pub mod funding;
pub mod http;
pub mod lightning;
pub mod meter;
pub mod policy;
pub mod refund;
pub mod session;
pub mod state;
pub mod terms;
pub mod tip;

pub use command::ClientCommand;
