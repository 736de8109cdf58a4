//! The one place a [`GatewayError`] becomes the client API's [`ApiError`]: its stable
//! code, its HTTP status and what the client is told (docs/api.md lists them). The
//! API handlers convert with `?`; nothing else in the gateway names `ApiError`.

use bitcoin::Amount;
use bitmesh_common::wire::ErrorCode;

use super::GatewayError;
use crate::api::ApiError;
use bitmesh_channel::chain::ChainError;
use bitmesh_channel::ChannelError;
use crate::store::{ChannelStage, StoreError};

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> ApiError {
        match e {
            GatewayError::Channel(e) => ApiError::Channel(e),
            GatewayError::Store(StoreError::UnknownChannel(id)) => ApiError::UnknownChannel(id),
            GatewayError::Store(StoreError::NotOffered { state, .. }) | GatewayError::NotOpen(state) => not_open(state),
            GatewayError::Store(StoreError::OutpointInUse(op)) => ApiError::Channel(ChannelError::DuplicateOutpoint(op)),
            GatewayError::Store(StoreError::NotIncreasing { offered_sat, last_sat, .. }) => {
                ApiError::Channel(ChannelError::AmountNotIncreasing {
                    total: Amount::from_sat(offered_sat),
                    last: Amount::from_sat(last_sat),
                })
            }
            GatewayError::Chain(ChainError::Rejected { reason, .. }) => ApiError::FundingNotFound(reason),
            GatewayError::Chain(e) => {
                tracing::warn!(error = %e, "chain backend call failed");
                ApiError::ChainUnavailable
            }
            GatewayError::ChainStale => ApiError::ChainUnavailable,
            GatewayError::NotOnLink => ApiError::NotOnLink,
            e @ (GatewayError::OtherDevice | GatewayError::RequestSignature(_)) => ApiError::Unauthorized(e.to_string()),
            e @ (GatewayError::CounterOutsideWindow { .. } | GatewayError::CounterReused { .. }) => {
                ApiError::AuthReplayed(e.to_string())
            }
            e @ GatewayError::DeviceHasOpenChannel(_) => ApiError::BadRequest(e.to_string()),
            GatewayError::TooManyStreams { max } => ApiError::TooManyStreams { max },
            e @ GatewayError::RelayedOnce => ApiError::FundingNotFound(e.to_string()),
            GatewayError::FundingDoubleSpent(id) => ApiError::FundingDoubleSpent(id),
            e @ (GatewayError::ZeroConfExposure { .. } | GatewayError::UnconfirmedTotal { .. }) => {
                ApiError::ZeroConfLimit(e.to_string())
            }
            e @ GatewayError::LightningUnavailable => lightning(ErrorCode::LightningUnavailable, e),
            e @ GatewayError::UnknownBundle(_) => lightning(ErrorCode::UnknownBundle, e),
            e @ GatewayError::BytesOutOfRange { .. } => lightning(ErrorCode::BytesOutOfRange, e),
            e @ (GatewayError::BundleOrBytes | GatewayError::BadPaymentHash(_)) => ApiError::BadRequest(e.to_string()),
            e @ (GatewayError::UnknownInvoice | GatewayError::NoPurchase) => lightning(ErrorCode::UnknownInvoice, e),
            e @ GatewayError::UnknownToken => lightning(ErrorCode::UnknownToken, e),
            e @ GatewayError::TokenExpired => lightning(ErrorCode::TokenExpired, e),
            e @ GatewayError::TooManyDeviceStreams { .. } => lightning(ErrorCode::RateLimited, e),
            other @ (GatewayError::Lightning(_)
            | GatewayError::Store(_)
            | GatewayError::Meter(_)
            | GatewayError::Keys(_)
            | GatewayError::Task(_)
            | GatewayError::Poisoned(_)
            | GatewayError::ClockBeforeEpoch
            | GatewayError::NoKernelEntries { .. }) => ApiError::Internal(other.to_string()),
        }
    }
}

/// A Lightning refusal: its code, and the gateway's own sentence for it.
fn lightning(code: ErrorCode, e: GatewayError) -> ApiError {
    ApiError::Lightning { code, message: e.to_string() }
}

/// `channel_not_open`, with what the client can do about the state it found.
fn not_open(s: ChannelStage) -> ApiError {
    let hint = match s {
        ChannelStage::Offered => "fund it first (POST /v1/channels/{id}/funding)",
        ChannelStage::Open => "it is open",
        ChannelStage::Closing | ChannelStage::Closed => "it is closing or closed: open a new channel",
        ChannelStage::Abandoned => "it expired unfunded or unpaid: open a new channel",
        ChannelStage::DoubleSpent => "its funding output was double-spent before it confirmed",
    };
    ApiError::ChannelNotOpen { state: s.as_str(), hint }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use bitcoin::hashes::Hash;
    use bitmesh_common::kernel::Mac;
    use bitmesh_common::wire::{ChannelId, ErrorCode, SignedAction};

    use super::*;

    /// Every refusal the gateway makes keeps the code and status docs/api.md lists.
    #[test]
    fn gateway_refusals_keep_their_documented_code_and_status() {
        let id = ChannelId([7; 32]);
        let sat = Amount::from_sat;
        let cases: Vec<(GatewayError, StatusCode, ErrorCode)> = vec![
            (GatewayError::NotOnLink, StatusCode::FORBIDDEN, ErrorCode::Unauthorized),
            (GatewayError::OtherDevice, StatusCode::FORBIDDEN, ErrorCode::Unauthorized),
            (GatewayError::RequestSignature(SignedAction::Status), StatusCode::FORBIDDEN, ErrorCode::Unauthorized),
            (GatewayError::CounterOutsideWindow { counter: 1, now_ms: 10_000_000 }, StatusCode::UNAUTHORIZED, ErrorCode::AuthReplayed),
            (GatewayError::CounterReused { counter: 5, last: 5 }, StatusCode::UNAUTHORIZED, ErrorCode::AuthReplayed),
            (GatewayError::NotOpen(ChannelStage::Closed), StatusCode::CONFLICT, ErrorCode::ChannelNotOpen),
            (GatewayError::Store(StoreError::UnknownChannel(id)), StatusCode::NOT_FOUND, ErrorCode::UnknownChannel),
            (GatewayError::DeviceHasOpenChannel(id), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            (GatewayError::TooManyStreams { max: 3 }, StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
            (GatewayError::RelayedOnce, StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::FundingNotFound),
            (GatewayError::ChainStale, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ChainUnavailable),
            (GatewayError::FundingDoubleSpent(id), StatusCode::CONFLICT, ErrorCode::FundingDoubleSpent),
            (GatewayError::ZeroConfExposure { used: sat(1), cap: sat(2), confirmations: 1 }, StatusCode::CONFLICT, ErrorCode::FundingUnconfirmed),
            (GatewayError::UnconfirmedTotal { total: sat(3), cap: sat(2), confirmations: 1 }, StatusCode::CONFLICT, ErrorCode::FundingUnconfirmed),
            (GatewayError::Channel(ChannelError::SignatureInvalid), StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::SignatureInvalid),
            (GatewayError::Store(StoreError::OutpointInUse(bitcoin::OutPoint::new(bitcoin::Txid::all_zeros(), 0))), StatusCode::CONFLICT, ErrorCode::DuplicateOutpoint),
            (GatewayError::NoKernelEntries { channel: id, mac: Mac([2, 0, 0, 0, 0, 1]) }, StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
            (GatewayError::Poisoned("meter"), StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
            (GatewayError::LightningUnavailable, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::LightningUnavailable),
            (GatewayError::UnknownBundle("3GiB".into()), StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::UnknownBundle),
            (GatewayError::BytesOutOfRange { min: 1, max: 2 }, StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::BytesOutOfRange),
            (GatewayError::BundleOrBytes, StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            (GatewayError::UnknownInvoice, StatusCode::NOT_FOUND, ErrorCode::UnknownInvoice),
            (GatewayError::UnknownToken, StatusCode::NOT_FOUND, ErrorCode::UnknownToken),
            (GatewayError::TokenExpired, StatusCode::GONE, ErrorCode::TokenExpired),
            (GatewayError::NoPurchase, StatusCode::NOT_FOUND, ErrorCode::UnknownInvoice),
            (GatewayError::TooManyDeviceStreams { max: 2, scope: "this device" }, StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
            (GatewayError::TooManyDeviceStreams { max: 64, scope: "the gateway" }, StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
        ];
        for (err, status, code) in cases {
            let (name, sentence) = (format!("{err:?}"), err.to_string());
            let api = ApiError::from(err);
            assert_eq!((api.status(), api.code()), (status, code), "{name}: {api}");
            if let ApiError::Lightning { message, .. } = &api {
                assert_eq!(message, &sentence, "{name}: the gateway's sentence, unchanged");
            }
        }
    }
}
