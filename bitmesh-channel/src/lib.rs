//! Payment channels (docs/design.md section 4): script, funding check, update signing and
//! verification, close and refund transactions.
//!
//! Pure: functions take transactions, keys and heights and return transactions or a
//! typed [`ChannelError`]; chain and store calls happen in `gateway/` and `client/`.
//! The one exception is [`keys`], which reads or creates the gateway's seed file.
//!
//! Bitcoin Core's own script interpreter (libbitcoinconsensus, via rust-bitcoin's
//! `bitcoinconsensus` feature) checks every assembled close transaction before an
//! update is accepted (`close_script_invalid`).
//!
//! The protocol, for someone writing another client, is `docs/protocol.md`.

use std::sync::OnceLock;

use bitcoin::secp256k1::{All, Secp256k1};
use bitcoin::{absolute, transaction, Amount, FeeRate, OutPoint, ScriptBuf, Sequence, Weight};
use bitmesh_common::blocks::{BlockCount, HeightExt};
use bitmesh_common::wire::{ChannelLimits, ErrorCode};

pub mod bench;
/// The chain trait and its backends (Bitcoin Core RPC, Esplora).
pub mod chain;
mod close;
mod funding;
pub mod keys;
mod script;
mod update;
mod verified;

pub use close::{build_close, build_refund, CloseInput, CloseTx};
pub use close::verify_with_core;
pub use funding::{check_offer, check_open, verify_funding, FundingCheck, VerifiedFunding};
pub use keys::{ChannelKey, GatewaySeed, KeysError};
pub use script::ChannelScript;
pub use update::{required_sighash, sign_update, verify_update};
pub use verified::VerifiedUpdate;

/// Version of every close and refund transaction (fixed: the client signs it).
pub const TX_VERSION: transaction::Version = transaction::Version::TWO;
/// nLockTime of every close transaction (fixed: the client signs it). Zero, because
/// the cooperative branch has no time lock and anti-fee-sniping would need a value
/// the client cannot know when it signs.
pub const CLOSE_LOCK_TIME: absolute::LockTime = absolute::LockTime::ZERO;
/// nSequence of the channel input in close and refund transactions: signals RBF
/// (BIP125) so the gateway can bump the close fee, and enables nLockTime for the
/// refund's CHECKLOCKTIMEVERIFY. Fixed: the client signs it.
pub const CHANNEL_INPUT_SEQUENCE: Sequence = Sequence::ENABLE_RBF_NO_LOCKTIME;

/// The agreed, fixed parameters of one funded channel (both sides hold the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Keys and expiry.
    pub script: ChannelScript,
    /// The funding output.
    pub funding_outpoint: OutPoint,
    /// The funding output's value.
    pub capacity: Amount,
    /// Where the client's change goes at close.
    pub client_change_script: ScriptBuf,
    /// The least the first update must pay (from the terms at open).
    pub min_first_payment: Amount,
}

impl Channel {
    /// Last height at which the gateway still credits: `expiry - close_margin - 1`;
    /// from `expiry - close_margin` on it closes instead.
    pub fn crediting_ends_at(&self, close_margin_blocks: BlockCount) -> absolute::Height {
        self.script.expiry.minus(close_margin_blocks)
    }
}

/// The gateway's rules for accepting channels and updates (from its terms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// Capacity range, zero-conf cap, expiry window, close margin and the fee rate
    /// the close is planned at (the "after fee" dust check uses it): the limits the
    /// gateway's terms announce.
    pub limits: ChannelLimits,
    /// The gateway's payout script (its dust limit and size enter the checks).
    pub gateway_payout_script: ScriptBuf,
}

impl ChannelPolicy {
    /// What the first payment must cover: the fee of a one-channel close with client
    /// change at [`Self::close_fee_rate`], plus the dust limit of the gateway output.
    pub fn min_first_payment(&self) -> Amount {
        let fee = close::single_close_fee(true, &self.gateway_payout_script, self.limits.close_fee_rate);
        fee + self.gateway_payout_script.minimal_non_dust()
    }
}

/// Why a channel operation was refused. Each variant maps to one stable wire code
/// ([`ChannelError::code`]); messages say what the sender should do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Client key not compressed.
    #[error("client key is uncompressed: send a 33-byte compressed public key")]
    InvalidPubkey,
    /// Change script not standard.
    #[error("client change script {0} is not standard: use P2WPKH, P2WSH, P2TR, P2PKH or P2SH")]
    ChangeScriptNonstandard(ScriptBuf),
    /// Expiry at or below the tip.
    #[error("expiry {expiry} is not above the tip {tip}: pick an expiry in the terms' window")]
    ExpiryInPast {
        /// Requested expiry.
        expiry: absolute::Height,
        /// Current tip.
        tip: absolute::Height,
    },
    /// Expiry too soon.
    #[error(
        "expiry {expiry} is less than {min_blocks} blocks above the tip {tip}: pick a later expiry"
    )]
    ExpiryTooClose {
        /// Requested expiry.
        expiry: absolute::Height,
        /// Current tip.
        tip: absolute::Height,
        /// Required distance.
        min_blocks: BlockCount,
    },
    /// Expiry too far.
    #[error("expiry {expiry} is more than {max_blocks} blocks above the tip {tip}: pick an earlier expiry")]
    ExpiryTooFar {
        /// Requested expiry.
        expiry: absolute::Height,
        /// Current tip.
        tip: absolute::Height,
        /// Allowed distance.
        max_blocks: BlockCount,
    },
    /// No output at the given index.
    #[error("funding transaction has no output {vout}: send the index of the channel output")]
    FundingOutputMissing {
        /// The index given.
        vout: u32,
    },
    /// Output script is not the channel's P2WSH.
    #[error("funding output pays {found}, not the channel script {expected}: fund the address from the open response")]
    FundingScriptMismatch {
        /// P2WSH of the rebuilt witness script.
        expected: ScriptBuf,
        /// What the output pays.
        found: ScriptBuf,
    },
    /// Value out of range.
    #[error(
        "channel capacity {value} is outside [{min}, {max}]: fund with an amount inside the terms"
    )]
    CapacityOutOfRange {
        /// Funded value.
        value: Amount,
        /// Minimum.
        min: Amount,
        /// Maximum.
        max: Amount,
    },
    /// Outpoint already used.
    #[error("outpoint {0} already funds another channel: fund a new output")]
    DuplicateOutpoint(OutPoint),
    /// A non-segwit funding input.
    #[error("funding input {input} is not segwit, so the funding txid could be malleated: fund from segwit outputs only")]
    FundingInputNotSegwit {
        /// Index of the offending input.
        input: usize,
    },
    /// Not enough confirmations for the value.
    #[error("funding of {value} has {confirmations}/{required} confirmations and is above the zero-conf cap {cap}: wait for confirmations")]
    FundingUnconfirmed {
        /// Current confirmations.
        confirmations: u32,
        /// Needed.
        required: u32,
        /// Funded value.
        value: Amount,
        /// The cap.
        cap: Amount,
    },
    /// Past the crediting window.
    #[error("channel stopped taking payments at height {ends_at} (tip {tip}): open a new channel")]
    ChannelExpired {
        /// First height without crediting.
        ends_at: absolute::Height,
        /// Current tip.
        tip: absolute::Height,
    },
    /// Total not increasing.
    #[error("total {total} is not above the last accepted total {last}: sign a larger total")]
    AmountNotIncreasing {
        /// Offered.
        total: Amount,
        /// Last accepted.
        last: Amount,
    },
    /// Total above capacity.
    #[error("total {total} exceeds the capacity {capacity}: sign at most the capacity")]
    AmountAboveCapacity {
        /// Offered.
        total: Amount,
        /// Capacity.
        capacity: Amount,
    },
    /// First payment below the minimum.
    #[error("first payment {total} is below the minimum {min} (close fee + dust): pay at least the minimum")]
    FirstPaymentTooSmall {
        /// Offered.
        total: Amount,
        /// Minimum.
        min: Amount,
    },
    /// Client change dust.
    #[error("client change {change} is below the dust limit {dust}: pay either all of the capacity or leave at least {dust}")]
    ClientChangeBelowDust {
        /// Resulting change.
        change: Amount,
        /// Dust limit of the change script.
        dust: Amount,
    },
    /// Gateway output dust after the fee.
    #[error("gateway output would be {total} - fee {fee}, below the dust limit {dust}: pay a larger total")]
    GatewayOutputBelowDust {
        /// Total paid.
        total: Amount,
        /// Close fee.
        fee: Amount,
        /// Dust limit of the gateway output.
        dust: Amount,
    },
    /// Wrong sighash byte.
    #[error("signature has sighash flag {found:#04x}, expected {expected:#04x} (SINGLE|ANYONECANPAY with change, NONE|ANYONECANPAY without)")]
    WrongSighashFlag {
        /// Flag found.
        found: u8,
        /// Flag required.
        expected: u8,
    },
    /// Not strict DER.
    #[error("signature is not strict DER (BIP66): encode it with a standard library")]
    SignatureNotDer,
    /// High S.
    #[error("signature has a high S value: normalize it to low S (BIP146)")]
    SignatureHighS,
    /// Does not verify.
    #[error("signature does not verify against the close transaction of this channel and total: sign this channel's close for exactly this total")]
    SignatureInvalid,
    /// Core's interpreter rejected the assembled close.
    #[error("the assembled close transaction fails Bitcoin Core's script check ({0}): the update cannot be settled")]
    CloseScriptInvalid(String),
    /// A batch with no channels.
    #[error("close batch is empty: pass at least one channel")]
    EmptyBatch,
    /// The transaction would pay nothing useful.
    #[error("refund of {capacity} cannot pay fee {fee} and keep a non-dust output: use a lower fee rate")]
    RefundBelowDust {
        /// Channel capacity.
        capacity: Amount,
        /// Fee at the requested rate.
        fee: Amount,
    },
    /// Client side: the gateway's open response does not match the script the client
    /// rebuilt; never fund it.
    #[error("gateway offer does not match the rebuilt channel ({what}): do not fund it; try another gateway")]
    OfferMismatch {
        /// Which part differs.
        what: &'static str,
    },
    /// Sighash computation failed (a bug: input index out of range).
    #[error("internal error computing a sighash: {0}")]
    Sighash(String),
}

impl ChannelError {
    /// The stable wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChannelError::InvalidPubkey => ErrorCode::InvalidPubkey,
            ChannelError::ChangeScriptNonstandard(_) => ErrorCode::ChangeScriptNonstandard,
            ChannelError::ExpiryInPast { .. } => ErrorCode::ExpiryInPast,
            ChannelError::ExpiryTooClose { .. } => ErrorCode::ExpiryTooClose,
            ChannelError::ExpiryTooFar { .. } => ErrorCode::ExpiryTooFar,
            ChannelError::FundingOutputMissing { .. } => ErrorCode::FundingOutputMissing,
            ChannelError::FundingScriptMismatch { .. } => ErrorCode::FundingScriptMismatch,
            ChannelError::CapacityOutOfRange { .. } => ErrorCode::CapacityOutOfRange,
            ChannelError::DuplicateOutpoint(_) => ErrorCode::DuplicateOutpoint,
            ChannelError::FundingInputNotSegwit { .. } => ErrorCode::FundingInputNotSegwit,
            ChannelError::FundingUnconfirmed { .. } => ErrorCode::FundingUnconfirmed,
            ChannelError::ChannelExpired { .. } => ErrorCode::ChannelExpired,
            ChannelError::AmountNotIncreasing { .. } => ErrorCode::AmountNotIncreasing,
            ChannelError::AmountAboveCapacity { .. } => ErrorCode::AmountAboveCapacity,
            ChannelError::FirstPaymentTooSmall { .. } => ErrorCode::FirstPaymentTooSmall,
            ChannelError::ClientChangeBelowDust { .. } => ErrorCode::ClientChangeBelowDust,
            ChannelError::GatewayOutputBelowDust { .. } => ErrorCode::GatewayOutputBelowDust,
            ChannelError::WrongSighashFlag { .. } => ErrorCode::WrongSighashFlag,
            ChannelError::SignatureNotDer => ErrorCode::SignatureNotDer,
            ChannelError::SignatureHighS => ErrorCode::SignatureHighS,
            ChannelError::SignatureInvalid => ErrorCode::SignatureInvalid,
            ChannelError::CloseScriptInvalid(_) => ErrorCode::CloseScriptInvalid,
            ChannelError::EmptyBatch
            | ChannelError::RefundBelowDust { .. }
            | ChannelError::OfferMismatch { .. }
            | ChannelError::Sighash(_) => ErrorCode::Internal,
        }
    }
}

/// One verification/signing context for the process (building one costs far more
/// than a signature check).
pub fn secp() -> &'static Secp256k1<All> {
    static SECP: OnceLock<Secp256k1<All>> = OnceLock::new();
    SECP.get_or_init(Secp256k1::new)
}

/// Fee for `weight` at `rate`, rounded up to whole satoshis over the virtual size
/// (`ceil(weight / 4)`), the way Bitcoin Core's mempool computes the fee rate.
pub fn fee_for_weight(rate: FeeRate, weight: Weight) -> Amount {
    let vsize = weight.to_vbytes_ceil();
    let sat_per_kvb = u128::from(rate.to_sat_per_kwu()) * 4;
    let fee = (u128::from(vsize) * sat_per_kvb).div_ceil(1000);
    Amount::from_sat(u64::try_from(fee).unwrap_or(u64::MAX))
}
