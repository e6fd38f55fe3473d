//! The replicator binary: telemetry, configuration, build, run until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use clap::Parser;
use replicator::{Application, Config};
use std::path::PathBuf;
use std::process::ExitCode;
use telemetry::exit::{failed_start, StartFailure};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match telemetry::init("replicator", env!("CARGO_PKG_VERSION")) {
        Ok(t) => t,
        Err(e) => return failed_start(StartFailure::BadConfiguration, &e),
    };
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return failed_start(StartFailure::BadConfiguration, &e),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let status = runtime.block_on(async {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => return failed_start(e.failure(), &e),
        };
        match app.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "replicator failed");
                ExitCode::FAILURE
            }
        }
    });
    drop(runtime);
    telemetry.shutdown();
    status
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
