//! Connections to the regions: the gateway's own small HTTP/1.1 client, run on the
//! request's own task, with keep-alive connections pooled per worker thread (each
//! worker's runtime has its own [`Upstream`], so a request and its upstream connection
//! stay on one thread).
//!
//! Why not hyper's client connection: each of its connections is a task of its own, fed
//! through a channel, so an exchange meant two tasks woken and a message passed each
//! way, and the answer's body was polled through hyper's dispatcher; in callgrind that
//! was about a third of the gateway's instructions per proxied read. Here the request's
//! task writes the request head (and a buffered body) in one write, reads the answer
//! head into the connection's buffer, parses it with `httparse`, and an answer whose
//! body is already at hand (or small, with a `Content-Length`) goes back to the client
//! as one buffer, the connection back to the pool at once. Larger and chunked bodies
//! stream ([`StreamedBody`]); the connection goes back when they have been read to the
//! end.
//!
//! Limits of this client (the nodes need none of it):
//! - trailers of a chunked answer are read and dropped;
//! - an answer head larger than [`MAX_HEAD`] (64 KiB) or with more than
//!   [`MAX_HEADERS`] fields is refused (the request fails as a broken exchange);
//! - a streamed request body is written whole before the answer is read (no early
//!   answer while the client is still sending);
//! - no upgrades (`101`): the gateway strips `Upgrade` from requests anyway.
//!
//! A region given as `https://` gets TLS on each new connection (pinned CA, client
//! certificate: [`crate::tls::node_client`]); a pooled connection is reused as it is,
//! and plain regions take no TLS path at all.

use crate::body::{full_body, Body, BoxError};
use crate::config::RegionConfig;
use crate::slow_attempts::SlowAttempts;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version,
};
use internal_tls::ServerName;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

/// An idle connection unused this long is closed rather than reused (the node may have
/// closed it already; it costs a file descriptor on both sides).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per region and worker; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// The largest answer head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields an answer head may have.
pub const MAX_HEADERS: usize = 100;
/// An answer with a `Content-Length` up to this is read whole before it is handed on
/// (one buffer, the connection back in the pool at once); longer ones stream.
const READ_WHOLE_UP_TO: usize = 64 * 1024;
/// A buffered request body up to this size goes out in the same write as the head.
const COALESCE_UP_TO: usize = 16 * 1024;
/// Read buffer growth.
const READ_CHUNK: usize = 8 * 1024;

/// Why a request did not get an answer from the region.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("connect to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    /// The exchange failed on an established connection.
    #[error("upstream exchange: {0}")]
    Io(#[source] std::io::Error),
    /// The region's answer was not HTTP/1.1 as this client takes it.
    #[error("upstream answer: {0}")]
    Protocol(&'static str),
    /// The client's streamed request body went over the gateway's body limit.
    #[error("request body over the limit")]
    BodyTooLarge,
    /// The client's streamed request body could not be read.
    #[error("request body: {0}")]
    ClientBody(BoxError),
}

impl UpstreamError {
    /// Nothing reached the region, so the request may be sent anywhere again.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }
}

/// A request's body as it goes upstream.
pub enum SendBody {
    Buffered(Bytes),
    /// The client's body, streamed, at most `limit` bytes; `length` is the client's
    /// `Content-Length` if it gave one.
    Streaming {
        body: Incoming,
        limit: usize,
        length: Option<u64>,
    },
}

/// A request as it goes upstream.
pub struct Head<'a> {
    pub method: &'a Method,
    /// Origin form: `/path?query`.
    pub path_and_query: &'a str,
    /// The client's fields, already free of hop-by-hop ones; `Content-Length` is
    /// replaced by this client's own framing, and the names in [`Added`] by the
    /// gateway's values.
    pub headers: &'a HeaderMap,
    pub added: &'a Added,
}

/// The fields the gateway sets on a request it forwards, written after the client's
/// own; the client's fields of these names never pass.
#[derive(Clone)]
pub struct Added {
    pub request_id: HeaderValue,
    pub traceparent: HeaderValue,
    pub forwarded_for: HeaderValue,
    pub forwarded_proto: HeaderValue,
    /// The authenticated caller (`tandem-subject`, `tandem-scopes`), with auth on.
    pub subject: Option<HeaderValue>,
    pub scopes: Option<HeaderValue>,
    /// The client's `Authorization` stays here (auth on: checked by the gateway).
    pub drop_authorization: bool,
}

impl Added {
    /// Whether the client's field `name` gives way to the gateway's.
    fn replaces(&self, name: &HeaderName) -> bool {
        match name.as_str() {
            "content-length" | "transfer-encoding" | "x-request-id" | "traceparent"
            | "x-forwarded-for" | "x-forwarded-proto" | "tandem-subject" | "tandem-scopes" => true,
            "authorization" => self.drop_authorization,
            _ => false,
        }
    }
}

/// One worker's connections to every region.
pub struct Upstream {
    connect_timeout: Duration,
    /// By region index: the TLS client and the name the node's certificate must
    /// carry, for `https://` regions.
    tls: Vec<Option<(TlsConnector, ServerName<'static>)>>,
    /// Idle connections by region index, the most recently used last.
    idle: Mutex<Vec<Vec<Idle>>>,
    /// This worker's attempts waiting long for their answer.
    pub slow: Arc<SlowAttempts>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Where a request goes.
pub struct Target<'a> {
    /// The region's index in the routing table.
    pub index: usize,
    /// `host:port`.
    pub authority: &'a str,
    /// `authority` as a `Host` value, for a request that came without one (HTTP/2).
    pub host: &'a HeaderValue,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to a region with its buffers, kept between requests.
struct Conn {
    stream: Stream,
    /// What has been read and not yet consumed.
    read: bytes::BytesMut,
    /// The request head being written.
    write: Vec<u8>,
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            read: bytes::BytesMut::with_capacity(READ_CHUNK),
            write: Vec::with_capacity(1024),
        }
    }

    /// Still open and quiet: the region has neither closed it nor sent anything
    /// unasked while it sat in the pool. (The would-block read this costs is one the
    /// answer's read would otherwise make.)
    fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Puts read bytes not consumed yet back in front of the buffer (which is empty).
    fn put_back(&mut self, bytes: Bytes) {
        debug_assert!(self.read.is_empty());
        if bytes.is_empty() {
            return;
        }
        match bytes.try_into_mut() {
            // The same memory, still the buffer's only user: join it back.
            Ok(mut front) => {
                front.unsplit(std::mem::take(&mut self.read));
                self.read = front;
            }
            Err(shared) => self.read.extend_from_slice(&shared),
        }
    }

    /// Reads more into the buffer; an end of stream is an error.
    async fn fill(&mut self) -> Result<(), UpstreamError> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(READ_CHUNK);
        }
        match self.stream.read_buf(&mut self.read).await {
            Ok(0) => Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(()),
            Err(e) => Err(UpstreamError::Io(e)),
        }
    }
}

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the region closes the connection.
    UntilClose,
}

impl Upstream {
    /// `tls` is required for `https://` regions (the configuration ensures it).
    pub fn new(
        connect_timeout: Duration,
        regions: &[RegionConfig],
        tls: Option<&Arc<ClientConfig>>,
    ) -> Upstream {
        let tls = regions
            .iter()
            .map(|r| {
                let connector = TlsConnector::from(tls.filter(|_| r.tls)?.clone());
                let name = internal_tls::server_name(r.authority.host())
                    .expect("checked when the configuration was loaded");
                Some((connector, name))
            })
            .collect();
        Upstream {
            connect_timeout,
            tls,
            idle: Mutex::new((0..regions.len()).map(|_| Vec::new()).collect()),
            slow: Arc::default(),
        }
    }

    /// Sends the request to the region and gives its answer. The answer's body, when
    /// it streams, brings the connection back to the pool once read to the end.
    pub async fn send(
        self: &Arc<Self>,
        to: Target<'_>,
        head: Head<'_>,
        body: SendBody,
    ) -> Result<Response<Body>, UpstreamError> {
        // Connecting (and its TLS handshake) is boxed: most requests find a pooled
        // connection, and every request's future would otherwise be as large as the
        // handshake's, and copied as often.
        let (mut conn, pooled) = match self.checkout(to.index) {
            Some(c) => (c, true),
            None => (Box::pin(self.connect(to.index, to.authority)).await?, false),
        };
        let framing = match &body {
            SendBody::Buffered(b) => {
                let explicit = head.headers.contains_key(header::CONTENT_LENGTH);
                let wants_length = !b.is_empty()
                    || explicit
                    || matches!(*head.method, Method::POST | Method::PUT | Method::PATCH);
                RequestFraming::Length(wants_length.then_some(b.len() as u64))
            }
            SendBody::Streaming {
                length: Some(n), ..
            } => RequestFraming::Length(Some(*n)),
            SendBody::Streaming { length: None, .. } => RequestFraming::Chunked,
        };
        write_head(&mut conn.write, &head, to.host, framing);
        let inline = match &body {
            SendBody::Buffered(b) if b.len() <= COALESCE_UP_TO => {
                conn.write.extend_from_slice(b);
                true
            }
            _ => false,
        };
        // A pooled connection the region closed after the quiet check (a race with its
        // idle timeout) fails this first write; nothing was taken in, so the request
        // goes out again on a new connection.
        if let Err(e) = write_all(&mut conn.stream, &conn.write).await {
            if !pooled {
                return Err(UpstreamError::Io(e));
            }
            conn = Box::pin(self.connect(to.index, to.authority)).await?;
            write_head(&mut conn.write, &head, to.host, framing);
            if inline {
                if let SendBody::Buffered(b) = &body {
                    conn.write.extend_from_slice(b);
                }
            }
            write_all(&mut conn.stream, &conn.write)
                .await
                .map_err(UpstreamError::Io)?;
        }
        match body {
            SendBody::Buffered(b) if !inline => write_all(&mut conn.stream, &b)
                .await
                .map_err(UpstreamError::Io)?,
            SendBody::Buffered(_) => {}
            SendBody::Streaming { body, limit, .. } => {
                Box::pin(stream_body(&mut conn.stream, body, limit, framing)).await?;
            }
        }
        if let Stream::Tls(s) = &mut conn.stream {
            s.flush().await.map_err(UpstreamError::Io)?;
        }
        self.read_answer(to.index, conn, head.method).await
    }

    async fn read_answer(
        self: &Arc<Self>,
        region: usize,
        mut conn: Conn,
        method: &Method,
    ) -> Result<Response<Body>, UpstreamError> {
        loop {
            if conn.read.is_empty() {
                conn.fill().await?;
            }
            // Parsed once, over the bytes as they will be kept: the field values share
            // this memory, and so does the body when it came with the head.
            let bytes = conn.read.split().freeze();
            let Some(answer) = parse_answer(&bytes, method)? else {
                if bytes.len() >= MAX_HEAD {
                    return Err(UpstreamError::Protocol("answer head over 64 KiB"));
                }
                conn.put_back(bytes);
                conn.fill().await?;
                continue;
            };
            let rest = bytes.slice(answer.len..);
            if answer.status.is_informational() {
                // 100 Continue and the like: the real answer follows.
                conn.put_back(rest);
                continue;
            }
            let keep_alive = answer.keep_alive;
            let mut resp = Response::new(full_body(Bytes::new()));
            *resp.status_mut() = answer.status;
            *resp.version_mut() = Version::HTTP_11;
            *resp.headers_mut() = answer.headers;
            let body = match answer.framing {
                Framing::Empty => {
                    self.checkin_if(region, conn, keep_alive && rest.is_empty());
                    return Ok(resp);
                }
                Framing::Length(n) if n as usize <= rest.len() => {
                    let n = n as usize;
                    self.checkin_if(region, conn, keep_alive && rest.len() == n);
                    full_body(rest.slice(..n))
                }
                Framing::Length(n) if n as usize <= READ_WHOLE_UP_TO => {
                    let n = n as usize;
                    conn.put_back(rest);
                    while conn.read.len() < n {
                        conn.fill().await?;
                    }
                    let body = conn.read.split_to(n).freeze();
                    self.checkin_if(region, conn, keep_alive);
                    full_body(body)
                }
                framing => {
                    conn.put_back(rest);
                    StreamedBody {
                        conn: Some(conn),
                        state: match framing {
                            Framing::Length(n) => BodyState::Length(n),
                            Framing::Chunked => BodyState::ChunkSize,
                            _ => BodyState::UntilClose,
                        },
                        keep_alive: keep_alive && framing != Framing::UntilClose,
                        pool: self.clone(),
                        region,
                    }
                    .boxed()
                }
            };
            *resp.body_mut() = body;
            return Ok(resp);
        }
    }

    /// The most recently used idle connection to the region still open, if any.
    fn checkout(&self, region: usize) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let stack = idle.get_mut(region)?;
        while let Some(mut c) = stack.pop() {
            if c.since.elapsed() < IDLE_TIMEOUT && c.conn.is_reusable() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Gives a connection whose answer has been read to the end back to the pool, if
    /// it may carry another request and nothing unasked came after the answer.
    fn checkin_if(&self, region: usize, mut conn: Conn, keep_alive: bool) {
        if !keep_alive || !conn.read.is_empty() {
            return;
        }
        // The buffer's memory is the answer's until the client has it: start afresh
        // when it is shared, rather than grow a copy.
        if conn.read.capacity() < 1024 {
            conn.read = bytes::BytesMut::with_capacity(READ_CHUNK);
        }
        conn.write.clear();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stack) = idle.get_mut(region) {
            if stack.len() < MAX_IDLE {
                stack.push(Idle {
                    conn,
                    since: Instant::now(),
                });
            }
        }
    }

    async fn connect(&self, region: usize, authority: &str) -> Result<Conn, UpstreamError> {
        let failed = |source| UpstreamError::Connect {
            authority: authority.to_string(),
            source,
        };
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(failed(e)),
                Err(_) => return Err(failed(std::io::ErrorKind::TimedOut.into())),
            };
        let _ = stream.set_nodelay(true);
        let Some(Some((connector, name))) = self.tls.get(region) else {
            return Ok(Conn::new(Stream::Plain(stream)));
        };
        // The TLS handshake is part of connecting: a node whose certificate is not
        // trusted (or that refuses ours) was sent nothing, so the request may go to
        // another region.
        match tokio::time::timeout(
            self.connect_timeout,
            connector.connect(name.clone(), stream),
        )
        .await
        {
            Ok(Ok(s)) => Ok(Conn::new(Stream::Tls(Box::new(s)))),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(failed(std::io::ErrorKind::TimedOut.into())),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum RequestFraming {
    /// `Content-Length: n`, or no body and no length at all.
    Length(Option<u64>),
    Chunked,
}

/// `METHOD /path HTTP/1.1`, the fields, the framing, the blank line.
fn write_head(out: &mut Vec<u8>, head: &Head<'_>, host: &HeaderValue, framing: RequestFraming) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !head.headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut field = |name: &str, value: &HeaderValue| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in head.headers {
        if !head.added.replaces(name) {
            field(name.as_str(), value);
        }
    }
    let added = head.added;
    field("x-request-id", &added.request_id);
    field("traceparent", &added.traceparent);
    field("x-forwarded-for", &added.forwarded_for);
    field("x-forwarded-proto", &added.forwarded_proto);
    if let Some(v) = &added.subject {
        field("tandem-subject", v);
    }
    if let Some(v) = &added.scopes {
        field("tandem-scopes", v);
    }
    match framing {
        RequestFraming::Length(Some(n)) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        RequestFraming::Length(None) => {}
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// The head `write_head` gives for a GET of `/` with these fields, for tests.
#[cfg(test)]
pub(crate) fn written_head(headers: &HeaderMap, added: &Added) -> String {
    let mut out = Vec::new();
    let head = Head {
        method: &Method::GET,
        path_and_query: "/",
        headers,
        added,
    };
    write_head(
        &mut out,
        &head,
        &HeaderValue::from_static("node"),
        RequestFraming::Length(None),
    );
    String::from_utf8(out).expect("ascii")
}

async fn write_all(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await
}

/// Copies the client's body to the region, chunked when its length is unknown.
async fn stream_body(
    stream: &mut Stream,
    body: Incoming,
    limit: usize,
    framing: RequestFraming,
) -> Result<(), UpstreamError> {
    let chunked = matches!(framing, RequestFraming::Chunked);
    let mut body = Limited::new(body, limit);
    let mut line = Vec::with_capacity(16);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                UpstreamError::BodyTooLarge
            } else {
                UpstreamError::ClientBody(e)
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // the client's trailers are not passed on
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            line.clear();
            let _ = write!(line, "{:x}\r\n", data.len());
            write_all(stream, &line).await.map_err(UpstreamError::Io)?;
        }
        write_all(stream, &data).await.map_err(UpstreamError::Io)?;
        if chunked {
            write_all(stream, b"\r\n")
                .await
                .map_err(UpstreamError::Io)?;
        }
    }
    if chunked {
        write_all(stream, b"0\r\n\r\n")
            .await
            .map_err(UpstreamError::Io)?;
    }
    Ok(())
}

/// An answer head, parsed.
struct Answer {
    /// Bytes of the head, blank line included.
    len: usize,
    status: StatusCode,
    /// The fields, hop-by-hop ones (and those `Connection` names) left out.
    headers: HeaderMap,
    keep_alive: bool,
    framing: Framing,
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// The names the nodes answer with, as the node writes them (lowercase): taken as
/// they are, where `HeaderName::from_bytes` would check each byte and copy a name it
/// does not know into memory of its own.
fn known_name(name: &[u8]) -> Option<HeaderName> {
    static X_REGION: HeaderName = HeaderName::from_static("x-region");
    static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    static TANDEM_DURABILITY: HeaderName = HeaderName::from_static("tandem-durability");
    static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    Some(match name {
        b"content-type" => header::CONTENT_TYPE,
        b"content-length" => header::CONTENT_LENGTH,
        b"date" => header::DATE,
        b"x-region" => X_REGION.clone(),
        b"x-request-id" => X_REQUEST_ID.clone(),
        b"tandem-durability" => TANDEM_DURABILITY.clone(),
        b"traceparent" => TRACEPARENT.clone(),
        b"location" => header::LOCATION,
        b"retry-after" => header::RETRY_AFTER,
        b"etag" => header::ETAG,
        b"cache-control" => header::CACHE_CONTROL,
        b"vary" => header::VARY,
        _ => return None,
    })
}

/// `None`: the head is not complete yet. Field values share `buf`'s memory.
fn parse_answer(buf: &Bytes, method: &Method) -> Result<Option<Answer>, UpstreamError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::Protocol("too many answer header fields"))
        }
        Err(_) => return Err(UpstreamError::Protocol("malformed answer head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(UpstreamError::Protocol("bad status"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(UpstreamError::Protocol("upgrade not supported"));
    }
    let http11 = resp.version == Some(1);
    let mut keep_alive = http11;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut connection: Option<&[u8]> = None;
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for f in resp.headers.iter() {
        // Hop-by-hop names are all lowercase-comparable ASCII; most fields are none
        // of them, and the first byte tells most apart.
        let hop = matches!(
            f.name.as_bytes().first(),
            Some(b'c' | b'C' | b'k' | b'K' | b'p' | b'P' | b't' | b'T' | b'u' | b'U')
        ) && HOP_BY_HOP.iter().any(|h| f.name.eq_ignore_ascii_case(h));
        if f.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(f.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(UpstreamError::Protocol("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(UpstreamError::Protocol("conflicting content-length"));
            }
            length = Some(n);
        } else if hop {
            if f.name.eq_ignore_ascii_case("transfer-encoding") {
                // Chunked only if it is the last coding (RFC 9112 6.3).
                let last = f.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if f.name.eq_ignore_ascii_case("connection") {
                connection = Some(f.value);
                for token in f.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        keep_alive = true;
                    }
                }
            }
            continue;
        }
        let name = match known_name(f.name.as_bytes()) {
            Some(n) => n,
            None => HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| UpstreamError::Protocol("bad header name"))?,
        };
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(f.value))
            .map_err(|_| UpstreamError::Protocol("bad header value"))?;
        headers.append(name, value);
    }
    if let Some(list) = connection {
        // Fields the region named as meant for this connection only.
        for token in list.split(|b| *b == b',') {
            let token = token.trim_ascii();
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(name);
            }
        }
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    if chunked.is_some() {
        // The body is passed on unchunked: the client's connection frames it anew.
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Some(Answer {
        len,
        status,
        headers,
        keep_alive,
        framing,
    }))
}

/// A streamed answer body. The connection goes back to the pool when the body has
/// been read to its end; dropped before that, the connection is closed.
struct StreamedBody {
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
    pool: Arc<Upstream>,
    region: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk, this many bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer lines until a blank one (dropped).
    Trailers,
    UntilClose,
    Done,
}

/// The longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

impl StreamedBody {
    /// Reads more from the region: `Ok(false)` at the end of the stream.
    fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        if conn.read.capacity() - conn.read.len() < 1024 {
            conn.read.reserve(READ_CHUNK);
        }
        let read = conn.stream.read_buf(&mut conn.read);
        tokio::pin!(read);
        read.poll(cx).map_ok(|n| n > 0)
    }

    /// Takes one line (without its CRLF) from the buffer, if a whole one is there.
    fn take_line(conn: &mut Conn) -> Result<Option<Bytes>, UpstreamError> {
        match conn.read.iter().position(|b| *b == b'\n') {
            Some(i) => {
                let mut line = conn.read.split_to(i + 1).freeze();
                line.truncate(i);
                if line.last() == Some(&b'\r') {
                    line.truncate(i - 1);
                }
                Ok(Some(line))
            }
            None if conn.read.len() > MAX_LINE => {
                Err(UpstreamError::Protocol("chunk line too long"))
            }
            None => Ok(None),
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, UpstreamError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        loop {
            match self.state {
                BodyState::Done => return Poll::Ready(Ok(None)),
                BodyState::Length(0) => self.state = BodyState::Done,
                BodyState::Length(left) | BodyState::ChunkData(left) if !conn.read.is_empty() => {
                    let n = (left as usize).min(conn.read.len());
                    let data = conn.read.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = match self.state {
                        BodyState::Length(_) => BodyState::Length(left),
                        _ if left == 0 => BodyState::ChunkEnd,
                        _ => BodyState::ChunkData(left),
                    };
                    return Poll::Ready(Ok(Some(data)));
                }
                BodyState::UntilClose if !conn.read.is_empty() => {
                    let data = conn.read.split().freeze();
                    return Poll::Ready(Ok(Some(data)));
                }
                BodyState::ChunkSize => match Self::take_line(conn)? {
                    Some(line) => {
                        let digits = line.split(|b| *b == b';').next().unwrap_or_default();
                        let size = std::str::from_utf8(digits.trim_ascii())
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok())
                            .ok_or(UpstreamError::Protocol("bad chunk size"))?;
                        self.state = if size == 0 {
                            BodyState::Trailers
                        } else {
                            BodyState::ChunkData(size)
                        };
                    }
                    None => {
                        if !ready_or_eof(Self::poll_fill(conn, cx))? {
                            return Poll::Pending;
                        }
                    }
                },
                BodyState::ChunkEnd => match Self::take_line(conn)? {
                    Some(line) if line.is_empty() => self.state = BodyState::ChunkSize,
                    Some(_) => return Poll::Ready(Err(UpstreamError::Protocol("bad chunk end"))),
                    None => {
                        if !ready_or_eof(Self::poll_fill(conn, cx))? {
                            return Poll::Pending;
                        }
                    }
                },
                BodyState::Trailers => match Self::take_line(conn)? {
                    Some(line) if line.is_empty() => self.state = BodyState::Done,
                    Some(_) => {} // a trailer field: dropped
                    None => {
                        if !ready_or_eof(Self::poll_fill(conn, cx))? {
                            return Poll::Pending;
                        }
                    }
                },
                BodyState::UntilClose => match Self::poll_fill(conn, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(true)) => {}
                    Poll::Ready(Ok(false)) => self.state = BodyState::Done,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(UpstreamError::Io(e))),
                },
                BodyState::Length(_) | BodyState::ChunkData(_) => {
                    if !ready_or_eof(Self::poll_fill(conn, cx))? {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// `Ok(true)`: more was read; `Ok(false)`: not yet (pending); an early end of stream
/// is an error.
fn ready_or_eof(polled: Poll<std::io::Result<bool>>) -> Result<bool, UpstreamError> {
    match polled {
        Poll::Pending => Ok(false),
        Poll::Ready(Ok(true)) => Ok(true),
        Poll::Ready(Ok(false)) => Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Poll::Ready(Err(e)) => Err(UpstreamError::Io(e)),
    }
}

impl hyper::body::Body for StreamedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.step(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Ok(None)) => {
                if let Some(conn) = self.conn.take() {
                    let keep_alive = self.keep_alive;
                    self.pool.checkin_if(self.region, conn, keep_alive);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.conn = None;
                self.state = BodyState::Done;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_added() -> Added {
        Added {
            request_id: HeaderValue::from_static("r"),
            traceparent: HeaderValue::from_static("t"),
            forwarded_for: HeaderValue::from_static("1.2.3.4"),
            forwarded_proto: HeaderValue::from_static("http"),
            subject: None,
            scopes: None,
            drop_authorization: false,
        }
    }

    #[test]
    fn answer_heads_are_framed_and_hop_by_hop_fields_dropped() {
        let parse =
            |raw: &'static [u8], method: &Method| parse_answer(&Bytes::from_static(raw), method);
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nx-kept: yes\r\n\r\nhello";
        let p = parse(raw, &Method::GET).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Length(5));
        assert_eq!(&raw[p.len..], b"hello");
        assert!(p.keep_alive);
        let h = p.headers;
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h[header::CONTENT_LENGTH], "5");

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let p = parse(chunked, &Method::GET).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Chunked);
        assert!(p.headers.is_empty());
        let close = b"HTTP/1.0 200 OK\r\n\r\n";
        let p = parse(close, &Method::GET).unwrap().unwrap();
        assert_eq!((p.framing, p.keep_alive), (Framing::UntilClose, false));
        let head_req = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n";
        let p = parse(head_req, &Method::HEAD).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Empty);
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
            .unwrap()
            .is_none());
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            &Method::GET
        )
        .is_err());
    }

    #[test]
    fn request_heads_carry_own_framing() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.insert("x-a", HeaderValue::from_static("1"));
        let mut out = Vec::new();
        let added = test_added();
        let head = Head {
            method: &Method::POST,
            path_and_query: "/orders?x=1",
            headers: &h,
            added: &added,
        };
        write_head(
            &mut out,
            &head,
            &HeaderValue::from_static("node:1"),
            RequestFraming::Length(Some(3)),
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "POST /orders?x=1 HTTP/1.1\r\nhost: node:1\r\nx-a: 1\r\nx-request-id: r\r\n\
             traceparent: t\r\nx-forwarded-for: 1.2.3.4\r\nx-forwarded-proto: http\r\n\
             content-length: 3\r\n\r\n"
        );
    }

    /// A chunked answer streams through [`StreamedBody`] and its trailers are dropped.
    #[tokio::test]
    async fn chunked_answers_stream_and_connections_come_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for _ in 0..2 {
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.unwrap();
                    seen.extend_from_slice(&b[..n]);
                }
                s.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
                )
                .await
                .unwrap();
            }
        });
        let authority = addr.to_string();
        let region = RegionConfig {
            id: "a".into(),
            url: format!("http://{authority}"),
            authority: authority.parse().unwrap(),
            tls: false,
        };
        let up = Arc::new(Upstream::new(
            Duration::from_secs(1),
            std::slice::from_ref(&region),
            None,
        ));
        let host = HeaderValue::from_str(&authority).unwrap();
        for _ in 0..2 {
            let headers = HeaderMap::new();
            let resp = up
                .send(
                    Target {
                        index: 0,
                        authority: &authority,
                        host: &host,
                    },
                    Head {
                        method: &Method::GET,
                        path_and_query: "/x",
                        headers: &headers,
                        added: &test_added(),
                    },
                    SendBody::Buffered(Bytes::new()),
                )
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(!resp.headers().contains_key(header::TRANSFER_ENCODING));
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello world");
        }
        server.await.unwrap();
    }
}
