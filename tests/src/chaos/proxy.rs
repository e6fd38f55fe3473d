//! Link proxies: every link a fault may cut goes through one of these small TCP
//! proxies, which the tool owns.
//!
//! A cut is a **blackhole**, as a network partition looks from either end: nothing is
//! forwarded in either direction, no socket is closed and nothing is reset, so each
//! side only sees its requests go unanswered until its own timeouts fire. A connection
//! opened during the cut is accepted (the kernel completes the handshake of a listening
//! socket; a userspace proxy cannot refuse the SYN without a reset) but not connected
//! upstream until the heal.
//!
//! The heal **resumes forwarding**, including the bytes held during the cut, in order.
//! That is what a real partition's end looks like for partitions shorter than TCP's
//! retransmission limit (minutes): the kernel retransmits what was sent, so a request
//! written during the partition does arrive afterwards, late, and a connection one side
//! gave up on is closed then (its FIN crosses once forwarding resumes). Closing every
//! connection at the heal instead would hide exactly the hazard worth testing: a write
//! that a timed-out client believes failed landing after the partition.
//!
//! A **drop** ([`LinkProxy::drop_all`]) is the other half-open shape: bytes are read
//! and thrown away in both directions, sockets stay open, nothing is reset. That is a
//! connection whose state one end lost (its host or a middlebox on the path restarted,
//! the RST got lost) or one the kernel gave up retransmitting on: after the heal the
//! old connection carries bytes again, but requests and replies sent during the drop
//! are gone for good, so a client matching replies to requests in order (a pipelined
//! Redis connection) stays out of step until it dials anew.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy on a free loopback port to `127.0.0.1:<target_port>`.
pub struct LinkProxy {
    name: String,
    port: u16,
    cut: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    pub async fn start(name: &str, target_port: u16) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (tx, _) = watch::channel(Mode::Open);
        let cut = Arc::new(tx);
        let accept_cut = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                tokio::spawn(serve(client, target_port, accept_cut.subscribe()));
            }
        });
        Ok(LinkProxy {
            name: name.to_string(),
            port,
            cut,
            task,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding (blackhole), holding the bytes for the heal.
    pub fn cut(&self) {
        self.cut.send_replace(Mode::Hold);
    }

    /// Stops forwarding and throws away every byte either side sends meanwhile, with
    /// the sockets kept open (see the module doc).
    pub fn drop_all(&self) {
        self.cut.send_replace(Mode::Drop);
    }

    /// Resumes forwarding, held bytes first.
    pub fn heal(&self) {
        self.cut.send_replace(Mode::Open);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow() != Mode::Open
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the link does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    /// Cut: nothing is read, so bytes wait in the socket buffers for the heal.
    Hold,
    /// Cut: everything read is thrown away.
    Drop,
}

fn open(m: &Mode) -> bool {
    *m == Mode::Open
}

async fn serve(mut client: TcpStream, target_port: u16, mut cut: watch::Receiver<Mode>) {
    // During a cut the upstream connection is not even attempted; during a drop what
    // the client sends meanwhile is lost.
    let mut scratch = vec![0u8; 32 * 1024];
    loop {
        let mode = *cut.borrow_and_update();
        match mode {
            Mode::Open => break,
            Mode::Hold => {
                if cut.changed().await.is_err() {
                    return;
                }
            }
            Mode::Drop => {
                tokio::select! {
                    r = client.read(&mut scratch) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    changed = cut.changed() => if changed.is_err() { return },
                }
            }
        }
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)).await else {
        // The target is down: the client sees its connection closed, as when the
        // target's host answers with a reset.
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let back = tokio::spawn(pump(ur, cw, cut.clone()));
    pump(cr, uw, cut).await;
    let _ = back.await;
}

/// Moves bytes from `from` to `to` while the link is not cut. While it is cut nothing
/// is read, so the sender's writes fill the socket buffers and stall, as they would
/// against a partition.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut cut: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if cut.wait_for(|m| *m != Mode::Hold).await.is_err() {
            return;
        }
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            // Cut while waiting for bytes: stop reading (a read is cancel-safe).
            _ = cut.wait_for(|m| *m == Mode::Hold) => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                // Pass the close on once the link carries it.
                if cut.wait_for(open).await.is_ok() {
                    let _ = to.shutdown().await;
                }
                return;
            }
            Ok(n) => n,
        };
        match *cut.borrow() {
            Mode::Drop => continue,
            Mode::Open | Mode::Hold => {}
        }
        if cut.wait_for(|m| *m != Mode::Hold).await.is_err() {
            return;
        }
        if *cut.borrow() == Mode::Drop {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_cut_holds_bytes_without_closing_and_the_heal_delivers_them() {
        let proxy = LinkProxy::start("t", echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        s.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one");

        proxy.cut();
        s.write_all(b"two").await.unwrap();
        // Nothing comes back while cut, and the connection is not closed either.
        let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(r.is_err(), "a blackholed link answered: {r:?}");

        proxy.heal();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("held bytes delivered after the heal")
            .unwrap();
        assert_eq!(&buf, b"two");
    }

    #[tokio::test]
    async fn a_connection_opened_during_a_cut_reaches_the_target_only_after_the_heal() {
        let proxy = LinkProxy::start("t", echo_server().await).await.unwrap();
        proxy.cut();
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        s.write_all(b"hey").await.unwrap();
        let mut buf = [0u8; 3];
        let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(r.is_err(), "answered through a cut link: {r:?}");
        proxy.heal();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("answered after the heal")
            .unwrap();
        assert_eq!(&buf, b"hey");
    }

    #[tokio::test]
    async fn a_drop_loses_bytes_without_closing_and_the_heal_carries_new_ones() {
        let proxy = LinkProxy::start("t", echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        proxy.drop_all();
        s.write_all(b"old").await.unwrap();
        let mut buf = [0u8; 3];
        let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(r.is_err(), "a dropping link answered: {r:?}");

        proxy.heal();
        s.write_all(b"new").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("answered after the heal")
            .unwrap();
        assert_eq!(&buf, b"new", "bytes sent during the drop were delivered");
    }
}
