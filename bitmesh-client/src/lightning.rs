//! `bitmesh pay --lightning`: buy the gateway's bundles with any Lightning wallet.
//!
//! Each bundle is an invoice printed as text and a terminal QR code; the agent waits
//! until the gateway says it is paid (its device event stream, `GET
//! /v1/device/events`, pushes `invoice_paid` once the payment is journaled and
//! credited; the invoice's status is read when the stream opens, when it is
//! unavailable, and every few seconds for expiry), then watches the budget (the gateway's
//! captive-portal `bytes-remaining` when it reports one, else its own byte count
//! against what it bought) and asks for the next bundle at the low-water mark, as
//! long as `--max-spend` allows and the price is within `--max-price`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bitmesh_common::pricing::{PriceMsatPerMib, MSAT_PER_SAT};
use bitmesh_common::wire::{Bundle, DeviceEvent, Invoice, InvoicePaid, InvoiceRequest, InvoiceState, Terms};

use crate::http::{GatewayApi, HttpError};
use crate::meter::ByteMeter;

/// Why buying stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum LightningPayError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Meter(#[from] crate::meter::ByteMeterError),
    #[error("the gateway sells no Lightning bundles (its terms have no `lightning`): use `bitmesh pay` without --lightning")]
    NotOffered,
    #[error("the gateway's price {price} is above --max-price {limit}")]
    PriceAboveLimit { price: PriceMsatPerMib, limit: PriceMsatPerMib },
    #[error("no bundle {0:?} on this gateway; it sells: {1}")]
    UnknownBundle(String, String),
    #[error("the bundle {name} costs {price_sat} sat, more than --max-spend leaves ({left_sat} sat)")]
    OverBudget { name: String, price_sat: u64, left_sat: u64 },
}

/// What the user allows.
#[derive(Clone, Debug)]
pub struct LightningLimits {
    pub max_price: PriceMsatPerMib,
    pub max_spend_sat: u64,
    /// A bundle name, else the smallest bundle.
    pub bundle: Option<String>,
    pub poll: Duration,
    pub exit_when_spent: bool,
}

/// What the terminal shows.
pub trait LightningUi {
    /// An invoice to pay (text, QR, the token to keep).
    fn show_invoice(&mut self, bundle: &Bundle, invoice: &Invoice, qr: Option<&str>);
    /// Paid: the bytes credited.
    fn paid(&mut self, invoice: &Invoice, bytes_credited: u64);
    /// The invoice expired unpaid.
    fn expired(&mut self, invoice: &Invoice);
    /// A status line: remaining bytes and money spent.
    fn status(&mut self, remaining: u64, spent_msat: u64);
}

/// What a session bought.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LightningSummary {
    pub bundles: u32,
    pub spent_msat: u64,
    pub bytes: u64,
    pub token: Option<String>,
}

/// Pick the bundle: the named one, else the smallest. Checks price and budget.
pub fn choose_bundle(terms: &Terms, limits: &LightningLimits, spent_msat: u64) -> Result<Bundle, LightningPayError> {
    let ln = terms.lightning.as_ref().ok_or(LightningPayError::NotOffered)?;
    if terms.price_msat_per_mib > limits.max_price {
        return Err(LightningPayError::PriceAboveLimit { price: terms.price_msat_per_mib, limit: limits.max_price });
    }
    let bundle = match &limits.bundle {
        Some(name) => ln.bundles.iter().find(|b| b.name.eq_ignore_ascii_case(name)).cloned().ok_or_else(|| {
            LightningPayError::UnknownBundle(name.clone(), ln.bundles.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", "))
        })?,
        None => ln.bundles.iter().min_by_key(|b| b.bytes).cloned().ok_or(LightningPayError::NotOffered)?,
    };
    let left_msat = limits.max_spend_sat.saturating_mul(MSAT_PER_SAT).saturating_sub(spent_msat);
    if bundle.price_msat > left_msat {
        return Err(LightningPayError::OverBudget {
            name: bundle.name.clone(),
            price_sat: bundle.price_msat.div_ceil(MSAT_PER_SAT),
            left_sat: left_msat / MSAT_PER_SAT,
        });
    }
    Ok(bundle)
}

/// Buy bundles until `stop`, the budget, or (with `exit_when_spent`) the last bundle
/// is used up.
pub fn run(
    api: &GatewayApi,
    limits: &LightningLimits,
    meter: &mut dyn ByteMeter,
    stop: &AtomicBool,
    ui: &mut dyn LightningUi,
) -> Result<LightningSummary, LightningPayError> {
    let mut sum = LightningSummary::default();
    let start = meter.bytes()?.0;
    let mut feed: Option<mpsc::Receiver<Feed>> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(sum);
        }
        let terms = api.terms()?;
        let bundle = match choose_bundle(&terms, limits, sum.spent_msat) {
            Ok(b) => b,
            Err(LightningPayError::OverBudget { .. }) if sum.bundles > 0 => {
                // Spent: use what is left, then stop (or wait for Ctrl-C).
                wait_until_low(api, meter, start, &sum, 0, limits, stop, ui)?;
                return Ok(sum);
            }
            Err(e) => return Err(e),
        };
        // The session's code, once it has one: every bundle tops up the same account.
        let inv = api.invoice(&InvoiceRequest { bundle: Some(bundle.name.clone()), bytes: None, token: sum.token.clone() })?;
        let qr = crate::funding::qr_text(&format!("lightning:{}", inv.bolt11.to_uppercase()));
        ui.show_invoice(&bundle, &inv, qr.as_deref());
        sum.token = Some(inv.token.clone());
        // The stream needs a purchase to open: started after the first invoice.
        let feed = feed.get_or_insert_with(|| spawn_device_feed(api.clone()));
        match wait_paid(api, &inv, feed, limits.poll, stop)? {
            Some(bytes_credited) => {
                sum.bundles += 1;
                sum.spent_msat += inv.amount_msat;
                sum.bytes += bytes_credited;
                ui.paid(&inv, bytes_credited);
            }
            None if stop.load(Ordering::SeqCst) => return Ok(sum),
            None => {
                ui.expired(&inv);
                return Ok(sum);
            }
        }
        // Next bundle at the low-water mark: half the bundle left.
        let low = bundle.bytes / 2;
        wait_until_low(api, meter, start, &sum, low, limits, stop, ui)?;
    }
}

/// What the device event stream's reader thread tells the agent.
enum Feed {
    /// The stream (re)opened: a payment credited before it opened sent no event to
    /// it, so the invoice's status is read once now.
    Connected,
    /// A payment for this device is journaled and credited.
    Paid(InvoicePaid),
}

/// How often the invoice's status is read while the stream is open: a backstop
/// for a stream that broke silently, and how expiry is noticed.
const STATUS_BACKSTOP: Duration = Duration::from_secs(5);

/// Read the device event stream on a thread for the rest of the session, reopening
/// it (after a pause) whenever it ends or is refused. Ends when the agent drops the
/// receiver and the next event arrives.
fn spawn_device_feed(api: GatewayApi) -> mpsc::Receiver<Feed> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || loop {
        if let Ok(mut stream) = api.device_events() {
            if tx.send(Feed::Connected).is_err() {
                return;
            }
            while let Some(ev) = stream.next_event() {
                if let DeviceEvent::InvoicePaid(p) = ev {
                    if tx.send(Feed::Paid(p)).is_err() {
                        return;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    rx
}

/// Wait until `inv` is paid (`Some(bytes credited)`), expired or `stop` (`None`).
/// An `invoice_paid` event for it ends the wait at once; the status is read when
/// the stream opens, every `poll` while no stream is open (an older gateway, or
/// one at its stream limit), and every [`STATUS_BACKSTOP`] otherwise.
fn wait_paid(
    api: &GatewayApi,
    inv: &Invoice,
    feed: &mpsc::Receiver<Feed>,
    poll: Duration,
    stop: &AtomicBool,
) -> Result<Option<u64>, LightningPayError> {
    let mut streaming = false;
    let mut check_at = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        if Instant::now() >= check_at {
            let st = api.invoice_status(&inv.payment_hash)?;
            match st.state {
                InvoiceState::Paid => return Ok(Some(st.bytes_credited)),
                InvoiceState::Expired => return Ok(None),
                InvoiceState::Pending => {}
            }
            check_at = Instant::now() + if streaming { STATUS_BACKSTOP } else { poll };
        }
        let wait = check_at.saturating_duration_since(Instant::now()).min(poll.max(Duration::from_millis(100)));
        match feed.recv_timeout(wait) {
            Ok(Feed::Paid(p)) if p.payment_hash == inv.payment_hash => return Ok(Some(p.bytes_credited)),
            Ok(Feed::Paid(_)) => {}
            Ok(Feed::Connected) => {
                streaming = true;
                check_at = Instant::now();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => streaming = false,
        }
    }
}

/// Wait until the remaining budget falls to `low` (or `stop`). The remaining budget
/// is the gateway's RFC 8908 `bytes-remaining` when it reports one, else what this
/// session bought minus what this device counted since it started.
#[allow(clippy::too_many_arguments)]
fn wait_until_low(
    api: &GatewayApi,
    meter: &mut dyn ByteMeter,
    start: u64,
    sum: &LightningSummary,
    low: u64,
    limits: &LightningLimits,
    stop: &AtomicBool,
    ui: &mut dyn LightningUi,
) -> Result<(), LightningPayError> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let own = meter.bytes()?.0.saturating_sub(start);
        let estimate = sum.bytes.saturating_sub(own);
        let remaining = match api.captive() {
            // Captive: the gateway counts less than one full frame left, which carries
            // nothing a person can use, so the budget is spent (the kernel's remainder
            // below a frame never reaches 0 by itself).
            Ok(c) if c.captive => 0,
            Ok(c) => c.bytes_remaining.unwrap_or(estimate),
            Err(_) => estimate,
        };
        ui.status(remaining, sum.spent_msat);
        if remaining <= low {
            if low == 0 && !limits.exit_when_spent {
                std::thread::sleep(limits.poll);
                continue;
            }
            return Ok(());
        }
        std::thread::sleep(limits.poll);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bitmesh_common::wire::LightningTerms;

    fn terms() -> Terms {
        Terms {
            lightning: Some(LightningTerms {
                node_id: "02".repeat(33),
                bundles: vec![
                    Bundle { name: "50MiB".into(), bytes: 50 << 20, price_msat: 50_000 },
                    Bundle { name: "1GiB".into(), bytes: 1 << 30, price_msat: 1_024_000 },
                ],
                credit_ttl_secs: 86_400,
            }),
            ..crate::terms::tests::terms()
        }
    }

    fn limits(bundle: Option<&str>, max_spend_sat: u64) -> LightningLimits {
        LightningLimits {
            max_price: PriceMsatPerMib::new(5000).unwrap(),
            max_spend_sat,
            bundle: bundle.map(str::to_owned),
            poll: Duration::from_millis(10),
            exit_when_spent: true,
        }
    }

    #[test]
    fn the_smallest_bundle_within_price_and_budget_is_chosen() {
        assert_eq!(choose_bundle(&terms(), &limits(None, 100), 0).unwrap().name, "50MiB");
        assert_eq!(choose_bundle(&terms(), &limits(Some("1gib"), 2000), 0).unwrap().name, "1GiB");
        assert!(matches!(choose_bundle(&terms(), &limits(Some("1GiB"), 100), 0), Err(LightningPayError::OverBudget { .. })));
        assert!(matches!(choose_bundle(&terms(), &limits(None, 100), 60_000), Err(LightningPayError::OverBudget { .. })));
        assert!(matches!(choose_bundle(&terms(), &limits(Some("2GiB"), 100), 0), Err(LightningPayError::UnknownBundle(..))));
        let mut t = terms();
        t.price_msat_per_mib = PriceMsatPerMib::new(6000).unwrap();
        assert!(matches!(choose_bundle(&t, &limits(None, 100), 0), Err(LightningPayError::PriceAboveLimit { .. })));
        t.lightning = None;
        assert!(matches!(choose_bundle(&t, &limits(None, 100), 0), Err(LightningPayError::NotOffered)));
    }
}
