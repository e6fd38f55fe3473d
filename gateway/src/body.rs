//! The body type every part of the gateway sends and receives (a leaf, so the error
//! answers and the upstream client need not depend on the proxy).

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Bytes;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the gateway sends or receives: streamed from a peer or built here.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body of bytes already in hand.
pub fn full_body(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}
