//! Free loopback ports for the processes a test starts.
//!
//! The OS hands out an unused port when we bind port 0; we release it at once and give
//! the number to a child process. Between release and the child's bind another process
//! could take it, so the spawners retry on a bind failure. Within this test binary we
//! also never hand out the same port twice, which removes the race between tests that
//! run in parallel threads.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Redis's default port: a developer's own Redis may live there, so it is never used.
const REDIS_DEFAULT_PORT: u16 = 6379;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that is free right now and was not handed out before.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        if port == REDIS_DEFAULT_PORT {
            continue;
        }
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("could not find a free loopback port in 200 attempts");
}
