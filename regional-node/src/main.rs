use clap::Parser;
use regional_node::{app, config::Config, telemetry};
use std::path::PathBuf;
use std::process::ExitCode;

/// One region's order workflow on Redis Streams (orders, inventory, payments,
/// shipments). Configured by an optional TOML file and NODE_* environment variables
/// (which win); see API.md for the variables.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// glibc's allocator spent about a third of the node's CPU under load (many short-lived
/// JSON and stream-entry buffers across threads); mimalloc handles that pattern better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits' EX_USAGE / EX_CONFIG: bad configuration.
const EX_CONFIG: u8 = 78;
const EX_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regional-node: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let app = match app::Application::build(config).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match app.run(app::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
