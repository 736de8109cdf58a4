//! The requests a client signs with its channel key: which action, which channel,
//! which counter. The action names one signature domain, so a signature for one
//! action (`status`) never authorizes another (`close`).

use std::fmt;

use super::{client_request_digest, ChannelId, SignatureBytes};

/// What a signed channel request asks for; its name is part of the signed digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignedAction {
    /// `GET /v1/channels/{id}` (signed header).
    Status,
    /// `GET /v1/channels/{id}/events` (signed header).
    Events,
    /// `POST /v1/channels/{id}/close` (counter and signature in the body).
    Close,
}

impl SignedAction {
    /// The name signed in [`client_request_digest`].
    pub fn as_str(self) -> &'static str {
        match self {
            SignedAction::Status => "status",
            SignedAction::Events => "events",
            SignedAction::Close => "close",
        }
    }

    /// The digest a client signs for this action on `channel_id` with `counter`.
    pub fn digest(self, channel_id: &ChannelId, counter: u64) -> [u8; 32] {
        client_request_digest(self.as_str(), channel_id, counter)
    }
}

impl fmt::Display for SignedAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel request signed with the channel's client key: the signature over
/// [`SignedAction::digest`]`(channel_id, counter)`. The counter (milliseconds since the
/// Unix epoch, strictly increasing per channel and action) makes it single-use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// What it asks for.
    pub action: SignedAction,
    /// The channel it is about.
    pub channel_id: ChannelId,
    /// The signed counter.
    pub counter: u64,
    /// DER ECDSA signature by the channel's client key.
    pub signature: SignatureBytes,
}

impl SignedRequest {
    /// The digest its signature must cover.
    pub fn digest(&self) -> [u8; 32] {
        self.action.digest(&self.channel_id, self.counter)
    }
}

impl super::CloseRequest {
    /// The close request as the signed request it carries (action `close`).
    pub fn signed(&self) -> SignedRequest {
        SignedRequest {
            action: SignedAction::Close,
            channel_id: self.channel_id,
            counter: self.counter,
            signature: self.signature.clone(),
        }
    }
}
