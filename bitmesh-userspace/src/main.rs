//! `bitmesh`: controller (`run`), operator CLI and client agent.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("bitmesh: no commands yet")
}
