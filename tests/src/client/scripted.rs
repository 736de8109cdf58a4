//! A client device driven by library calls: its own key, the channel library for
//! signing, and raw HTTP to the gateway's API from inside a client namespace (and,
//! optionally, from one of the testbed's [`ClientIdentity`] devices). The controller
//! tests use it to say exactly what a client sends, hostile or not.

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use anyhow::{Context, Result};

use crate::http;
use crate::network::{in_netns_named, ClientIdentity, Netns};

/// A client device driven by library calls: its own key, the channel library for
/// signing, and HTTP to the gateway's API from inside the client namespace.
pub struct ScriptedClient {
    /// The client's channel key.
    pub secret: bitcoin::secp256k1::SecretKey,
    /// Its public key.
    pub pubkey: bitcoin::PublicKey,
    /// Where the client's change goes.
    pub change_script: bitcoin::ScriptBuf,
    /// The gateway's offer, after [`Self::open`].
    pub offer: Option<bitmesh_common::wire::OpenResponse>,
    /// The funded channel, after [`Self::fund`].
    pub channel: Option<bitmesh_channel::Channel>,
    api: SocketAddr,
    netns: String,
    source: Option<ClientIdentity>,
}

impl ScriptedClient {
    /// A fresh key, talking to `api` from inside `client_ns`.
    pub fn new(client_ns: &Netns, api: SocketAddr) -> ScriptedClient {
        use bitcoin::secp256k1::{rand, Secp256k1, SecretKey};
        let secp = Secp256k1::new();
        let secret = SecretKey::new(&mut rand::thread_rng());
        let pubkey = bitcoin::PublicKey::new(secret.public_key(&secp));
        let change_script = bitcoin::ScriptBuf::new_p2wpkh(&pubkey.wpubkey_hash().unwrap());
        ScriptedClient {
            secret,
            pubkey,
            change_script,
            offer: None,
            channel: None,
            api,
            netns: client_ns.name().to_string(),
            source: None,
        }
    }

    /// A fresh key on its own device: every connection leaves from `identity`'s
    /// interface and IP (see [`crate::network::Lan::add_client_identities`]), so the gateway binds its
    /// channel to that identity's MAC.
    pub fn with_identity(client_ns: &Netns, api: SocketAddr, identity: ClientIdentity) -> ScriptedClient {
        ScriptedClient { source: Some(identity), ..ScriptedClient::new(client_ns, api) }
    }

    /// The identity this client speaks from (`None`: the client namespace's own address).
    pub fn identity(&self) -> Option<&ClientIdentity> {
        self.source.as_ref()
    }

    /// One HTTP request from the client's namespace (and identity).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Result<http::Response> {
        let api = self.api;
        let source = self.source.as_ref();
        in_netns_named(&self.netns, || http::request_from(source, api, method, path, headers, body))
    }

    /// POST a JSON body from the client's namespace (and identity).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<http::Response> {
        let api = self.api;
        let source = self.source.as_ref();
        in_netns_named(&self.netns, || http::post_json_from(source, api, path, body))
    }

    /// Run `f` on one thread inside the client namespace (for timing loops).
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns_named(&self.netns, f)
    }

    /// The API address.
    pub fn api(&self) -> SocketAddr {
        self.api
    }

    /// `GET /v1/terms`.
    pub fn terms(&self) -> Result<bitmesh_common::wire::Terms> {
        let r = self.request("GET", "/v1/terms", &[], None)?;
        anyhow::ensure!(r.status == 200, "terms: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Ask for a channel expiring `blocks` above the gateway's tip.
    pub fn open(&mut self, blocks: u32) -> Result<bitmesh_common::wire::OpenResponse> {
        let tip = self.terms()?.tip_height.to_consensus_u32();
        let req = bitmesh_common::wire::OpenRequest {
            client_pubkey: self.pubkey,
            expiry: bitcoin::absolute::Height::from_consensus(tip + blocks)?,
            client_change_script: self.change_script.clone(),
        };
        let r = self.post("/v1/channels", &serde_json::to_value(&req)?)?;
        anyhow::ensure!(r.status == 200, "open: {} {}", r.status, String::from_utf8_lossy(&r.body));
        let offer: bitmesh_common::wire::OpenResponse = serde_json::from_slice(&r.body)?;
        self.offer = Some(offer.clone());
        Ok(offer)
    }

    /// The funding transaction for `capacity` from `wallet` (not sent).
    pub fn funding_tx(&self, wallet: &mut crate::chain::CoinbaseWallet, capacity: bitcoin::Amount) -> bitcoin::Transaction {
        let offer = self.offer.as_ref().expect("open first");
        wallet.pay(&offer.funding_script_pubkey, capacity, false)
    }

    /// Fund the offered channel with `capacity` from `wallet`, through the gateway's relay.
    pub fn fund(
        &mut self,
        wallet: &mut crate::chain::CoinbaseWallet,
        capacity: bitcoin::Amount,
    ) -> Result<bitmesh_common::wire::ChannelStatus> {
        let tx = self.funding_tx(wallet, capacity);
        self.fund_with(&tx, 0)
    }

    /// Tell the gateway that output `vout` of `tx` funds the offered channel (the
    /// gateway relays `tx` if its node does not know it yet).
    pub fn fund_with(&mut self, tx: &bitcoin::Transaction, vout: u32) -> Result<bitmesh_common::wire::ChannelStatus> {
        let offer = self.offer.clone().expect("open first");
        let capacity = tx.output.get(vout as usize).context("no such funding output")?.value;
        let req = bitmesh_common::wire::FundRequest { channel_id: offer.channel_id, funding_tx: tx.clone(), funding_vout: vout };
        let r = self.post(&format!("/v1/channels/{}/funding", offer.channel_id), &serde_json::to_value(&req)?)?;
        anyhow::ensure!(r.status == 200, "fund: {} {}", r.status, String::from_utf8_lossy(&r.body));
        self.channel = Some(bitmesh_channel::Channel {
            script: bitmesh_channel::ChannelScript { gateway: offer.gateway_pubkey, client: self.pubkey, expiry: offer.expiry },
            funding_outpoint: bitcoin::OutPoint { txid: tx.compute_txid(), vout },
            capacity,
            client_change_script: self.change_script.clone(),
            min_first_payment: offer.min_first_payment,
        });
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// The channel id.
    pub fn channel_id(&self) -> bitmesh_common::wire::ChannelId {
        self.offer.as_ref().expect("open first").channel_id
    }

    /// A signed update paying a cumulative `total`.
    pub fn update(&self, total: bitcoin::Amount) -> bitmesh_common::wire::PaymentUpdate {
        let channel = self.channel.as_ref().expect("fund first");
        bitmesh_common::wire::PaymentUpdate {
            channel_id: self.channel_id(),
            total_paid: total,
            signature: bitmesh_channel::sign_update(channel, total, &self.secret).unwrap(),
        }
    }

    /// Send an update; the raw response.
    pub fn send(&self, update: &bitmesh_common::wire::PaymentUpdate) -> Result<http::Response> {
        self.post(&format!("/v1/channels/{}/payments", update.channel_id), &serde_json::to_value(update)?)
    }

    /// Pay a cumulative `total`; the acknowledgement (an error for anything else).
    pub fn pay(&self, total: bitcoin::Amount) -> Result<bitmesh_common::wire::PaymentAck> {
        let r = self.send(&self.update(total))?;
        anyhow::ensure!(r.status == 200, "pay {total}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Hex DER signature over `client_auth_digest(action, channel)` (the old,
    /// counterless form, which the gateway refuses).
    pub fn auth(&self, action: &str) -> String {
        use bitcoin::hex::DisplayHex;
        let digest = bitmesh_common::wire::client_auth_digest(action, &self.channel_id());
        let msg = bitcoin::secp256k1::Message::from_digest(digest);
        let sig = bitcoin::secp256k1::Secp256k1::new().sign_ecdsa(&msg, &self.secret);
        sig.serialize_der().to_lower_hex_string()
    }

    /// `X-BitMesh-Signature` value of a signed GET with an explicit counter:
    /// `<counter>.<hex DER signature over client_request_digest(action, channel, counter)>`.
    pub fn auth_at(&self, action: &str, counter: u64) -> String {
        use bitcoin::hex::DisplayHex;
        let digest = bitmesh_common::wire::client_request_digest(action, &self.channel_id(), counter);
        let msg = bitcoin::secp256k1::Message::from_digest(digest);
        let sig = bitcoin::secp256k1::Secp256k1::new().sign_ecdsa(&msg, &self.secret);
        format!("{counter}.{}", sig.serialize_der().to_lower_hex_string())
    }

    /// `X-BitMesh-Signature` value of a signed GET with a fresh counter (the agent's
    /// `max(now_ms, last + 1)`).
    pub fn auth_header(&self, action: &str) -> String {
        self.auth_at(action, bitmesh_client::http::next_counter())
    }

    /// `GET /v1/channels/{id}` (signed).
    pub fn status(&self) -> Result<bitmesh_common::wire::ChannelStatus> {
        let auth = self.auth_header("status");
        let r = self.request("GET", &format!("/v1/channels/{}", self.channel_id()), &[(bitmesh_common::wire::AUTH_HEADER, &auth)], None)?;
        anyhow::ensure!(r.status == 200, "status: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// A signed `CloseRequest` body with a fresh counter (single-use at the gateway).
    pub fn close_body(&self) -> serde_json::Value {
        let header = self.auth_header("close");
        let (counter, sig) = header.split_once('.').expect("counter.signature");
        serde_json::json!({ "channel_id": self.channel_id(), "counter": counter.parse::<u64>().expect("counter"), "signature": sig })
    }

    /// `POST /v1/channels/{id}/close` (signed).
    pub fn close(&self) -> Result<bitmesh_common::wire::CloseResponse> {
        let body = self.close_body();
        let r = self.post(&format!("/v1/channels/{}/close", self.channel_id()), &body)?;
        anyhow::ensure!(r.status == 200, "close: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }
}
