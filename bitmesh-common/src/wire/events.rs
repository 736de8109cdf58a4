//! The per-channel event stream (`GET /v1/channels/{id}/events`, server-sent events):
//! each SSE event is named by [`ClientEvent::name`] and its `data` is the event as JSON.

use serde::{Deserialize, Serialize};

use super::ChannelId;
use crate::pricing::ByteCount;

/// A push on a channel's event stream. The JSON carries the kind in its `event`
/// field, the same word as the SSE event name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClientEvent {
    /// Periodic usage report.
    Usage(UsageReport),
    /// Remaining budget fell below the gateway's low-water mark: pay the next chunk now.
    LowWater(UsageReport),
    /// The channel stopped taking payments (closing or closed).
    Closed {
        /// The channel.
        channel_id: ChannelId,
    },
}

impl ClientEvent {
    /// The SSE event name (equal to the JSON `event` tag).
    pub fn name(&self) -> &'static str {
        match self {
            ClientEvent::Usage(_) => "usage",
            ClientEvent::LowWater(_) => "low_water",
            ClientEvent::Closed { .. } => "closed",
        }
    }
}

/// Budget figures of one channel, as the gateway counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The channel.
    pub channel_id: ChannelId,
    /// Bytes credited for the paid total.
    pub credited_bytes: ByteCount,
    /// Bytes the gateway metered.
    pub used_bytes: ByteCount,
    /// `credited - used`.
    pub remaining_bytes: ByteCount,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_match_the_json_tag_and_round_trip() {
        let r = UsageReport {
            channel_id: ChannelId([1; 32]),
            credited_bytes: ByteCount(10),
            used_bytes: ByteCount(9),
            remaining_bytes: ByteCount(1),
        };
        for ev in [ClientEvent::Usage(r), ClientEvent::LowWater(r), ClientEvent::Closed { channel_id: r.channel_id }] {
            let v = serde_json::to_value(&ev).unwrap();
            assert_eq!(v["event"], ev.name());
            assert_eq!(serde_json::from_value::<ClientEvent>(v).unwrap(), ev);
        }
        let v = serde_json::to_value(ClientEvent::LowWater(r)).unwrap();
        assert_eq!(v["remaining_bytes"], 1);
        assert_eq!(v["used_bytes"], 9);
        assert_eq!(v["credited_bytes"], 10);
    }
}
