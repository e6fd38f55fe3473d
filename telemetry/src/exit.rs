//! The exit status of a start that failed, one rule for every binary (sysexits.h):
//!
//! - [`USAGE`] (64, `EX_USAGE`): the configuration is wrong: a value, or a file it
//!   names that cannot be read. Retrying will not help; the message names the key.
//! - [`UNAVAILABLE`] (69, `EX_UNAVAILABLE`): the configuration is fine but something it
//!   names is not available now: the listen address is taken or not permitted. A
//!   supervisor may retry.
//!
//! A process that started and then failed exits 1; a clean stop exits 0.

use std::process::ExitCode;

pub const USAGE: u8 = 64;
pub const UNAVAILABLE: u8 = 69;

/// Why a start failed, as far as its exit status is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFailure {
    /// Exits [`USAGE`].
    BadConfiguration,
    /// Exits [`UNAVAILABLE`].
    Unavailable,
}

impl StartFailure {
    pub fn code(self) -> u8 {
        match self {
            StartFailure::BadConfiguration => USAGE,
            StartFailure::Unavailable => UNAVAILABLE,
        }
    }
}

/// Logs why the start failed and returns the exit status for it.
pub fn failed_start(failure: StartFailure, error: &dyn std::error::Error) -> ExitCode {
    tracing::error!(error = %error, exit_status = failure.code(), "cannot start");
    ExitCode::from(failure.code())
}
