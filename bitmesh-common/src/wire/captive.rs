//! RFC 8908 captive-portal API answer (`GET /captive-portal/api`).

use serde::{Deserialize, Serialize};

/// RFC 8908's media type of the answer.
pub const CAPTIVE_JSON: &str = "application/captive+json";

/// The RFC 8908 JSON object. Keys use the RFC's hyphenated names; absent optional
/// keys are left out, and read back as `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptiveStatus {
    /// True while the client has no paid budget left (traffic beyond the walled
    /// garden is dropped).
    pub captive: bool,
    /// Where a person can see the terms and pay.
    #[serde(rename = "user-portal-url", default, skip_serializing_if = "Option::is_none")]
    pub user_portal_url: Option<String>,
    /// A page about the venue (the operator's `--venue-info-url`).
    #[serde(rename = "venue-info-url", default, skip_serializing_if = "Option::is_none")]
    pub venue_info_url: Option<String>,
    /// Bytes the client may still use before it must pay again.
    #[serde(rename = "bytes-remaining", default, skip_serializing_if = "Option::is_none")]
    pub bytes_remaining: Option<u64>,
    /// Estimated seconds until the channel stops taking payments (10 min per block).
    #[serde(rename = "seconds-remaining", default, skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<u64>,
    /// Paying more extends the session.
    #[serde(rename = "can-extend-session", default, skip_serializing_if = "Option::is_none")]
    pub can_extend_session: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_rfc_names_and_absent_ones_read_as_none() {
        let s = CaptiveStatus {
            captive: false,
            user_portal_url: Some("http://10.0.0.1/".into()),
            venue_info_url: None,
            bytes_remaining: Some(5),
            seconds_remaining: Some(600),
            can_extend_session: Some(true),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"captive":false,"user-portal-url":"http://10.0.0.1/","bytes-remaining":5,"seconds-remaining":600,"can-extend-session":true}"#
        );
        let bare: CaptiveStatus = serde_json::from_str(r#"{"captive":true}"#).unwrap();
        assert_eq!(bare.bytes_remaining, None);
        assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"captive":true}"#);
    }
}
