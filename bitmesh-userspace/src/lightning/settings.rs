//! The Lightning flags of `bitmesh run`, checked and typed: bundles, credit TTL,
//! listen address, alias, LSP, anchor reserve, invoice expiry.

use std::time::Duration;

use bitmesh_common::pricing::{payment_for_bytes, ByteCount, PriceMsatPerMib, MIB, MSAT_PER_SAT};
use bitmesh_common::wire::Bundle;

use crate::config::{ConfigError, RunArgs};

/// A bundle on sale: a name as the operator wrote it and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleSize {
    pub name: String,
    pub bytes: u64,
}

impl BundleSize {
    /// The bundle with its price at `price` (rounded up to a whole satoshi).
    pub fn priced(&self, price: PriceMsatPerMib) -> Bundle {
        Bundle { name: self.name.clone(), bytes: self.bytes, price_msat: invoice_msat(self.bytes, price) }
    }
}

/// What a Lightning invoice for `bytes` asks at `price`: the channel rail's own
/// rounding (up to a whole satoshi, see `pricing`), in millisatoshis. Whole
/// satoshis because many wallets cannot pay millisatoshis.
pub fn invoice_msat(bytes: u64, price: PriceMsatPerMib) -> u64 {
    payment_for_bytes(ByteCount(bytes), price).to_sat().saturating_mul(MSAT_PER_SAT)
}

/// Bytes a receipt credits: the invoice's bytes, or proportionally more when the
/// payer sent more than asked (rounded down). Never fewer than the invoice's bytes:
/// the node only accepts an underpayment when an LSP skimmed its opening fee within
/// the limit the gateway agreed to, and that fee is the gateway's cost, not the buyer's.
pub fn bytes_for_receipt(invoice_bytes: u64, invoice_msat: u64, received_msat: u64) -> u64 {
    if invoice_msat == 0 || received_msat <= invoice_msat {
        return invoice_bytes;
    }
    let scaled = u128::from(invoice_bytes) * u128::from(received_msat) / u128::from(invoice_msat);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// An LSPS2 liquidity provider (`--lsp NODE_ID@HOST:PORT`, `--lsp-token`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LspSettings {
    pub node_id: String,
    pub address: String,
    pub token: Option<String>,
}

/// Everything the Lightning rail runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LightningSettings {
    pub listen: String,
    pub alias: String,
    pub bundles: Vec<BundleSize>,
    pub credit_ttl: Duration,
    pub lsp: Option<LspSettings>,
    pub anchor_reserve_sat: u64,
    pub invoice_expiry: Duration,
}

/// Smallest purchase: one full Ethernet frame, so a bought budget always passes traffic.
pub const MIN_PURCHASE_BYTES: u64 = 1514;
/// Largest purchase in one invoice (1 TiB): keeps amounts far from any overflow.
pub const MAX_PURCHASE_BYTES: u64 = 1 << 40;

impl LightningSettings {
    /// The settings from `run`'s flags; `None` without `--lightning`.
    pub fn from_args(args: &RunArgs) -> Result<Option<LightningSettings>, ConfigError> {
        if !args.lightning {
            return Ok(None);
        }
        let bundles = parse_bundles(&args.bundles)?;
        let credit_ttl = parse_duration(&args.lightning_credit_ttl)
            .ok_or_else(|| bad("lightning-credit-ttl", format!("{:?} is not a duration like 24h, 90m or 3600s", args.lightning_credit_ttl)))?;
        if credit_ttl.is_zero() {
            return Err(bad("lightning-credit-ttl", "must be above zero".into()));
        }
        if args.lightning_alias.len() > 32 {
            return Err(bad("lightning-alias", "must be at most 32 bytes".into()));
        }
        let lsp = match &args.lsp {
            None => None,
            Some(text) => {
                let (node_id, address) = text
                    .split_once('@')
                    .ok_or_else(|| bad("lsp", format!("{text:?} is not NODE_ID@HOST:PORT")))?;
                if node_id.len() != 66 || !node_id.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad("lsp", format!("{node_id:?} is not a node id (66 hex digits)")));
                }
                Some(LspSettings { node_id: node_id.to_owned(), address: address.to_owned(), token: args.lsp_token.clone() })
            }
        };
        if args.lsp_token.is_some() && lsp.is_none() {
            return Err(bad("lsp-token", "needs --lsp".into()));
        }
        if args.invoice_expiry_secs < 60 {
            return Err(bad("invoice-expiry-secs", "must be at least 60 (a wallet needs time to pay)".into()));
        }
        Ok(Some(LightningSettings {
            listen: args.lightning_listen.clone(),
            alias: args.lightning_alias.clone(),
            bundles,
            credit_ttl,
            lsp,
            anchor_reserve_sat: args.lightning_anchor_reserve_sat,
            invoice_expiry: Duration::from_secs(args.invoice_expiry_secs.into()),
        }))
    }

    /// The bundle called `name` (as written, case-insensitive).
    pub fn bundle(&self, name: &str) -> Option<&BundleSize> {
        self.bundles.iter().find(|b| b.name.eq_ignore_ascii_case(name.trim()))
    }
}

fn bad(flag: &'static str, message: String) -> ConfigError {
    ConfigError::Value { flag, message }
}

/// `50MiB,200MiB,1GiB` (units B, KiB, MiB, GiB, also kB/MB/GB as powers of 1000).
pub fn parse_bundles(text: &str) -> Result<Vec<BundleSize>, ConfigError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bytes = parse_size(part)
            .ok_or_else(|| bad("bundles", format!("{part:?} is not a size like 50MiB or 1GiB")))?;
        if !(MIN_PURCHASE_BYTES..=MAX_PURCHASE_BYTES).contains(&bytes) {
            return Err(bad("bundles", format!("{part} is outside {MIN_PURCHASE_BYTES} bytes .. 1TiB")));
        }
        if out.iter().any(|b: &BundleSize| b.name.eq_ignore_ascii_case(part)) {
            return Err(bad("bundles", format!("{part} is listed twice")));
        }
        out.push(BundleSize { name: part.to_owned(), bytes });
    }
    if out.is_empty() {
        return Err(bad("bundles", "name at least one bundle, e.g. 50MiB,200MiB,1GiB".into()));
    }
    Ok(out)
}

fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1024,
        "mib" => MIB,
        "gib" => 1024 * MIB,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `24h`, `90m`, `3600s`, `2d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_parse_with_binary_and_decimal_units() {
        let b = parse_bundles("50MiB, 200MiB,1GiB").unwrap();
        assert_eq!(b.iter().map(|b| b.bytes).collect::<Vec<_>>(), vec![50 * MIB, 200 * MIB, 1024 * MIB]);
        assert_eq!(b[0].name, "50MiB");
        assert_eq!(parse_bundles("1MB").unwrap()[0].bytes, 1_000_000);
        for bad in ["", "50XB", "1B", "2TiB", "5MiB,5mib"] {
            assert!(parse_bundles(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("15"), Some(Duration::from_secs(15)));
        assert_eq!(parse_duration("1w"), None);
    }

    #[test]
    fn invoices_round_up_to_a_whole_satoshi_and_overpayment_buys_more() {
        let price = PriceMsatPerMib::new(1000).unwrap();
        assert_eq!(invoice_msat(MIB, price), 1000);
        assert_eq!(invoice_msat(MIB + 1, price), 2000, "rounded up");
        assert_eq!(bytes_for_receipt(MIB, 1000, 1000), MIB);
        assert_eq!(bytes_for_receipt(MIB, 1000, 2000), 2 * MIB, "overpayment is proportional");
        assert_eq!(bytes_for_receipt(MIB, 1000, 900), MIB, "an LSP's skimmed fee is not the buyer's loss");
    }
}
