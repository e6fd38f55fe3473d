//! Personal data sealed at rest: the payment token and the shipping address of an
//! order are stored in events (and in the order derived from them) only as [`Sealed`]
//! text, AES-256-GCM under a key of the [`KeyRing`].
//!
//! Why here, and why this shape:
//! - The events are replicated, copied into dead-letter and quarantine streams, written
//!   to the AOF and kept for ever; sealing the fields in the event itself means none of
//!   those copies holds them in plain text, and `apply` stays pure: it copies the sealed
//!   text into the order without any key.
//! - The ring is passed in, never global, and the nonce comes from the caller: this
//!   crate reads no clock and draws no random numbers (the node draws a fresh 96-bit
//!   nonce per seal; with random nonces one key is good for far more than 2^32 seals).
//! - Every sealed value names the key it was sealed with (`kid`), so keys rotate: put a
//!   new key first (it seals from then on), keep the old ones after it (they still
//!   open what they sealed). Both regions must hold the same ring, since each opens what
//!   the other sealed (the payments handler after a failover).
//! - The associated data binds a value to its field and its order, so a sealed token
//!   moved into another order, or into the address field, does not open.
//!
//! Format of a sealed value: `pii1:<kid>:<base64url(nonce ‖ ciphertext ‖ tag)>`.
//! Text without the `pii1:` prefix was written before sealing existed and reads as it is.
//!
//! Format of a key ring (`NODE_PII_KEYS`): `kid:base64key[,kid:base64key...]`, the first
//! seals, all open; a kid is 1-32 of `A-Z a-z 0-9 _ -`, a key 32 bytes in standard
//! base64 (`openssl rand -base64 32`).

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Marks sealed text, and its format's version.
pub const SEALED_PREFIX: &str = "pii1:";
/// AES-GCM's nonce: 96 bits.
pub const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const MAX_KID_LEN: usize = 32;

/// The personal fields an order holds. Part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    PaymentToken,
    ShippingAddress,
    /// Not personal data, but a secret kept in events all the same: a webhook's signing
    /// secret, sealed with the webhook id in place of the order id.
    WebhookSecret,
}

impl Field {
    pub fn as_str(self) -> &'static str {
        match self {
            Field::PaymentToken => "paymentToken",
            Field::ShippingAddress => "shippingAddress",
            Field::WebhookSecret => "webhookSecret",
        }
    }
}

/// Personal data as stored: sealed text (or, in events written before sealing, the
/// plain value). Serialised as a JSON string; its `Debug` never shows the text.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(String);

impl Sealed {
    /// The stored text, exactly (for storage and comparison, never for an answer).
    pub fn as_stored(&self) -> &str {
        &self.0
    }

    /// Whether the value was sealed (`false`: a plain value of an older event).
    pub fn is_sealed(&self) -> bool {
        self.0.starts_with(SEALED_PREFIX)
    }

    /// The key the value was sealed with.
    pub fn kid(&self) -> Option<&str> {
        self.0
            .strip_prefix(SEALED_PREFIX)?
            .split_once(':')
            .map(|(k, _)| k)
    }

    /// Wraps stored text as read back from an event or an order.
    pub fn from_stored(s: impl Into<String>) -> Sealed {
        Sealed(s.into())
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kid() {
            Some(kid) => write!(f, "Sealed({kid})"),
            None if self.0.is_empty() => f.write_str("Sealed(empty)"),
            None => f.write_str("Sealed(plain, redacted)"),
        }
    }
}

/// Why a key ring was refused. The messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRingError {
    #[error("the key ring is empty")]
    Empty,
    #[error("entry {0}: expected `kid:base64key`")]
    Shape(usize),
    #[error("entry {0}: the key id must be 1-{MAX_KID_LEN} characters of A-Z a-z 0-9 _ -")]
    BadKid(usize),
    #[error("entry {0}: the key id `{1}` appears twice")]
    DuplicateKid(usize, String),
    #[error("entry {0} (`{1}`): the key must be {KEY_LEN} bytes in standard base64")]
    BadKey(usize, String),
}

/// Why a sealed value did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed with key `{0}`, which the key ring does not hold")]
    UnknownKey(String),
    #[error("the sealed value is malformed")]
    Malformed,
    /// Wrong key material under a known kid, tampering, or a value moved from another
    /// field or order.
    #[error("the sealed value does not open with key `{0}` (wrong key, altered, or moved)")]
    Rejected(String),
}

/// The keys personal data is sealed and opened with; the first seals.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<(String, Aes256Gcm)>,
    development: bool,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .field("development", &self.development)
            .finish()
    }
}

/// The development key: public, so it keeps nothing secret. It only lets a node run
/// without configuration (a warning says so) with the same ring in both regions.
const DEVELOPMENT_KEY: [u8; KEY_LEN] = *b"tandem dev pii key: not a secret";
pub const DEVELOPMENT_KID: &str = "dev";

impl KeyRing {
    /// Parses `kid:base64key[,kid:base64key...]` (see the module's documentation).
    pub fn parse(spec: &str) -> Result<KeyRing, KeyRingError> {
        if spec.trim().is_empty() {
            return Err(KeyRingError::Empty);
        }
        let mut keys: Vec<(String, Aes256Gcm)> = Vec::new();
        for (i, entry) in spec.split(',').map(str::trim).enumerate() {
            let n = i + 1;
            let (kid, key) = entry.split_once(':').ok_or(KeyRingError::Shape(n))?;
            let (kid, key) = (kid.trim(), key.trim());
            if !valid_kid(kid) {
                return Err(KeyRingError::BadKid(n));
            }
            if keys.iter().any(|(k, _)| k == kid) {
                return Err(KeyRingError::DuplicateKid(n, kid.into()));
            }
            let bytes = STANDARD
                .decode(key)
                .ok()
                .filter(|b| b.len() == KEY_LEN)
                .ok_or_else(|| KeyRingError::BadKey(n, kid.into()))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| KeyRingError::BadKey(n, kid.into()))?;
            keys.push((kid.to_string(), cipher));
        }
        Ok(KeyRing {
            keys,
            development: false,
        })
    }

    /// The ring of a node without `NODE_PII_KEYS`: the public development key.
    pub fn development() -> KeyRing {
        KeyRing {
            keys: vec![(
                DEVELOPMENT_KID.to_string(),
                Aes256Gcm::new_from_slice(&DEVELOPMENT_KEY).expect("32 bytes"),
            )],
            development: true,
        }
    }

    /// Whether this is the public development ring.
    pub fn is_development(&self) -> bool {
        self.development
    }

    /// The key ids, the sealing one first.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(k, _)| k.as_str())
    }

    /// Seals `plain` as `field` of order `order_id` with the first key. `nonce` must be
    /// fresh for every call (the caller draws it at random).
    pub fn seal(
        &self,
        field: Field,
        order_id: &str,
        plain: &str,
        nonce: [u8; NONCE_LEN],
    ) -> Sealed {
        let (kid, cipher) = &self.keys[0];
        let aad = associated_data(field, order_id);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM seals any message shorter than 64 GiB");
        let mut raw = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&ciphertext);
        Sealed(format!(
            "{SEALED_PREFIX}{kid}:{}",
            URL_SAFE_NO_PAD.encode(raw)
        ))
    }

    /// Opens `field` of order `order_id`. A plain value (an event older than sealing)
    /// is returned as it is.
    pub fn open(&self, field: Field, order_id: &str, sealed: &Sealed) -> Result<String, OpenError> {
        let Some(rest) = sealed.0.strip_prefix(SEALED_PREFIX) else {
            return Ok(sealed.0.clone());
        };
        let (kid, body) = rest.split_once(':').ok_or(OpenError::Malformed)?;
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, c)| c)
            .ok_or_else(|| OpenError::UnknownKey(kid.chars().take(MAX_KID_LEN).collect()))?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::Malformed)?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Malformed);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let aad = associated_data(field, order_id);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| OpenError::Rejected(kid.to_string()))?;
        String::from_utf8(plain).map_err(|_| OpenError::Rejected(kid.to_string()))
    }
}

/// Who may see what of the personal data in a public answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure {
    /// No personal data (the default for every caller).
    None,
    /// The shipping address opened (`pii:read`). The payment token never leaves.
    ShippingAddress,
}

/// An event's payload as a public answer shows it (`/api/events`): the payment token
/// is removed whatever the caller holds; the shipping address is removed, or opened
/// for a caller with [`Disclosure::ShippingAddress`]. Works on any payload that carries
/// these fields, so an event type added later is covered too. `order_id` is the
/// event's aggregate. An address that does not open is left out (and reported).
pub fn disclose(
    payload: &mut serde_json::Value,
    order_id: &str,
    ring: &KeyRing,
    disclosure: Disclosure,
) -> Result<(), OpenError> {
    let Some(obj) = payload.as_object_mut() else {
        return Ok(());
    };
    obj.remove(Field::PaymentToken.as_str());
    let Some(address) = obj.remove(Field::ShippingAddress.as_str()) else {
        return Ok(());
    };
    if disclosure == Disclosure::ShippingAddress {
        if let serde_json::Value::String(stored) = address {
            let plain = ring.open(Field::ShippingAddress, order_id, &Sealed(stored))?;
            obj.insert(Field::ShippingAddress.as_str().into(), plain.into());
        }
    }
    Ok(())
}

fn valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_LEN).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Binds a sealed value to its field and its order (order ids hold no `|`).
fn associated_data(field: Field, order_id: &str) -> String {
    format!("tandem-pii1|{}|{order_id}", field.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // bytes 0..32
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="; // bytes 32..64

    fn nonce(n: u8) -> [u8; NONCE_LEN] {
        [n; NONCE_LEN]
    }

    #[test]
    fn a_sealed_value_opens_and_shows_nothing_of_the_text() {
        let ring = KeyRing::parse(&format!("k1:{K1}")).unwrap();
        let sealed = ring.seal(Field::PaymentToken, "o-1", "tok_secret", nonce(1));
        assert!(sealed.is_sealed());
        assert_eq!(sealed.kid(), Some("k1"));
        assert!(sealed.as_stored().starts_with("pii1:k1:"));
        assert!(!sealed.as_stored().contains("tok_secret"));
        assert!(!format!("{sealed:?}").contains("tok_secret"));
        assert_eq!(
            ring.open(Field::PaymentToken, "o-1", &sealed).unwrap(),
            "tok_secret"
        );
        // Fresh nonces: the same text seals differently each time.
        let again = ring.seal(Field::PaymentToken, "o-1", "tok_secret", nonce(2));
        assert_ne!(sealed, again);
    }

    #[test]
    fn a_value_moved_to_another_order_or_field_or_altered_does_not_open() {
        let ring = KeyRing::parse(&format!("k1:{K1}")).unwrap();
        let sealed = ring.seal(Field::PaymentToken, "o-1", "tok_ok", nonce(1));
        let rejected = Err(OpenError::Rejected("k1".into()));
        assert_eq!(ring.open(Field::PaymentToken, "o-2", &sealed), rejected);
        assert_eq!(ring.open(Field::ShippingAddress, "o-1", &sealed), rejected);
        let mut altered = sealed.as_stored().to_string();
        let last = altered.pop().unwrap();
        altered.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(
            ring.open(Field::PaymentToken, "o-1", &Sealed::from_stored(altered)),
            rejected
        );
        for malformed in [
            "pii1:",
            "pii1:k1",
            "pii1:k1:",
            "pii1:k1:!!!",
            "pii1:k1:AAAA",
        ] {
            assert_eq!(
                ring.open(Field::PaymentToken, "o-1", &Sealed::from_stored(malformed)),
                Err(OpenError::Malformed),
                "{malformed}"
            );
        }
    }

    #[test]
    fn rotation_keeps_old_values_readable() {
        let old = KeyRing::parse(&format!("k1:{K1}")).unwrap();
        let sealed_old = old.seal(Field::ShippingAddress, "o-1", "1 Main St", nonce(1));
        // A new key goes first; the old one stays to open what it sealed.
        let rotated = KeyRing::parse(&format!("k2:{K2}, k1:{K1}")).unwrap();
        assert_eq!(rotated.kids().collect::<Vec<_>>(), ["k2", "k1"]);
        assert_eq!(
            rotated
                .open(Field::ShippingAddress, "o-1", &sealed_old)
                .unwrap(),
            "1 Main St"
        );
        let sealed_new = rotated.seal(Field::ShippingAddress, "o-1", "2 Side St", nonce(2));
        assert_eq!(sealed_new.kid(), Some("k2"));
        // A node still on the old ring cannot open it, and says which key it lacks.
        assert_eq!(
            old.open(Field::ShippingAddress, "o-1", &sealed_new),
            Err(OpenError::UnknownKey("k2".into()))
        );
        // The same kid with other key material: refused, not garbage.
        let impostor = KeyRing::parse(&format!("k1:{K2}")).unwrap();
        assert_eq!(
            impostor.open(Field::ShippingAddress, "o-1", &sealed_old),
            Err(OpenError::Rejected("k1".into()))
        );
    }

    #[test]
    fn plain_values_of_older_events_read_as_they_are() {
        let ring = KeyRing::development();
        let plain = Sealed::from_stored("1 Main St");
        assert!(!plain.is_sealed());
        assert_eq!(
            ring.open(Field::ShippingAddress, "o-1", &plain).unwrap(),
            "1 Main St"
        );
        assert_eq!(format!("{plain:?}"), "Sealed(plain, redacted)");
    }

    #[test]
    fn key_rings_are_checked_and_never_echo_keys() {
        assert!(matches!(KeyRing::parse(" "), Err(KeyRingError::Empty)));
        assert!(matches!(KeyRing::parse("k1"), Err(KeyRingError::Shape(1))));
        assert!(matches!(
            KeyRing::parse(&format!("k1:{K1},bad kid:{K2}")),
            Err(KeyRingError::BadKid(2))
        ));
        assert!(matches!(
            KeyRing::parse(&format!("k1:{K1},k1:{K2}")),
            Err(KeyRingError::DuplicateKid(2, _))
        ));
        let short = "c2hvcnQ=";
        let err = KeyRing::parse(&format!("k1:{short}")).unwrap_err();
        assert_eq!(err, KeyRingError::BadKey(1, "k1".into()));
        assert!(!err.to_string().contains(short));
        assert!(matches!(
            KeyRing::parse(&format!("k1:{K1},")),
            Err(KeyRingError::Shape(2))
        ));
        let ring = KeyRing::parse(&format!("k1:{K1}")).unwrap();
        assert!(!format!("{ring:?}").contains(K1));
        assert!(!ring.is_development());
        assert!(KeyRing::development().is_development());
    }
    #[test]
    fn public_payloads_never_hold_the_token_and_the_address_only_when_disclosed() {
        let ring = KeyRing::development();
        let payload = serde_json::json!({
            "orderId": "o-1",
            "paymentToken": ring.seal(Field::PaymentToken, "o-1", "tok_ok", nonce(1)),
            "shippingAddress": ring.seal(Field::ShippingAddress, "o-1", "1 Main St", nonce(2)),
        });
        let mut hidden = payload.clone();
        disclose(&mut hidden, "o-1", &ring, Disclosure::None).unwrap();
        assert_eq!(hidden, serde_json::json!({"orderId": "o-1"}));
        let mut shown = payload.clone();
        disclose(&mut shown, "o-1", &ring, Disclosure::ShippingAddress).unwrap();
        assert_eq!(
            shown,
            serde_json::json!({"orderId": "o-1", "shippingAddress": "1 Main St"})
        );
        // Another ring: the address is withheld and the failure reported.
        let other = KeyRing::parse(&format!("k1:{K1}")).unwrap();
        let mut failed = payload;
        assert!(disclose(&mut failed, "o-1", &other, Disclosure::ShippingAddress).is_err());
        assert_eq!(failed, serde_json::json!({"orderId": "o-1"}));
    }
}
