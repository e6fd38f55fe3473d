//! The gateway binary: telemetry, configuration, build, run until SIGTERM or Ctrl-C.

use clap::Parser;
use gateway::config::Config;
use gateway::Application;
use std::path::PathBuf;
use std::process::ExitCode;
use telemetry::exit::{failed_start, StartFailure};

/// glibc's malloc and free were 7% of the gateway's CPU proxying a product read (perf,
/// `bench/gateway.sh`): every request allocates its header maps, buffers and futures
/// and frees them soon after. mimalloc's per-thread free lists suit that pattern, and
/// each worker thread allocates and frees on its own.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = match telemetry::init("gateway", env!("CARGO_PKG_VERSION")) {
        Ok(t) => t,
        Err(e) => return failed_start(StartFailure::BadConfiguration, &e),
    };
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return failed_start(StartFailure::BadConfiguration, &e),
    };
    // Thread per core (the default): this runtime is worker 0 and runs the control
    // tasks; the other workers start their own. `GATEWAY_BENCH_RUNTIME=work-stealing`
    // runs everything on one work-stealing runtime of `workers` threads instead, to
    // measure one shape against the other.
    let runtime = match std::env::var("GATEWAY_BENCH_RUNTIME").as_deref() {
        Ok("work-stealing") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .enable_all()
            .build(),
        Ok("thread-per-core") | Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Ok(other) => {
            let e = std::io::Error::other(format!(
                "GATEWAY_BENCH_RUNTIME={other}: expected thread-per-core or work-stealing"
            ));
            return failed_start(StartFailure::BadConfiguration, &e);
        }
    }
    .expect("tokio runtime");
    let status = runtime.block_on(async {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => return failed_start(e.failure(), &e),
        };
        app.run_until_stopped(shutdown_signal()).await;
        ExitCode::SUCCESS
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
    tracing::info!("shutdown signal received");
}
