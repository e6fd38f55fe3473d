//! Webhook subscriptions (seed 002 via API.md): their ids, target URLs, and the
//! subscriptions as `apply` derives them from the `WebhookSubscribed` and
//! `WebhookDeleted` events.

use crate::pii::Sealed;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The integration event types a webhook may subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IntegrationEventType {
    #[serde(rename = "order.status_updated")]
    OrderStatusUpdated,
}

impl IntegrationEventType {
    pub const ALL: [IntegrationEventType; 1] = [IntegrationEventType::OrderStatusUpdated];

    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationEventType::OrderStatusUpdated => "order.status_updated",
        }
    }

    pub fn parse(s: &str) -> Option<IntegrationEventType> {
        IntegrationEventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// A webhook id: `wh_` and 1-64 letters, digits, `-` or `_`. It names a consumer group
/// and a stream key, so nothing else may get in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookId(String);

impl WebhookId {
    pub fn parse(s: &str) -> Option<WebhookId> {
        let rest = s.strip_prefix("wh_")?;
        let ok = (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| WebhookId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WebhookId {
    type Error = String;
    fn try_from(s: String) -> Result<WebhookId, String> {
        WebhookId::parse(&s).ok_or_else(|| format!("{s:?} is not a webhook id"))
    }
}

impl From<WebhookId> for String {
    fn from(id: WebhookId) -> String {
        id.0
    }
}

/// Longest webhook URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Where a webhook's deliveries go: an absolute `http://` or `https://` URL with a host,
/// at most [`MAX_URL_LEN`] bytes of visible ASCII. (The node checks it once more with a
/// full URL parser before it records it.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookUrl(String);

impl WebhookUrl {
    pub fn parse(s: &str) -> Option<WebhookUrl> {
        if s.len() > MAX_URL_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let lower = s.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit('@').next().unwrap_or_default();
        (!host.is_empty() && !host.starts_with(':')).then(|| WebhookUrl(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WebhookUrl {
    type Error = String;
    fn try_from(s: String) -> Result<WebhookUrl, String> {
        WebhookUrl::parse(&s).ok_or_else(|| format!("{s:?} is not an http(s) URL"))
    }
}

impl From<WebhookUrl> for String {
    fn from(url: WebhookUrl) -> String {
        url.0
    }
}

/// A subscription as derived state holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: WebhookId,
    pub url: WebhookUrl,
    pub events: Vec<IntegrationEventType>,
    /// Sealed ([`crate::pii::Field::WebhookSecret`]); only the deliverer opens it.
    pub secret: Sealed,
    pub created_at: String,
    /// The sequence of the webhook's last event (a delete appends the next one).
    pub version: u64,
}

impl Webhook {
    pub fn wants(&self, ty: IntegrationEventType) -> bool {
        self.events.contains(&ty)
    }
}

/// Every live subscription by id (the value of `eventlog::keys::WEBHOOKS`).
pub type Webhooks = BTreeMap<WebhookId, Webhook>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_with_a_host_are_webhook_urls() {
        for ok in [
            "http://localhost:8080/hook",
            "https://example.com",
            "HTTPS://example.com/a?b=c",
        ] {
            assert!(WebhookUrl::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "ftp://example.com",
            "http://",
            "https:///path",
            "http://:80/x",
            "example.com",
            "http://exa mple.com",
            "javascript:alert(1)",
            "",
        ] {
            assert!(WebhookUrl::parse(bad).is_none(), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(WebhookUrl::parse(&long).is_none());
    }

    #[test]
    fn webhook_ids_are_safe_in_keys() {
        assert!(WebhookId::parse("wh_0f3a-b_c").is_some());
        for bad in [
            "wh_",
            "0f3a",
            "wh_a:b",
            "wh_a*",
            &format!("wh_{}", "a".repeat(65)),
        ] {
            assert!(WebhookId::parse(bad).is_none(), "{bad}");
        }
    }
}
