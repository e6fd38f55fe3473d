//! `chaos`: a seeded fault campaign against the whole two-region system, judged by an
//! invariant checker (README "Chaos campaigns"). Exit status 0 when no invariant is
//! violated, 1 when one is (with the seed and schedule to reproduce it), 2 when the
//! campaign could not run at all.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use system_tests::chaos::backend::{Attached, Endpoints};
use system_tests::chaos::campaign::{self, Settings};
use system_tests::chaos::docker::{DockerBackend, DockerOptions};
use system_tests::chaos::process::ProcessBackend;
use system_tests::chaos::report;
use system_tests::chaos::schedule::{Capabilities, Schedule};
use system_tests::chaos::Durability;

/// Seeded fault campaign: careful clients, a nemesis (kills, pauses, blackholed links,
/// restarts, switchovers), a heal, a settle, and a checker of seven invariants. Runs the
/// system as local processes (default) or as the compose stack (--backend docker), or
/// attaches to one someone else runs (--attach).
#[derive(Debug, Parser)]
#[command(name = "chaos", version)]
struct Args {
    /// How many faults to inject.
    #[arg(long)]
    faults: usize,
    /// Seed of the fault plan and the clients' choices (random when left out; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// The nodes' NODE_DURABILITY.
    #[arg(long, value_enum, default_value = "async")]
    durability: Durability,
    /// Print the fault plan for the seed and exit without running anything.
    #[arg(long)]
    plan: bool,
    /// Concurrent order clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Orders per second, all clients together.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Share of acknowledged orders cancelled at once, in percent.
    #[arg(long, default_value_t = 15)]
    cancel_percent: u64,
    /// Longest wait, in seconds, for the system to settle after the final heal.
    #[arg(long, default_value_t = 120)]
    settle_timeout: u64,
    /// Directory of the regional-node, replicator and gateway binaries (default: next to
    /// this binary when they are there, else target/debug or $TANDEM_BIN_DIR). With
    /// --backend docker, what --build-images puts in the images.
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    /// What runs the system and takes the faults.
    #[arg(long, value_enum, default_value = "process")]
    backend: BackendKind,
    /// Docker backend: tag of the tandem-* images to run (deploy/build-images.sh
    /// builds `local` by default).
    #[arg(long, env = "TANDEM_IMAGE_TAG", default_value = "local")]
    image_tag: String,
    /// Docker backend: build the images first (deploy/build-images.sh --bin-dir
    /// <bin dir> --tag <image tag>), from the binaries next to this one (see --bin-dir).
    #[arg(long)]
    build_images: bool,

    /// Run against a system someone else started instead of starting one. Its processes
    /// and links are not the tool's, so only planned switchovers are injected (with
    /// --gateway-admin-token; without it, none): say --faults for how many.
    #[arg(
        long,
        requires_all = ["gateway", "node_a", "node_b", "redis_a", "redis_b"],
        conflicts_with = "backend"
    )]
    attach: bool,
    /// Attach: the gateway's URL.
    #[arg(long)]
    gateway: Option<String>,
    /// Attach: the gateway's admin token (for POST /gateway/failover).
    #[arg(long)]
    gateway_admin_token: Option<String>,
    /// Attach: region a's node URL.
    #[arg(long)]
    node_a: Option<String>,
    /// Attach: region b's node URL.
    #[arg(long)]
    node_b: Option<String>,
    /// Attach: the nodes' admin token.
    #[arg(long)]
    node_admin_token: Option<String>,
    /// Attach: region a's Redis URL.
    #[arg(long)]
    redis_a: Option<String>,
    /// Attach: region b's Redis URL.
    #[arg(long)]
    redis_b: Option<String>,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Local processes on free ports, every cuttable link through the tool's own TCP
    /// proxies: SIGKILL, SIGSTOP, blackholed links, restarts.
    Process,
    /// The compose stack (docker-compose.yml, the images of deploy/build-images.sh) as a
    /// private project, removed at the end: docker kill and start, docker pause, docker
    /// network disconnect of a region or of both Redis servers, docker restart of the
    /// gateway. Needs a Docker engine and docker-compose (1.29) or Compose v2.
    Docker,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(random_seed);
    let caps = if args.attach {
        Capabilities::attached(args.gateway_admin_token.is_some())
    } else {
        match args.backend {
            BackendKind::Process => Capabilities::PROCESS,
            BackendKind::Docker => Capabilities::DOCKER,
        }
    };
    let schedule = Schedule::generate(seed, args.faults, caps);
    if args.plan {
        print!(
            "fault plan of seed {seed} ({} faults):\n{}",
            schedule.faults.len(),
            schedule.render()
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "[chaos] seed {seed}, {} faults, durability {}",
        args.faults,
        args.durability.as_str()
    );
    if args.attach {
        eprintln!(
            "[chaos] attach mode: the processes and links are not the tool's, so no kill, pause, \
             cut or restart is injected; {}",
            if caps.switchover {
                "only planned switchovers (gateway admin API) run"
            } else {
                "without --gateway-admin-token not even a switchover: the campaign only checks"
            }
        );
    }
    if let Some(dir) = bin_dir(&args) {
        // The harness finds the binaries through this variable.
        std::env::set_var("TANDEM_BIN_DIR", dir);
    }
    let settings = Settings {
        seed,
        faults: schedule.faults.len(),
        durability: args.durability,
        clients: args.clients.max(1),
        rate: args.rate,
        cancel_percent: args.cancel_percent.min(100),
        settle_timeout: Duration::from_secs(args.settle_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        if args.attach {
            let mut backend = Attached {
                endpoints: Endpoints {
                    gateway: args.gateway.clone().expect("clap requires it"),
                    gateway_admin_token: args.gateway_admin_token.clone(),
                    nodes: [
                        args.node_a.clone().expect("clap requires it"),
                        args.node_b.clone().expect("clap requires it"),
                    ],
                    node_admin_token: args.node_admin_token.clone(),
                    redis: [
                        args.redis_a.clone().expect("clap requires it"),
                        args.redis_b.clone().expect("clap requires it"),
                    ],
                },
            };
            campaign::run(&mut backend, settings).await
        } else if args.backend == BackendKind::Docker {
            let mut backend = DockerBackend::start(DockerOptions {
                durability: args.durability,
                image_tag: args.image_tag.clone(),
                build_images: args.build_images,
            })
            .await?;
            // Interrupted, the backend is dropped here, which removes the compose
            // project (containers, networks, volumes) rather than leaving it running.
            tokio::select! {
                report = campaign::run(&mut backend, settings) => report,
                _ = tokio::signal::ctrl_c() => {
                    Err("interrupted; the compose project is removed".to_string())
                }
            }
        } else {
            let mut backend = ProcessBackend::start(args.durability).await?;
            campaign::run(&mut backend, settings).await
        }
    });
    match result {
        Ok(report) => {
            println!("{}", report::render(&report));
            if report.verdict.violations() > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("chaos: the campaign could not run: {e}");
            ExitCode::from(2)
        }
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// `--bin-dir`, or this binary's directory when the workspace binaries are next to it
/// (`target/release/chaos` runs the release binaries).
fn bin_dir(args: &Args) -> Option<PathBuf> {
    if let Some(dir) = &args.bin_dir {
        return Some(dir.clone());
    }
    if std::env::var_os("TANDEM_BIN_DIR").is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    dir.join("regional-node")
        .is_file()
        .then(|| dir.to_path_buf())
}
