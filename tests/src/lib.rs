//! Test harness shared by the integration tests: guards that own namespaces,
//! veth pairs, regtest nodes and controller processes, and remove them on drop.

pub mod bitcoind;
pub mod browser;
pub mod controller;
pub mod controller_load;
pub mod controller_memory;
pub mod env;
pub mod garden_attack;
pub mod http;
pub mod kernel_bench;
pub mod netns;
pub mod portal;
pub mod process;
pub mod world;
