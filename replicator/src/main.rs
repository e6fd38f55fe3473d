//! The replicator binary: telemetry, configuration, build, run until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use clap::Parser;
use replicator::{Application, Config};
use std::path::PathBuf;
use std::process::ExitCode;

/// Pulls the active peer region's streams and consumer groups into the local region's
/// Redis. Configuration: an optional TOML file, then REPLICATOR_* environment variables
/// (REPLICATOR_LOCAL_REGION, REPLICATOR_LOCAL_REDIS_URL, REPLICATOR_PEER_REGION,
/// REPLICATOR_PEER_REDIS_URL, REPLICATOR_LISTEN [127.0.0.1:9101], REPLICATOR_BATCH_SIZE
/// [500], REPLICATOR_BLOCK_MS [100], REPLICATOR_POLL_INTERVAL_MS [100],
/// REPLICATOR_GROUP_INTERVAL_MS [10], ...), which win.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML file with the same keys in lowercase (local_region = "b", ...).
    #[arg(long, value_name = "FILE", env = "REPLICATOR_CONFIG")]
    config: Option<PathBuf>,
}

/// `EX_USAGE` from sysexits.h: the configuration is wrong, retrying will not help.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_telemetry();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("replicator: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("replicator: {e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        match app.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "replicator failed");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_telemetry() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
