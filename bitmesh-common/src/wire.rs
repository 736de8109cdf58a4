//! The messages gateway and client exchange (JSON over HTTP), as serde types.
//!
//! The channel protocol these messages drive is in `docs/protocol.md`. Conventions:
//!
//! * amounts are integers in satoshis (`"total_paid_sat": 1500`), byte counts are
//!   integers, heights are block heights (integers);
//! * keys, scripts, transactions and signatures are lower-case hex strings;
//! * outpoints are `"<txid>:<vout>"`;
//! * every error is an [`ErrorBody`] with a stable machine code ([`ErrorCode`]) and a
//!   human message; clients branch on the code, never on the message.
//!
//! The flow: `GET terms` -> [`Terms`]; `POST open` [`OpenRequest`] -> [`OpenResponse`]
//! (the gateway's fresh key and the funding script); the client funds the script and
//! sends [`FundRequest`] -> [`ChannelStatus`]; then one [`PaymentUpdate`] per prepaid
//! chunk -> [`PaymentAck`]; finally [`CloseRequest`] -> [`CloseResponse`].
//! Meanwhile the channel's event stream pushes [`ClientEvent`]s, and any device may
//! ask the RFC 8908 [`CaptiveStatus`]. The paths are in [`routes`].

use bitcoin::address::NetworkUnchecked;
use bitcoin::hashes::{sha256, Hash, HashEngine};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::{absolute, Address, Amount, Network, OutPoint, PublicKey, ScriptBuf};
use bitcoin::{Transaction, Txid};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pricing::{ByteCount, PriceMsatPerMib};

mod captive;
mod device;
mod events;
mod limits;
mod lightning;
pub mod routes;
mod signed;

pub use captive::{CaptiveStatus, CAPTIVE_JSON};
pub use device::DeviceStatus;
pub use events::{ClientEvent, UsageReport};
pub use limits::ChannelLimits;
pub use lightning::{
    Bundle, DeviceCredit, DeviceEvent, Invoice, InvoicePaid, InvoiceRequest, InvoiceState, InvoiceStatus, LightningTerms, Rail, RestoreRequest,
    RestoreResponse,
};
pub use signed::{SignedAction, SignedRequest};

/// Version of this message set; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// A channel's identity: SHA-256 of its witness script (the P2WSH program).
///
/// Known as soon as the gateway has chosen its key, before funding, and unique because
/// the gateway never reuses a channel key. Serialized as 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelId(pub [u8; 32]);

impl ChannelId {
    /// The id of the channel whose witness script is `witness_script`.
    pub fn from_witness_script(witness_script: &bitcoin::Script) -> ChannelId {
        ChannelId(sha256::Hash::hash(witness_script.as_bytes()).to_byte_array())
    }
}

impl core::fmt::Display for ChannelId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0.as_hex())
    }
}

impl core::str::FromStr for ChannelId {
    type Err = bitcoin::hex::HexToArrayError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <[u8; 32]>::from_hex(s).map(ChannelId)
    }
}

impl Serialize for ChannelId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChannelId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Raw signature bytes as sent on the wire (hex).
///
/// Kept as bytes, not a parsed signature, so the gateway can reject a non-strict-DER,
/// high-S or wrong-flag signature with its own error code instead of a parse failure.
/// For a [`PaymentUpdate`]: DER signature followed by the one-byte sighash flag.
/// For a [`CloseRequest`] and a signed GET: DER signature only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SignatureBytes(pub Vec<u8>);

impl Serialize for SignatureBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.as_hex())
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Vec::<u8>::from_hex(&s)
            .map(SignatureBytes)
            .map_err(serde::de::Error::custom)
    }
}

/// What the gateway charges and accepts; shown to the user before paying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// [`PROTOCOL_VERSION`] the gateway speaks.
    pub protocol_version: u32,
    /// Chain the channel lives on.
    pub network: Network,
    /// Price of data, in millisatoshis per MiB (see `pricing`).
    pub price_msat_per_mib: PriceMsatPerMib,
    /// How many bytes one prepaid update should buy ahead of use.
    pub chunk_bytes: ByteCount,
    /// Capacity, expiry window, confirmations and close fee rate (flattened: its
    /// fields sit at the top level of the JSON object).
    #[serde(flatten)]
    pub limits: ChannelLimits,
    /// The first update must pay at least this (close fee at the planning rate + dust).
    #[serde(
        with = "bitcoin::amount::serde::as_sat",
        rename = "min_first_payment_sat"
    )]
    pub min_first_payment: Amount,
    /// The gateway's view of the chain tip, to pick an expiry from.
    pub tip_height: absolute::Height,
    /// Lightning bundles, when the gateway runs a Lightning node (`--lightning`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lightning: Option<LightningTerms>,
}

/// Ask the gateway for a channel key: the first step of opening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The client's key in the script (compressed SEC1, 33 bytes).
    pub client_pubkey: PublicKey,
    /// Block height after which the client can take its money back.
    pub expiry: absolute::Height,
    /// Where the client's change goes in the close transaction (a standard script:
    /// P2WPKH, P2WSH, P2TR, P2PKH or P2SH). Fixed for the channel's life.
    pub client_change_script: ScriptBuf,
}

/// The gateway's answer to [`OpenRequest`]: what the client must fund.
///
/// The client MUST rebuild `witness_script` from (gateway_pubkey, client_pubkey,
/// expiry) itself and check it matches before funding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenResponse {
    /// The channel's id (SHA-256 of the witness script).
    pub channel_id: ChannelId,
    /// The gateway's fresh key for this channel.
    pub gateway_pubkey: PublicKey,
    /// Echo of the client's key.
    pub client_pubkey: PublicKey,
    /// Echo of the expiry height.
    pub expiry: absolute::Height,
    /// The witness script (see `docs/protocol.md`).
    pub witness_script: ScriptBuf,
    /// The P2WSH output script to fund.
    pub funding_script_pubkey: ScriptBuf,
    /// The same as an address, for a wallet or a BIP21 URI.
    pub funding_address: Address<NetworkUnchecked>,
    /// Smallest capacity the gateway accepts.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "min_capacity_sat")]
    pub min_capacity: Amount,
    /// Largest capacity the gateway accepts.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "max_capacity_sat")]
    pub max_capacity: Amount,
    /// The first update must pay at least this.
    #[serde(
        with = "bitcoin::amount::serde::as_sat",
        rename = "min_first_payment_sat"
    )]
    pub min_first_payment: Amount,
}

/// Tell the gateway the channel is funded (the gateway relays the transaction if it
/// is not yet known, so a client without internet access can fund).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundRequest {
    /// The channel from [`OpenResponse`].
    pub channel_id: ChannelId,
    /// The whole funding transaction; every input must be segwit.
    #[serde(with = "tx_hex")]
    pub funding_tx: Transaction,
    /// Index of the channel output in `funding_tx`.
    pub funding_vout: u32,
}

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// Key handed out, no accepted funding yet.
    AwaitingFunding,
    /// Funding accepted; updates are credited.
    Open,
    /// Close transaction broadcast, not yet confirmed.
    Closing,
    /// Close transaction confirmed.
    Closed,
    /// Past `expiry - close_margin` without a close by the gateway; the client should
    /// broadcast its refund after expiry.
    Expired,
}

/// A channel as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// The channel.
    pub channel_id: ChannelId,
    /// Its state.
    pub state: ChannelState,
    /// Funding outpoint, once funded.
    pub funding_outpoint: Option<OutPoint>,
    /// Funding value, once funded.
    #[serde(with = "bitcoin::amount::serde::as_sat::opt", rename = "capacity_sat")]
    #[serde(default)]
    pub capacity: Option<Amount>,
    /// Expiry height.
    pub expiry: absolute::Height,
    /// Cumulative amount paid to the gateway by the last accepted update.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "total_paid_sat")]
    pub total_paid: Amount,
    /// Bytes credited for `total_paid` (pricing of the channel's terms).
    pub credited_bytes: ByteCount,
    /// Bytes the gateway has metered for this client.
    pub used_bytes: ByteCount,
    /// `credited - used`, never negative.
    pub remaining_bytes: ByteCount,
    /// The close transaction, once broadcast.
    pub close_txid: Option<Txid>,
}

/// One payment: the client's signature over the close transaction paying the gateway
/// a new cumulative `total_paid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentUpdate {
    /// The channel.
    pub channel_id: ChannelId,
    /// New cumulative amount for the gateway; must exceed the previous one.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "total_paid_sat")]
    pub total_paid: Amount,
    /// DER signature + sighash flag (0x83 SINGLE|ANYONECANPAY, or 0x82
    /// NONE|ANYONECANPAY when `total_paid` equals the capacity).
    pub signature: SignatureBytes,
}

/// The gateway's acknowledgement of an update: sent only after the update is durably
/// stored and the bytes are credited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAck {
    /// The channel.
    pub channel_id: ChannelId,
    /// The accepted cumulative total.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "total_paid_sat")]
    pub total_paid: Amount,
    /// What the client gets back at close (capacity - total_paid).
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "client_change_sat")]
    pub client_change: Amount,
    /// Total bytes credited for `total_paid`.
    pub credited_bytes: ByteCount,
    /// Bytes metered so far.
    pub used_bytes: ByteCount,
}

/// Ask the gateway to close now (the client is done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRequest {
    /// The channel.
    pub channel_id: ChannelId,
    /// Request counter, as for a signed GET (milliseconds since the Unix epoch,
    /// strictly increasing per channel): a captured close request cannot be replayed.
    pub counter: u64,
    /// DER ECDSA signature by the channel's client key over
    /// [`client_request_digest`]`("close", channel_id, counter)`: only the client may
    /// close early.
    pub signature: SignatureBytes,
}

/// The gateway's answer to [`CloseRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseResponse {
    /// The channel.
    pub channel_id: ChannelId,
    /// Its state after the request (normally `closing`).
    pub state: ChannelState,
    /// The close transaction, if broadcast.
    pub close_txid: Option<Txid>,
    /// The final total paid.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "total_paid_sat")]
    pub total_paid: Amount,
    /// What the client gets back.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "client_change_sat")]
    pub client_change: Amount,
}

/// The 32-byte message a client signs with its channel key to authenticate a request
/// about the channel: `SHA256("bitmesh/v1/" || action || "/" || channel_id)`.
pub fn client_auth_digest(action: &str, channel_id: &ChannelId) -> [u8; 32] {
    let mut engine = sha256::Hash::engine();
    engine.input(b"bitmesh/v1/");
    engine.input(action.as_bytes());
    engine.input(b"/");
    engine.input(&channel_id.0);
    sha256::Hash::from_engine(engine).to_byte_array()
}

/// The 32-byte message a client signs to authenticate a channel-scoped GET
/// (`status`, `events`): `SHA256("bitmesh/v1/" || action || "/" || channel_id ||
/// counter as 8 bytes big-endian)`. The counter (milliseconds since the Unix epoch,
/// strictly increasing per channel) makes every signature single-use: the gateway
/// refuses a counter it has already seen or one outside [`CLIENT_AUTH_WINDOW_MS`].
pub fn client_request_digest(action: &str, channel_id: &ChannelId, counter: u64) -> [u8; 32] {
    let mut engine = sha256::Hash::engine();
    engine.input(b"bitmesh/v1/");
    engine.input(action.as_bytes());
    engine.input(b"/");
    engine.input(&channel_id.0);
    engine.input(&counter.to_be_bytes());
    sha256::Hash::from_engine(engine).to_byte_array()
}

/// How far (either way, in milliseconds) a request counter may be from the
/// gateway's clock: 120 s.
pub const CLIENT_AUTH_WINDOW_MS: u64 = 120_000;

/// Header carrying the client-key signature on channel-scoped GET requests:
/// `<counter>.<hex DER ECDSA signature>`, the signature over
/// [`client_request_digest`] with action `status` or `events` and the counter in
/// decimal.
pub const AUTH_HEADER: &str = "x-bitmesh-signature";

/// Every error the gateway returns: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub code: ErrorCode,
    /// For humans; may change between versions.
    pub message: String,
}

/// The stable error codes. Serialized as the snake_case string from
/// [`ErrorCode::as_str`]; the table in `docs/protocol.md` lists them all.
///
/// A client that meets a code it does not know gets [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    // --- opening: keys, script, expiry ---
    /// Client key is not a valid compressed public key.
    InvalidPubkey,
    /// Client change script is not a standard output script.
    ChangeScriptNonstandard,
    /// Expiry height is at or below the current tip.
    ExpiryInPast,
    /// Expiry is fewer than `min_expiry_blocks` above the tip.
    ExpiryTooClose,
    /// Expiry is more than `max_expiry_blocks` above the tip.
    ExpiryTooFar,
    // --- funding ---
    /// The funding transaction has no output at `funding_vout`.
    FundingOutputMissing,
    /// The funded output's script is not P2WSH of the channel's witness script.
    FundingScriptMismatch,
    /// The funded value is outside `[min_capacity, max_capacity]`.
    CapacityOutOfRange,
    /// Another channel already uses this outpoint.
    DuplicateOutpoint,
    /// A funding input is not segwit, so the funding txid could be malleated.
    FundingInputNotSegwit,
    /// Funding is unconfirmed (or under-confirmed) and above the zero-conf cap.
    FundingUnconfirmed,
    /// The chain does not know the funding transaction and it could not be relayed.
    FundingNotFound,
    /// The channel's funding output vanished before it confirmed (double-spent or
    /// dropped from the mempool): the channel takes no more payments and is never
    /// settled; the client keeps (or already spent) its coins.
    FundingDoubleSpent,
    // --- updates ---
    /// The channel no longer takes payments: the tip reached `expiry - close_margin`.
    ChannelExpired,
    /// `total_paid` is not above the last accepted total.
    AmountNotIncreasing,
    /// `total_paid` exceeds the channel capacity.
    AmountAboveCapacity,
    /// The first payment does not cover the close fee plus dust.
    FirstPaymentTooSmall,
    /// `capacity - total_paid` is neither zero nor at least the dust limit.
    ClientChangeBelowDust,
    /// The gateway's output would be dust after paying the close fee.
    GatewayOutputBelowDust,
    /// The signature's sighash flag is not the one the protocol requires.
    WrongSighashFlag,
    /// The signature is not strict DER.
    SignatureNotDer,
    /// The signature's S value is above half the curve order.
    SignatureHighS,
    /// The signature does not verify against the rebuilt close transaction
    /// (bad signature, or one made for another channel or amount).
    SignatureInvalid,
    /// The assembled close transaction fails Bitcoin Core's script interpreter.
    CloseScriptInvalid,
    // --- API level ---
    /// Malformed request body or parameters.
    BadRequest,
    /// No channel with this id.
    UnknownChannel,
    /// The request is not authenticated by the channel's client (key or MAC).
    Unauthorized,
    /// The signed request counter was already used (a replay) or is more than
    /// 120 s away from the gateway's clock: sign again with a fresh counter.
    AuthReplayed,
    /// The channel is not in a state that allows this request.
    ChannelNotOpen,
    /// Too many requests; retry later.
    RateLimited,
    /// The gateway cannot reach its chain backend; retry later.
    ChainUnavailable,
    /// Anything else on the gateway's side; retry later.
    Internal,
    // --- Lightning ---
    /// The gateway has no Lightning node running (`--lightning` off, or starting).
    LightningUnavailable,
    /// No bundle of that name in the terms.
    UnknownBundle,
    /// The bytes asked are below one full frame or above the largest bundle allowed.
    BytesOutOfRange,
    /// No invoice with this payment hash.
    UnknownInvoice,
    /// No purchase account with this token.
    UnknownToken,
    /// The token's credit has expired (`credit_ttl_secs` after its last purchase).
    TokenExpired,
    /// A code this client version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, in documentation order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidPubkey,
        ErrorCode::ChangeScriptNonstandard,
        ErrorCode::ExpiryInPast,
        ErrorCode::ExpiryTooClose,
        ErrorCode::ExpiryTooFar,
        ErrorCode::FundingOutputMissing,
        ErrorCode::FundingScriptMismatch,
        ErrorCode::CapacityOutOfRange,
        ErrorCode::DuplicateOutpoint,
        ErrorCode::FundingInputNotSegwit,
        ErrorCode::FundingUnconfirmed,
        ErrorCode::FundingNotFound,
        ErrorCode::FundingDoubleSpent,
        ErrorCode::ChannelExpired,
        ErrorCode::AmountNotIncreasing,
        ErrorCode::AmountAboveCapacity,
        ErrorCode::FirstPaymentTooSmall,
        ErrorCode::ClientChangeBelowDust,
        ErrorCode::GatewayOutputBelowDust,
        ErrorCode::WrongSighashFlag,
        ErrorCode::SignatureNotDer,
        ErrorCode::SignatureHighS,
        ErrorCode::SignatureInvalid,
        ErrorCode::CloseScriptInvalid,
        ErrorCode::BadRequest,
        ErrorCode::UnknownChannel,
        ErrorCode::Unauthorized,
        ErrorCode::AuthReplayed,
        ErrorCode::ChannelNotOpen,
        ErrorCode::RateLimited,
        ErrorCode::ChainUnavailable,
        ErrorCode::Internal,
        ErrorCode::LightningUnavailable,
        ErrorCode::UnknownBundle,
        ErrorCode::BytesOutOfRange,
        ErrorCode::UnknownInvoice,
        ErrorCode::UnknownToken,
        ErrorCode::TokenExpired,
        ErrorCode::Unknown,
    ];

    /// The stable string of this code (what appears in JSON).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidPubkey => "invalid_pubkey",
            ErrorCode::ChangeScriptNonstandard => "change_script_nonstandard",
            ErrorCode::ExpiryInPast => "expiry_in_past",
            ErrorCode::ExpiryTooClose => "expiry_too_close",
            ErrorCode::ExpiryTooFar => "expiry_too_far",
            ErrorCode::FundingOutputMissing => "funding_output_missing",
            ErrorCode::FundingScriptMismatch => "funding_script_mismatch",
            ErrorCode::CapacityOutOfRange => "capacity_out_of_range",
            ErrorCode::DuplicateOutpoint => "duplicate_outpoint",
            ErrorCode::FundingInputNotSegwit => "funding_input_not_segwit",
            ErrorCode::FundingUnconfirmed => "funding_unconfirmed",
            ErrorCode::FundingNotFound => "funding_not_found",
            ErrorCode::FundingDoubleSpent => "funding_double_spent",
            ErrorCode::ChannelExpired => "channel_expired",
            ErrorCode::AmountNotIncreasing => "amount_not_increasing",
            ErrorCode::AmountAboveCapacity => "amount_above_capacity",
            ErrorCode::FirstPaymentTooSmall => "first_payment_too_small",
            ErrorCode::ClientChangeBelowDust => "client_change_below_dust",
            ErrorCode::GatewayOutputBelowDust => "gateway_output_below_dust",
            ErrorCode::WrongSighashFlag => "wrong_sighash_flag",
            ErrorCode::SignatureNotDer => "signature_not_der",
            ErrorCode::SignatureHighS => "signature_high_s",
            ErrorCode::SignatureInvalid => "signature_invalid",
            ErrorCode::CloseScriptInvalid => "close_script_invalid",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::AuthReplayed => "auth_replayed",
            ErrorCode::ChannelNotOpen => "channel_not_open",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ChainUnavailable => "chain_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::LightningUnavailable => "lightning_unavailable",
            ErrorCode::UnknownBundle => "unknown_bundle",
            ErrorCode::BytesOutOfRange => "bytes_out_of_range",
            ErrorCode::UnknownInvoice => "unknown_invoice",
            ErrorCode::UnknownToken => "unknown_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serde helper: a transaction as consensus-encoded hex.
pub mod tx_hex {
    use bitcoin::consensus::encode;
    use bitcoin::Transaction;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as hex.
    pub fn serialize<S: Serializer>(tx: &Transaction, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode::serialize_hex(tx))
    }

    /// Deserialize from hex.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Transaction, D::Error> {
        let s = String::deserialize(d)?;
        encode::deserialize_hex(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn error_codes_serialize_as_their_stable_strings() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn error_codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
        }
    }

    #[test]
    fn unknown_error_code_from_a_newer_gateway_is_tolerated() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"code":"brand_new_code","message":"x"}"#).unwrap();
        assert_eq!(body.code, ErrorCode::Unknown);
    }

    #[test]
    fn payment_update_json_uses_sat_and_hex() {
        let update = PaymentUpdate {
            channel_id: ChannelId([7; 32]),
            total_paid: Amount::from_sat(1500),
            signature: SignatureBytes(vec![0x30, 0x01, 0x83]),
        };
        let json = serde_json::to_value(&update).unwrap();
        assert_eq!(json["total_paid_sat"], 1500);
        assert_eq!(json["signature"], "300183");
        assert_eq!(json["channel_id"], "07".repeat(32));
        let back: PaymentUpdate = serde_json::from_value(json).unwrap();
        assert_eq!(back, update);
    }

    #[test]
    fn fund_request_round_trips_the_transaction_as_hex() {
        let tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![],
            output: vec![bitcoin::TxOut {
                value: Amount::from_sat(10_000),
                script_pubkey: ScriptBuf::new_op_return([1u8; 4]),
            }],
        };
        let req = FundRequest {
            channel_id: ChannelId([1; 32]),
            funding_tx: tx,
            funding_vout: 0,
        };
        let json = serde_json::to_value(&req).unwrap();
        assert!(json["funding_tx"].is_string());
        assert_eq!(serde_json::from_value::<FundRequest>(json).unwrap(), req);
    }

    #[test]
    fn channel_id_parses_its_display() {
        let id = ChannelId([0xab; 32]);
        assert_eq!(ChannelId::from_str(&id.to_string()).unwrap(), id);
        assert!(ChannelId::from_str("abcd").is_err());
    }

    #[test]
    fn auth_digest_binds_action_and_channel() {
        let a = ChannelId([1; 32]);
        let b = ChannelId([2; 32]);
        assert_ne!(
            client_auth_digest("close", &a),
            client_auth_digest("close", &b)
        );
        assert_ne!(
            client_auth_digest("close", &a),
            client_auth_digest("status", &a)
        );
    }

    #[test]
    fn request_digest_binds_the_counter() {
        let a = ChannelId([1; 32]);
        assert_ne!(client_request_digest("status", &a, 1), client_request_digest("status", &a, 2));
        assert_ne!(client_request_digest("status", &a, 1), client_request_digest("events", &a, 1));
        assert_ne!(client_request_digest("status", &a, 1), client_auth_digest("status", &a));
    }
}
