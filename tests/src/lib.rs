//! Test harness shared by the integration tests (one binary per layer: kernel, chain,
//! client, controller, e2e), the demo and the benchmarks. One module per job, each
//! guard removing what it created on drop:
//!
//! * [`env`]: what the machine offers, and how a test that cannot run says so;
//! * [`network`]: namespaces, veths, pin directories, the kernel tests' topology and
//!   the testbed's LAN;
//! * [`chain`]: the regtest node, a coinbase wallet, the relay into a namespace;
//! * [`process`]: where the binary is, how children are started and stopped;
//! * [`controller`]: the controller process (`bitmesh run`);
//! * [`client`]: the client process (`bitmesh pay`) and scripted clients;
//! * [`http`] and [`upstream`]: the HTTP client, and the servers standing in for the
//!   internet;
//! * [`testbed`]: the one harness putting them together;
//! * [`portal`] and [`browser`]: the captive-portal tests' logging internet and raw
//!   checks, and headless Chromium driven over WebDriver in a client namespace;
//! * [`garden_attack`] and [`bench`]: attack tools and measurements.

pub mod bench;
pub mod browser;
pub mod chain;
pub mod client;
pub mod controller;
pub mod env;
pub mod garden_attack;
pub mod http;
pub mod lightning;
pub mod network;
pub mod portal;
pub mod process;
pub mod testbed;
pub mod upstream;
