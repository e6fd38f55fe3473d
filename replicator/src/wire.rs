//! The copier's hot path, on plain RESP2 connections.
//!
//! An XREAD reply already holds each entry's fields encoded exactly as a command needs
//! them (`$len\r\nbytes\r\n` each, in order). So a batch is turned into the arguments
//! of one copy script call (see `replication::COPY`) by writing a short header per
//! entry (stream, id, field count) and copying the entry's field bytes in one piece: no
//! per-field allocation, no decoding, no re-encoding, and the copy is byte-for-byte
//! exact by construction. The general-purpose client (with
//! its parsed reply tree) stays in use for everything that is not per-entry.

use crate::link::{LinkError, Side};
use eventlog::envelope::StreamId;
use internal_tls::{MaybeTls, TlsConnector};
use redis::{ConnectionAddr, IntoConnectionInfo};
use std::io::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and how to connect, taken from a `redis://` or `rediss://` URL.
#[derive(Debug, Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// `rediss://`: TLS, verified against REPLICATOR_REDIS_CA.
    tls: bool,
    db: i64,
    username: Option<String>,
    password: Option<String>,
}

impl Endpoint {
    /// `redis://` or `rediss://` over TCP: the hot path speaks RESP2 on a socket (or
    /// TLS over it), not on a Unix socket.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        let (host, port, tls) = match info.addr().clone() {
            ConnectionAddr::Tcp(host, port) => (host, port, false),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => (host, port, true),
            ConnectionAddr::TcpTls { .. } => {
                return Err(format!(
                    "{url:?}: #insecure (no certificate check) is not supported"
                ))
            }
            _ => return Err(format!("{url:?}: only redis:// or rediss:// over TCP")),
        };
        let r = info.redis_settings();
        Ok(Endpoint {
            host,
            port,
            tls,
            db: r.db(),
            username: r.username().map(String::from),
            password: r.password().map(String::from),
        })
    }
}

/// Encodes one command as a RESP2 array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The largest reply the copier takes. A batch of entries is far smaller (the node's
/// events are kilobytes, a batch at most `batch_size` of them); a peer that declares or
/// sends more is broken or hostile, and buffering it would exhaust memory.
pub const MAX_REPLY_BYTES: usize = 256 << 20;
/// Deepest nesting of arrays in a reply: XREAD's is 5 levels. A bound keeps a reply of
/// nested one-element arrays from overflowing the stack of the recursive scan.
const MAX_DEPTH: usize = 16;
/// Longest header line (`$<len>` / `*<count>`): an i64 and the type byte fit easily.
const MAX_HEADER_LINE: usize = 32;

/// A RESP2 connection that returns whole replies as bytes.
pub struct RawConn {
    side: Side,
    stream: MaybeTls,
    /// Received bytes not yet handed out.
    buf: Vec<u8>,
    response_timeout: Duration,
}

impl RawConn {
    pub async fn connect(
        side: Side,
        ep: &Endpoint,
        tls: Option<&TlsConnector>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<RawConn, LinkError> {
        let unreachable = |e: std::io::Error| LinkError::Unreachable {
            side: side.as_str(),
            source: e.into(),
        };
        let stream = match tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => {
                return Err(unreachable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                )))
            }
        };
        stream.set_nodelay(true).map_err(unreachable)?;
        let stream = match (ep.tls, tls) {
            (false, _) => MaybeTls::Plain(stream),
            (true, None) => {
                return Err(LinkError::Other(format!(
                    "{}: rediss:// needs REPLICATOR_REDIS_CA",
                    side.as_str()
                )))
            }
            (true, Some(connector)) => {
                let name = internal_tls::server_name(&ep.host).map_err(LinkError::Other)?;
                // The handshake counts against the connect timeout: a peer that accepts
                // TCP and then says nothing is as unreachable as one that refuses.
                match tokio::time::timeout(connect_timeout, connector.connect(name, stream)).await {
                    Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                    Ok(Err(e)) => return Err(unreachable(e)),
                    Err(_) => {
                        return Err(unreachable(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        )))
                    }
                }
            }
        };
        let mut conn = RawConn {
            side,
            stream,
            buf: Vec::with_capacity(1 << 20),
            response_timeout,
        };
        let mut hello = Vec::new();
        let mut expect = 0;
        if let Some(pw) = &ep.password {
            match &ep.username {
                Some(u) => encode(&mut hello, &[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => encode(&mut hello, &[b"AUTH", pw.as_bytes()]),
            }
            expect += 1;
        }
        if ep.db != 0 {
            encode(&mut hello, &[b"SELECT", ep.db.to_string().as_bytes()]);
            expect += 1;
        }
        if expect > 0 {
            let replies = conn.request(&hello, expect, Duration::ZERO).await?;
            if let Some(err) = first_error(&replies) {
                return Err(LinkError::Server {
                    side: side.as_str(),
                    message: err,
                });
            }
        }
        Ok(conn)
    }

    fn unreachable(&self, e: std::io::Error) -> LinkError {
        LinkError::Unreachable {
            side: self.side.as_str(),
            source: e.into(),
        }
    }

    /// Sends `bytes` and returns the next `n` replies, whole. `extra` extends the
    /// response timeout (for a blocking command). Any error leaves the connection
    /// unusable; the caller drops it.
    pub async fn request(
        &mut self,
        bytes: &[u8],
        n: usize,
        extra: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        self.send(bytes).await?;
        self.read(n, extra).await
    }

    /// Writes pipelined commands without waiting for their replies.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        // A TLS stream may hold the last records back until flushed (plain TCP: no-op).
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.response_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unreachable(e)),
            Err(_) => Err(self.unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))),
        }
    }

    /// Reads the next `n` replies, whole.
    pub async fn read(&mut self, n: usize, extra: Duration) -> Result<Vec<u8>, LinkError> {
        let deadline = tokio::time::Instant::now() + self.response_timeout + extra;
        let timeout = || std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out");
        // Complete frames stay complete: only the partial one is scanned again.
        let (mut pos, mut found) = (0usize, 0usize);
        loop {
            while found < n {
                match frame_end(&self.buf, pos)
                    .map_err(|e| LinkError::Other(format!("{}: {e}", self.side.as_str())))?
                {
                    Some(end) => {
                        pos = end;
                        found += 1;
                    }
                    None => break,
                }
            }
            if found == n {
                // Copy the replies out and keep the (large, warm) buffer: handing the
                // buffer itself out would mean a fresh allocation for every reply.
                let out = self.buf[..pos].to_vec();
                self.buf.drain(..pos);
                return Ok(out);
            }
            if self.buf.len() - pos > MAX_REPLY_BYTES {
                return Err(LinkError::Other(format!(
                    "{}: a reply is over {MAX_REPLY_BYTES} bytes",
                    self.side.as_str()
                )));
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(1 << 20);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    return Err(self.unreachable(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    )))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(self.unreachable(e)),
                Err(_) => return Err(self.unreachable(timeout())),
            }
        }
    }
}

/// The first `-ERR` reply among top-level frames, if any.
pub fn first_error(replies: &[u8]) -> Option<String> {
    let mut pos = 0;
    while pos < replies.len() {
        if replies[pos] == b'-' {
            let end = line_end(replies, pos)?;
            return Some(String::from_utf8_lossy(&replies[pos + 1..end]).into_owned());
        }
        pos = frame_end(replies, pos).ok()??;
    }
    None
}

/// Index of the `\r` ending the line that starts at `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    let nl = buf.get(from..)?.iter().position(|&b| b == b'\n')? + from;
    (nl > from && buf[nl - 1] == b'\r').then_some(nl - 1)
}

fn parse_len(buf: &[u8], pos: usize, cr: usize) -> Result<i64, String> {
    std::str::from_utf8(&buf[pos + 1..cr])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad length at byte {pos}"))
}

/// The end of the RESP frame starting at `pos`; `None` while it is incomplete. A frame
/// that declares more than [`MAX_REPLY_BYTES`], nests deeper than [`MAX_DEPTH`] or has
/// a header line that never ends is an error, never a wait for more bytes.
pub fn frame_end(buf: &[u8], pos: usize) -> Result<Option<usize>, String> {
    frame_end_within(buf, pos, 0)
}

fn frame_end_within(buf: &[u8], pos: usize, depth: usize) -> Result<Option<usize>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("reply nested deeper than {MAX_DEPTH} levels"));
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(cr) = line_end(buf, pos) else {
        if matches!(kind, b'$' | b'*' | b'%' | b'~') && buf.len() - pos > MAX_HEADER_LINE {
            return Err(format!("header line at byte {pos} does not end"));
        }
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' => Ok(Some(cr + 2)),
        b'$' => {
            let n = parse_len(buf, pos, cr)?;
            if n < 0 {
                return Ok(Some(cr + 2));
            }
            if n as u64 > MAX_REPLY_BYTES as u64 {
                return Err(format!("bulk string of {n} bytes at byte {pos}"));
            }
            let end = cr + 2 + n as usize + 2;
            Ok((end <= buf.len()).then_some(end))
        }
        b'*' | b'%' | b'~' => {
            let n = parse_len(buf, pos, cr)?;
            // Every element takes at least 3 bytes (`+` and CRLF).
            if n > (MAX_REPLY_BYTES / 3) as i64 {
                return Err(format!("aggregate of {n} elements at byte {pos}"));
            }
            let n = if kind == b'%' { n * 2 } else { n };
            let mut p = cr + 2;
            for _ in 0..n.max(0) {
                match frame_end_within(buf, p, depth + 1)? {
                    Some(e) => p = e,
                    None => return Ok(None),
                }
            }
            Ok(Some(p))
        }
        other => Err(format!("unexpected RESP type byte {other:#x} at {pos}")),
    }
}

/// A complete frame's header: `(type byte, length or count, start of the payload)`.
fn header(buf: &[u8], pos: usize) -> Result<(u8, i64, usize), String> {
    let kind = *buf.get(pos).ok_or("truncated frame")?;
    let cr = line_end(buf, pos).ok_or("truncated frame")?;
    let n = if matches!(kind, b'*' | b'$') {
        parse_len(buf, pos, cr)?
    } else {
        0
    };
    Ok((kind, n, cr + 2))
}

fn bulk(buf: &[u8], pos: usize) -> Result<(&[u8], usize), String> {
    match header(buf, pos)? {
        (b'$', n, start) if n >= 0 => {
            let end = start + n as usize;
            Ok((buf.get(start..end).ok_or("truncated bulk string")?, end + 2))
        }
        (b'+', _, start) => {
            let cr = start - 2;
            Ok((&buf[pos + 1..cr], start))
        }
        _ => Err(format!("expected a bulk string at {pos}")),
    }
}

fn array(buf: &[u8], pos: usize) -> Result<(i64, usize), String> {
    match header(buf, pos)? {
        (b'*', n, start) => Ok((n, start)),
        (b'-', _, start) => Err(String::from_utf8_lossy(&buf[pos + 1..start - 2]).into_owned()),
        _ => Err(format!("expected an array at {pos}")),
    }
}

/// What one XREAD reply held for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPart {
    pub stream: String,
    pub entries: usize,
    pub first: StreamId,
    pub last: StreamId,
}

/// Turns one XREAD reply (RESP2) into copy-script arguments appended to `out`: per
/// entry its stream, its id, its field count, then its field bytes as they are.
/// Returns what each stream held and how many arguments were written.
pub fn xread_to_entries(
    frame: &[u8],
    out: &mut Vec<u8>,
) -> Result<(Vec<StreamPart>, usize), String> {
    let (streams, mut p) = array(frame, 0)?;
    let mut parts = Vec::new();
    let mut args = 0usize;
    for _ in 0..streams.max(0) {
        let (two, q) = array(frame, p)?;
        if two != 2 {
            return Err("stream element is not a pair".into());
        }
        let (name, q) = bulk(frame, q)?;
        let (entries, mut q) = array(frame, q)?;
        let stream = String::from_utf8_lossy(name).into_owned();
        let mut part = StreamPart {
            stream,
            entries: 0,
            first: StreamId::ZERO,
            last: StreamId::ZERO,
        };
        for _ in 0..entries.max(0) {
            let (two, r) = array(frame, q)?;
            if two != 2 {
                return Err("entry is not a pair".into());
            }
            let (id, r) = bulk(frame, r)?;
            let (fields, mut r) = array(frame, r)?;
            let fields_start = r;
            for _ in 0..fields.max(0) {
                r = frame_end(frame, r)?.ok_or("truncated entry")?;
            }
            let sid = std::str::from_utf8(id)
                .ok()
                .and_then(StreamId::parse)
                .ok_or("bad entry id")?;
            if fields > 0 {
                let count = fields.to_string();
                encode_args(out, &[name, id, count.as_bytes()]);
                out.extend_from_slice(&frame[fields_start..r]);
                args += 3 + fields as usize;
                if part.entries == 0 {
                    part.first = sid;
                }
                part.entries += 1;
                part.last = sid;
            }
            q = r;
        }
        p = q;
        if part.entries > 0 {
            parts.push(part);
        }
    }
    Ok((parts, args))
}

/// Bulk strings without the array header (arguments of a command being built).
fn encode_args(out: &mut Vec<u8>, args: &[&[u8]]) {
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The whole copy-script call for one batch: `EVALSHA sha 3 role intent checkpoint k
/// (stream last)*k` then the `args` entry arguments already in `entries`.
pub fn copy_command(
    sha: &str,
    keys: [&str; 3],
    parts: &[StreamPart],
    entries: &[u8],
    args: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() + 256);
    let total = 2 + 1 + keys.len() + 1 + 2 * parts.len() + args;
    let _ = write!(out, "*{total}\r\n");
    let k = parts.len().to_string();
    encode_args(&mut out, &[b"EVALSHA", sha.as_bytes(), b"3"]);
    encode_args(
        &mut out,
        &[
            keys[0].as_bytes(),
            keys[1].as_bytes(),
            keys[2].as_bytes(),
            k.as_bytes(),
        ],
    );
    for p in parts {
        let last = p.last.to_string();
        encode_args(&mut out, &[p.stream.as_bytes(), last.as_bytes()]);
    }
    out.extend_from_slice(entries);
    out
}

/// Outcome of one entry of a copy.
#[derive(Debug, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    /// The id is at or below the stream's last id: the entry was copied before.
    AlreadyThere,
    Failed(String),
}

/// The reply to one copy-script call: one outcome per entry, or the script's error
/// (`FENCED ...` when the local region is active or being promoted).
pub fn copy_outcomes(reply: &[u8], n: usize) -> Result<Result<Vec<AddOutcome>, String>, String> {
    if reply.first() == Some(&b'-') {
        let end = frame_end(reply, 0)?.ok_or("truncated error")?;
        return Ok(Err(String::from_utf8_lossy(&reply[1..end - 2]).into_owned()));
    }
    let (len, mut pos) = array(reply, 0)?;
    if len < 0 || len as usize != n {
        return Err(format!("{len} outcomes for {n} entries"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let end = frame_end(reply, pos)?.ok_or("truncated reply")?;
        let body = &reply[pos + 1..end - 2];
        out.push(match reply[pos] {
            b':' if body == b"1" => AddOutcome::Added,
            b':' => AddOutcome::AlreadyThere,
            _ => {
                let (msg, _) = bulk(reply, pos)?;
                AddOutcome::Failed(String::from_utf8_lossy(msg).into_owned())
            }
        });
        pos = end;
    }
    Ok(Ok(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xread_reply() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"*1\r\n*2\r\n$13\r\ntandem:events\r\n*2\r\n");
        v.extend_from_slice(
            b"*2\r\n$3\r\n5-1\r\n*4\r\n$4\r\ntype\r\n$1\r\nT\r\n$5\r\nevent\r\n$2\r\n{}\r\n",
        );
        v.extend_from_slice(b"*2\r\n$3\r\n6-0\r\n*2\r\n$1\r\na\r\n$0\r\n\r\n");
        v
    }

    #[test]
    fn frames_are_delimited_and_incomplete_ones_wait() {
        let r = xread_reply();
        assert_eq!(frame_end(&r, 0).unwrap(), Some(r.len()));
        for cut in 1..r.len() {
            assert_eq!(frame_end(&r[..cut], 0).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(frame_end(b"*-1\r\n", 0).unwrap(), Some(5));
    }

    #[test]
    fn xread_becomes_copy_arguments_with_the_same_ids_and_bytes() {
        let mut out = Vec::new();
        let (parts, args) = xread_to_entries(&xread_reply(), &mut out).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].entries, 2);
        assert_eq!(parts[0].first, StreamId { ms: 5, seq: 1 });
        assert_eq!(parts[0].last, StreamId { ms: 6, seq: 0 });
        assert_eq!(args, 7 + 5);
        let cmd = copy_command("sha", ["r", "i", "c"], &parts, &out, args);
        let mut expected = Vec::new();
        encode(
            &mut expected,
            &[
                b"EVALSHA",
                b"sha",
                b"3",
                b"r",
                b"i",
                b"c",
                b"1",
                b"tandem:events",
                b"6-0",
                b"tandem:events",
                b"5-1",
                b"4",
                b"type",
                b"T",
                b"event",
                b"{}",
                b"tandem:events",
                b"6-0",
                b"2",
                b"a",
                b"",
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&cmd),
            String::from_utf8_lossy(&expected)
        );
    }

    #[test]
    fn null_reply_is_an_empty_batch() {
        let mut out = Vec::new();
        assert!(xread_to_entries(b"*-1\r\n", &mut out).unwrap().0.is_empty());
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_or_huge_replies_are_errors_not_waits() {
        // A declared length past the bound: refused before a byte of it is buffered.
        assert!(frame_end(b"$99999999999\r\n", 0).is_err());
        assert!(frame_end(b"*9223372036854775807\r\n", 0).is_err());
        assert!(frame_end(b"%4611686018427387904\r\n", 0).is_err());
        // A length line that never ends.
        assert!(frame_end(&[b'$'; 64], 0).is_err());
        assert!(
            frame_end(b"$12", 0).unwrap().is_none(),
            "short: wait for more"
        );
        // Nesting past the bound (a stack overflow otherwise).
        let deep = b"*1\r\n".repeat(100_000);
        assert!(frame_end(&deep, 0).is_err());
        let fine = b"*1\r\n".repeat(MAX_DEPTH);
        assert_eq!(
            frame_end(&[fine, b":1\r\n".to_vec()].concat(), 0).unwrap(),
            Some(MAX_DEPTH * 4 + 4)
        );
        // Garbage lengths.
        assert!(frame_end(b"$x\r\n", 0).is_err());
        let mut out = Vec::new();
        assert!(xread_to_entries(b"*1\r\n*2\r\n$999999999999\r\n", &mut out).is_err());
    }

    #[test]
    fn outcomes_tell_duplicates_from_failures_and_fencing() {
        let r = b"*3\r\n:1\r\n:0\r\n$11\r\nWRONGTYPE x\r\n";
        let o = copy_outcomes(r, 3).unwrap().unwrap();
        assert_eq!(o[0], AddOutcome::Added);
        assert_eq!(o[1], AddOutcome::AlreadyThere);
        assert_eq!(o[2], AddOutcome::Failed("WRONGTYPE x".into()));
        let fenced = copy_outcomes(b"-FENCED this region is active\r\n", 3).unwrap();
        assert_eq!(fenced, Err("FENCED this region is active".into()));
        assert!(copy_outcomes(b"*1\r\n:1\r\n", 3).is_err());
    }
}
