//! The regional node binary: telemetry, configuration, build, run until SIGTERM or Ctrl-C.

use clap::Parser;
use regional_node::{app, config::Config};
use std::path::PathBuf;
use std::process::ExitCode;
use telemetry::exit::{failed_start, StartFailure};

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

fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = match telemetry::init("regional-node", env!("CARGO_PKG_VERSION")) {
        Ok(t) => t,
        Err(e) => return failed_start(StartFailure::BadConfiguration, &e),
    };
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return failed_start(StartFailure::BadConfiguration, &e),
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let status = runtime.block_on(async {
        let app = match app::Application::build(config).await {
            Ok(a) => a,
            Err(e) => return failed_start(e.failure(), &e),
        };
        match app.run(app::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    });
    drop(runtime);
    telemetry.shutdown();
    status
}
