//! Which Redis errors mean "the server cannot serve us right now" rather than "the
//! command is wrong": the node answers those 503 (retry) and the replicator counts the
//! side as unreachable, instead of reporting a bug.

use redis::RedisError;

/// Server error codes that a healthy server sends while it cannot serve yet: loading
/// its AOF after a restart (`LOADING`), a replica without its master (`MASTERDOWN`),
/// a slot in migration (`TRYAGAIN`), a script still running (`BUSY`).
const TRANSIENT_CODES: [&str; 4] = ["LOADING", "MASTERDOWN", "TRYAGAIN", "BUSY"];

/// True when `e` says the server is away or not ready: worth retrying soon.
pub fn is_unavailable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(line: &str) -> RedisError {
        let v = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        match v {
            redis::Value::ServerError(e) => RedisError::from(e),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn a_loading_server_is_unavailable_a_wrong_command_is_not() {
        assert!(is_unavailable(&server_error(
            "LOADING Redis is loading the dataset in memory"
        )));
        assert!(is_unavailable(&server_error(
            "MASTERDOWN Link with MASTER is down"
        )));
        assert!(is_unavailable(&server_error(
            "BUSY Redis is busy running a script"
        )));
        assert!(!is_unavailable(&server_error(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        )));
        assert!(!is_unavailable(&server_error("ERR unknown command")));
    }
}
