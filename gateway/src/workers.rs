//! How client connections are spread over the worker threads.
//!
//! Every worker has its own `SO_REUSEPORT` listener, and the kernel picks the listener
//! for a new connection by a hash of its addresses. That spreads many short connections
//! well and a few long ones badly: the handful of kept-alive connections a load
//! balancer opens can all hash to one worker and leave the other cores idle (in one
//! benchmark run of 16 connections, one worker did 78% of the work). So a worker that
//! accepts a connection while it serves more than the least busy worker hands the
//! connection to that worker, and no worker serves more than one connection more than
//! another (connections that close aside). The cost is per connection, never per
//! request: a message on a channel, and the socket moved from one worker's poller to
//! the other's.

use crate::metrics::Metrics;
use prometheus::IntGauge;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A stopped worker's count, so that nobody picks it.
const RETIRED: usize = usize::MAX / 2;

/// The workers' connection counts, and the way to hand a connection to each.
pub struct Workers {
    open: Box<[AtomicUsize]>,
    gauges: Box<[IntGauge]>,
    inboxes: Box<[mpsc::UnboundedSender<HandedOver>]>,
}

/// A connection on its way to another worker.
struct HandedOver {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    seat: Seat,
}

/// One worker's end: its place among the workers and the connections handed to it.
/// Dropped when the worker stops (or never started): from then on nobody picks it.
pub struct Worker {
    index: usize,
    workers: Arc<Workers>,
    inbox: mpsc::UnboundedReceiver<HandedOver>,
}

/// A connection counted against the worker that serves it, until dropped.
pub struct Seat {
    workers: Arc<Workers>,
    index: usize,
}

impl Workers {
    /// `n` workers (at least one): each one's end, to be moved to its thread.
    pub fn ends(n: usize, metrics: &Metrics) -> Vec<Worker> {
        let n = n.max(1);
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let workers = Arc::new(Workers {
            open: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            gauges: (0..n)
                .map(|i| {
                    metrics
                        .worker_connections
                        .with_label_values(&[&i.to_string()])
                })
                .collect(),
            inboxes: inboxes.into(),
        });
        receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Worker {
                index,
                workers: workers.clone(),
                inbox,
            })
            .collect()
    }

    fn seat(self: &Arc<Self>, index: usize) -> Seat {
        self.open[index].fetch_add(1, Ordering::Relaxed);
        self.gauges[index].inc();
        Seat {
            workers: self.clone(),
            index,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.workers.open[self.index].fetch_sub(1, Ordering::Relaxed);
        self.workers.gauges[self.index].dec();
    }
}

impl Worker {
    /// Where a connection this worker accepted is served: here (the stream comes back,
    /// with its seat), or, when this worker serves more than another, by the least
    /// busy one (`None`).
    pub fn place(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, Seat)> {
        let workers = &self.workers;
        let mine = workers.open[self.index].load(Ordering::Relaxed);
        let (least, fewest) = workers
            .open
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((self.index, mine));
        if least == self.index || mine <= fewest {
            return Some((stream, workers.seat(self.index)));
        }
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand a connection to another worker");
                return None;
            }
        };
        let seat = workers.seat(least);
        match workers.inboxes[least].send(HandedOver { stream, peer, seat }) {
            Ok(()) => None,
            // That worker stopped in between (shutdown): serve the connection here.
            Err(mpsc::error::SendError(back)) => {
                drop(back.seat);
                let seat = workers.seat(self.index);
                match TcpStream::from_std(back.stream) {
                    Ok(stream) => Some((stream, seat)),
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot take a connection back");
                        None
                    }
                }
            }
        }
    }

    /// The next connection another worker handed to this one. The senders live as
    /// long as any worker or seat does, so the inbox ends only when this worker drops.
    pub async fn handed_over(&mut self) -> (TcpStream, SocketAddr, Seat) {
        loop {
            let Some(h) = self.inbox.recv().await else {
                std::future::pending::<()>().await;
                unreachable!();
            };
            match TcpStream::from_std(h.stream) {
                Ok(stream) => return (stream, h.peer, h.seat),
                Err(e) => {
                    tracing::warn!(peer = %h.peer, error = %e, "cannot take a handed-over connection")
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.workers.open[self.index].store(RETIRED, Ordering::Relaxed);
        // Connections handed over but not taken yet close with the inbox.
        self.inbox.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// One connection accepted on `listener` (its client end kept open in `keep`).
    async fn accepted(
        listener: &TcpListener,
        keep: &mut Vec<TcpStream>,
    ) -> (TcpStream, SocketAddr) {
        let addr = listener.local_addr().unwrap();
        keep.push(TcpStream::connect(addr).await.unwrap());
        listener.accept().await.unwrap()
    }

    #[tokio::test]
    async fn a_busier_worker_hands_new_connections_to_the_least_busy_one() {
        let metrics = Metrics::new(&[]);
        let mut ends = Workers::ends(2, &metrics);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut clients = Vec::new();
        let mut served = Vec::new();
        // Every connection reaches worker 0, as when the kernel's hash is lopsided.
        for _ in 0..6 {
            let (stream, peer) = accepted(&listener, &mut clients).await;
            if let Some(here) = ends[0].place(stream, peer) {
                served.push(here);
            }
        }
        let count = |i: usize| {
            metrics
                .worker_connections
                .with_label_values(&[&i.to_string()])
                .get()
        };
        assert_eq!((count(0), count(1)), (3, 3), "spread 3 and 3");
        let mut taken = Vec::new();
        for _ in 0..3 {
            taken.push(ends[1].handed_over().await);
        }
        // A closed connection frees its seat.
        served.clear();
        assert_eq!((count(0), count(1)), (0, 3));
        // A worker that stopped gets nothing more.
        ends.truncate(1);
        taken.clear();
        for _ in 0..4 {
            let (stream, peer) = accepted(&listener, &mut clients).await;
            served.push(ends[0].place(stream, peer).expect("served here"));
        }
        assert_eq!(count(0), 4);
    }
}
