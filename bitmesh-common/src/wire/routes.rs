//! Route paths of the client API (docs/api.md): the gateway's router mounts the
//! templates, the agent fills them with a channel id. One place to change a path.

use super::ChannelId;

/// The placeholder the channel-scoped templates carry (axum's path syntax).
const ID: &str = "{id}";

/// GET: the terms.
pub const TERMS: &str = "/v1/terms";
/// POST: open a channel.
pub const CHANNELS: &str = "/v1/channels";
/// GET: RFC 8908 captive-portal API.
pub const CAPTIVE: &str = "/captive-portal/api";
/// GET: the requesting device's own status (`DeviceStatus`, by its MAC).
pub const DEVICE: &str = "/v1/device";
/// GET: server-sent events of the requesting device (`DeviceEvent`, by its MAC).
pub const DEVICE_EVENTS: &str = "/v1/device/events";
/// GET: the captive-portal page (HTML); its assets live under this path.
pub const PORTAL: &str = "/portal/";
/// GET: channel status (signed header, action `status`).
pub const CHANNEL: &str = "/v1/channels/{id}";
/// POST: funding (the gateway relays the transaction).
pub const FUNDING: &str = "/v1/channels/{id}/funding";
/// POST: payment update.
pub const PAYMENTS: &str = "/v1/channels/{id}/payments";
/// POST: close request.
pub const CLOSE: &str = "/v1/channels/{id}/close";
/// GET: server-sent events (signed header, action `events`).
pub const EVENTS: &str = "/v1/channels/{id}/events";
/// POST: a Lightning invoice for a bundle or a number of bytes.
pub const INVOICES: &str = "/v1/invoices";
/// GET: one invoice's status, by payment hash (hex).
pub const INVOICE: &str = "/v1/invoices/{payment_hash}";
/// POST: move a purchase token's Lightning credit to the requesting MAC.
pub const RESTORE: &str = "/v1/restore";

/// [`INVOICE`] of one payment hash (hex).
pub fn invoice(payment_hash_hex: &str) -> String {
    INVOICE.replace("{payment_hash}", payment_hash_hex)
}

fn fill(template: &str, id: &ChannelId) -> String {
    template.replace(ID, &id.to_string())
}

/// [`CHANNEL`] of one channel.
pub fn channel(id: &ChannelId) -> String {
    fill(CHANNEL, id)
}

/// [`FUNDING`] of one channel.
pub fn funding(id: &ChannelId) -> String {
    fill(FUNDING, id)
}

/// [`PAYMENTS`] of one channel.
pub fn payments(id: &ChannelId) -> String {
    fill(PAYMENTS, id)
}

/// [`CLOSE`] of one channel.
pub fn close(id: &ChannelId) -> String {
    fill(CLOSE, id)
}

/// [`EVENTS`] of one channel.
pub fn events(id: &ChannelId) -> String {
    fill(EVENTS, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_routes_are_the_documented_paths() {
        let id = ChannelId([0xab; 32]);
        let hex = "ab".repeat(32);
        assert_eq!(channel(&id), format!("/v1/channels/{hex}"));
        assert_eq!(funding(&id), format!("/v1/channels/{hex}/funding"));
        assert_eq!(payments(&id), format!("/v1/channels/{hex}/payments"));
        assert_eq!(close(&id), format!("/v1/channels/{hex}/close"));
        assert_eq!(events(&id), format!("/v1/channels/{hex}/events"));
    }
}
