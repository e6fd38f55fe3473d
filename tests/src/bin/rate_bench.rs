//! Constant-rate HTTP load generator (not a test): sends GET requests at a fixed rate
//! over kept-alive HTTP/1.1 connections, plain or TLS, and reports latency percentiles
//! measured from each request's *intended* send time.
//!
//! Why not wrk: wrk is closed-loop (a connection sends its next request only when the
//! previous answer arrived), so a stall delays the requests that would have measured it
//! and the percentiles hide it ("coordinated omission"). Here request `i` is due at
//! `start + i / rate` whatever happened before; a connection that falls behind sends its
//! due requests at once and each one's latency includes the time it waited. wrk2 does
//! this too but Debian does not package it.
//!
//! Shape: `--conns` threads, each with one connection and blocking I/O, thread `k` takes
//! requests `k, k + conns, k + 2 conns, ...` (so each connection runs at rate/conns).
//! Blocking threads sleep in the kernel until a request is due: no busy waiting that
//! would take CPU from the servers measured on the same machine, and no async timer
//! wheel whose 1 ms granularity would show in sub-millisecond latencies.
//!
//! Usage: rate_bench --url http://127.0.0.1:8080/health/live --rate 5000 --seconds 5
//!        [--conns 16] [--warmup 1] [--ca ca.pem]
//! Prints one JSON object: requests sent, answers by class, percentiles in microseconds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_rustls::rustls;

struct Args {
    scheme_tls: bool,
    host: String,
    port: u16,
    path: String,
    rate: f64,
    seconds: f64,
    warmup: f64,
    conns: usize,
    ca: Option<String>,
}

const USAGE: &str = "usage: rate_bench --url http[s]://HOST:PORT/PATH --rate N [--seconds S] \
                     [--warmup S] [--conns N] [--ca CA.pem]";

fn parse_args() -> Result<Args, String> {
    let mut url = String::new();
    let mut args = Args {
        scheme_tls: false,
        host: String::new(),
        port: 0,
        path: String::new(),
        rate: 0.0,
        seconds: 5.0,
        warmup: 1.0,
        conns: 16,
        ca: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String, name: &str| v.parse::<f64>().map_err(|e| format!("{name}: {e}"));
        match flag.as_str() {
            "--url" => url = value()?,
            "--rate" => args.rate = num(value()?, "--rate")?,
            "--seconds" => args.seconds = num(value()?, "--seconds")?,
            "--warmup" => args.warmup = num(value()?, "--warmup")?,
            "--conns" => {
                args.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?;
            }
            "--ca" => args.ca = Some(value()?),
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("--url must be http:// or https://\n{USAGE}"));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or("--url needs an explicit port")?;
    args.scheme_tls = tls;
    args.host = host.to_string();
    args.port = port.parse().map_err(|e| format!("port: {e}"))?;
    args.path = if path.is_empty() {
        "/".into()
    } else {
        path.into()
    };
    if !(args.rate > 0.0 && args.seconds > 0.0 && args.warmup >= 0.0 && args.conns > 0) {
        return Err(format!(
            "--rate, --seconds and --conns must be positive\n{USAGE}"
        ));
    }
    if tls && args.ca.is_none() {
        return Err("https needs --ca (the CA that signed the server's certificate)".into());
    }
    Ok(args)
}

/// One connection, plain or TLS, with blocking reads and writes.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn open(args: &Args, tls: Option<&Arc<rustls::ClientConfig>>) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect((args.host.as_str(), args.port))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let Some(config) = tls else {
            return Ok(Conn::Plain(tcp));
        };
        let name = rustls_pki_types::ServerName::try_from(args.host.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let session = rustls::ClientConnection::new(config.clone(), name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut stream = rustls::StreamOwned::new(session, tcp);
        // The handshake now, so it is not counted in the first request's latency.
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Conn::Tls(Box::new(stream)))
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.as_mut(),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads one HTTP/1.1 response (Content-Length or chunked body) from `io`, using and
/// keeping leftover bytes in `buf`; gives its status and whether the server closes the
/// connection after it.
fn read_response(io: &mut dyn ReadWrite, buf: &mut Vec<u8>) -> std::io::Result<(u16, bool)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        fill(io, buf)?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| bad("content-length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    buf.drain(..head_end);
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(io, buf)?;
            };
            let size_text = std::str::from_utf8(&buf[..line_end]).map_err(|_| bad("chunk"))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            // The chunk, its CRLF; the last (empty) chunk is followed by a CRLF too.
            let need = line_end + 2 + size + 2;
            while buf.len() < need {
                fill(io, buf)?;
            }
            buf.drain(..need);
            if size == 0 {
                break;
            }
        }
    } else {
        let n = length.unwrap_or(0);
        while buf.len() < n {
            fill(io, buf)?;
        }
        buf.drain(..n);
    }
    Ok((status, close))
}

fn fill(io: &mut dyn ReadWrite, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = io.read(&mut chunk)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One thread's tally.
#[derive(Default)]
struct Tally {
    /// Latencies (microseconds, from the intended send time) of measured requests.
    latencies: Vec<u32>,
    sent: u64,
    ok: u64,
    non2xx: u64,
    errors: u64,
}

fn run_connection(
    args: &Args,
    tls: Option<&Arc<rustls::ClientConfig>>,
    k: usize,
    start: Instant,
) -> Tally {
    let interval_ns = 1e9 / args.rate;
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: rate_bench\r\n\r\n",
        args.path, args.host, args.port
    );
    let mut tally = Tally {
        latencies: Vec::with_capacity((args.rate * args.seconds / args.conns as f64) as usize + 16),
        ..Tally::default()
    };
    let mut conn: Option<Conn> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut i = k as u64;
    loop {
        let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        if due >= end {
            break;
        }
        i += args.conns as u64;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        tally.sent += 1;
        let outcome = exchange(&mut conn, args, tls, &mut buf, request.as_bytes());
        let took = due.elapsed();
        match outcome {
            Ok((status, close)) => {
                if (200..300).contains(&status) {
                    tally.ok += 1;
                } else {
                    tally.non2xx += 1;
                }
                if close {
                    conn = None;
                }
            }
            Err(_) => {
                tally.errors += 1;
                conn = None;
            }
        }
        if due >= measure_from {
            tally
                .latencies
                .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        }
    }
    tally
}

/// Sends one request on `conn` (opening it first if needed) and reads the answer.
fn exchange(
    conn: &mut Option<Conn>,
    args: &Args,
    tls: Option<&Arc<rustls::ClientConfig>>,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> std::io::Result<(u16, bool)> {
    if conn.is_none() {
        *conn = Some(Conn::open(args, tls)?);
        buf.clear();
    }
    let io = conn.as_mut().expect("just opened").stream();
    io.write_all(request)?;
    io.flush()?;
    read_response(io, buf)
}

fn tls_config(ca: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))?
    {
        roots
            .add(cert.map_err(|e| format!("{ca}: {e}"))?)
            .map_err(|e| format!("{ca}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let tls = match args.ca.as_deref() {
        Some(ca) if args.scheme_tls => match tls_config(ca) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::from(2);
            }
        },
        _ => None,
    };
    // Every thread starts on the same clock, a little ahead so all are ready; each
    // opens its connection before its first request is due.
    let start = Instant::now() + Duration::from_millis(200);
    let threads: Vec<_> = (0..args.conns)
        .map(|k| {
            let (args, tls) = (args.clone(), tls.clone());
            std::thread::Builder::new()
                .name(format!("conn-{k}"))
                .stack_size(256 * 1024)
                .spawn(move || run_connection(&args, tls.as_ref(), k, start))
                .expect("spawn connection thread")
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        let t = t.join().expect("connection thread");
        all.sent += t.sent;
        all.ok += t.ok;
        all.non2xx += t.non2xx;
        all.errors += t.errors;
        all.latencies.extend(t.latencies);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies.sort_unstable();
    let l = &all.latencies;
    let mean = if l.is_empty() {
        0.0
    } else {
        l.iter().map(|&v| f64::from(v)).sum::<f64>() / l.len() as f64
    };
    println!(
        "{{\"rate\":{},\"sent\":{},\"ok\":{},\"non2xx\":{},\"errors\":{},\"measured\":{},\
         \"elapsed_s\":{:.3},\"mean_us\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\
         \"p999_us\":{},\"max_us\":{}}}",
        args.rate,
        all.sent,
        all.ok,
        all.non2xx,
        all.errors,
        l.len(),
        elapsed,
        mean,
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        percentile(l, 99.9),
        l.last().copied().unwrap_or(0),
    );
    std::process::ExitCode::SUCCESS
}
