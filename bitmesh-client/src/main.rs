//! `bitmesh-client`: the client agent alone (`pay`, `refund`). It builds with stable Rust
//! and nothing else (no bpf-linker, no eBPF object, no SQLite), for laptops and phones
//! that buy bandwidth; the gateway's `bitmesh` binary offers the same commands.

use clap::Parser;

#[derive(Parser)]
#[command(name = "bitmesh-client", version, about = "Buy WiFi by the byte for Bitcoin: the BitMesh client agent")]
struct Cli {
    #[command(subcommand)]
    command: bitmesh_client::ClientCommand,
}

fn main() -> anyhow::Result<()> {
    Cli::parse().command.run()
}
