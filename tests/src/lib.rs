//! System-test harness: real `redis-server` processes and the real binaries of the
//! workspace on free loopback ports, driven over HTTP. Never a mock, never port 6379.
//!
//! # Layout
//! - [`ports`]: free loopback ports, never handed out twice in one test binary.
//! - [`workdir`]: per-process temp dirs, kept when a test fails.
//! - [`process`]: child processes with log files; locating the workspace binaries.
//! - [`redis_server`]: a private `redis-server` per test, killable and restartable.
//! - [`redis_state`]: dumps and snapshots of a Redis for "nothing written" and
//!   "rebuild equals live" assertions.
//! - [`compose`]: the docker-compose.yml stack, its images and Docker's faults.
//! - [`http`]: a small reqwest client returning status, headers and JSON.
//! - [`raw_http`]: HTTP/1.1 by hand over TCP: oversized and trickled requests.
//! - [`poll`]: waiting by polling with a deadline.
//! - [`node`]: the `regional-node` binary.
//! - [`api`]: the node's HTTP API (orders, products, events, admin) for tests.
//! - [`region`]: a private Redis plus one active node, the usual test fixture.
//! - [`tokens`]: a test identity provider: key pairs, JWKS (file or HTTPS), signed tokens.
//! - [`receiver`]: the HTTP listener behind the OTLP and webhook receivers.
//! - [`otlp`]: an OTLP/HTTP receiver that keeps the spans the binaries export.
//! - [`webhook_receiver`]: a webhook endpoint that records deliveries, checks their
//!   Standard Webhooks signatures and can answer 500 for a while.
//! - [`gateway`]: the gateway binary, two regions in front of it, a blackholing proxy.
//! - [`etcd`]: real etcd members (one, or a cluster of three) for gateways that share
//!   failover control.
//! - [`chaos`]: the seeded fault campaign and its invariant checker (the `chaos` binary).
#![forbid(unsafe_code)]

pub mod api;
pub mod chaos;
pub mod compose;
pub mod etcd;
pub mod gateway;
pub mod http;
pub mod node;
pub mod otlp;
pub mod poll;
pub mod ports;
pub mod process;
pub mod raw_http;
pub mod receiver;
pub mod redis_server;
pub mod redis_state;
pub mod region;
pub mod replicator;
pub mod takeover;
pub mod tokens;
pub mod webhook_receiver;
pub mod workdir;

pub use api::{order_body, Api};
pub use http::{ClientTls, HttpClient, Response};
pub use node::{Node, NodeOptions, TEST_ADMIN_TOKEN};
pub use poll::{eventually, wait_until};
pub use ports::free_port;
pub use redis_server::{RedisOptions, RedisServer, RedisTls};
pub use region::Region;
