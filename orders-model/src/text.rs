//! Text fields a client sends: not blank, and at most so many bytes.

use std::fmt;

/// Text that is not blank and at most `MAX` bytes long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedText<const MAX: usize>(String);

impl<const MAX: usize> BoundedText<MAX> {
    pub fn parse(s: &str) -> Option<BoundedText<MAX>> {
        (!s.trim().is_empty() && s.len() <= MAX).then(|| BoundedText(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Display for BoundedText<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who orders: the caller's own id for the customer.
pub type CustomerId = BoundedText<128>;
pub type ShippingAddress = BoundedText<1000>;
/// The payment provider's token for the card (API.md lists the test tokens).
pub type PaymentToken = BoundedText<64>;
pub type ProductName = BoundedText<200>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_or_long_text_is_refused() {
        assert!(CustomerId::parse("c-1").is_some());
        assert!(CustomerId::parse("  ").is_none());
        assert!(CustomerId::parse(&"x".repeat(129)).is_none());
        assert_eq!(PaymentToken::parse("tok_ok").unwrap().as_str(), "tok_ok");
    }
}
