//! The client job of the harness: the two ways a test plays a client device.
//!
//! * [`Agent`]: the shipped client agent, `bitmesh pay`, as a process in a client
//!   namespace (end-to-end tests, the demo).
//! * [`ScriptedClient`]: a device driven by library calls and raw HTTP, for tests that
//!   must say exactly what a client sends (controller tests, attacks).

mod agent;
mod scripted;

pub use agent::{Agent, AgentOpts};
pub use scripted::ScriptedClient;
