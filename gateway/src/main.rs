//! The gateway binary: telemetry, configuration, build, run until SIGTERM or Ctrl-C.

use clap::Parser;
use gateway::config::Config;
use gateway::Application;
use std::path::PathBuf;
use std::process::ExitCode;

/// Tandem's global gateway. Configuration: `--config FILE` (TOML), then `GATEWAY_*`
/// environment variables, which win (see API.md).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; keys as the variables without the GATEWAY_ prefix,
    /// lowercase (e.g. `health_interval_ms = 200`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // Worker 0 and the control tasks; the other workers start their own runtimes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("gateway: {e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        app.run_until_stopped(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json") {
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
    tracing::info!("shutdown signal received");
}
