//! The chaos campaign's Docker backend (`chaos --backend docker`, README "Chaos
//! campaigns"): the compose stack users run, built from the binaries under test, broken
//! with Docker's own faults while the campaign's clients order through the gateway's
//! published port, and judged by the same checker as the process backend's campaigns.
//!
//! Needs a Docker engine: skipped with a message where none answers, a failure in CI
//! (the rule of `system_tests::compose`). Set `TANDEM_TEST_IMAGE_TAG` to keep the
//! images apart from another worktree's on the same engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use system_tests::chaos::backend::Backend;
use system_tests::chaos::campaign::{self, Settings};
use system_tests::chaos::docker::{DockerBackend, DockerOptions};
use system_tests::chaos::schedule::{Capabilities, FaultKind, Schedule, Target};
use system_tests::chaos::{report, Durability};
use system_tests::compose::{build_images, docker_or_skip, image_tag};

/// Seed 93, six faults (`chaos --plan --backend docker --faults 6 --seed 93`): the
/// gateway restarted; region a (active) killed; region b partitioned (by then the
/// active one); node a paused, then killed; the gateway restarted again. Every kind of
/// Docker fault but the cut between the regions, and at least one failover the gateway
/// must carry out by itself.
const SEED: u64 = 93;
const FAULTS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_docker_campaign_breaks_containers_and_finds_no_violation() {
    if !docker_or_skip("a_short_docker_campaign_breaks_containers_and_finds_no_violation") {
        return;
    }
    let plan = Schedule::generate(SEED, FAULTS, Capabilities::DOCKER);
    let kinds: Vec<FaultKind> = plan.faults.iter().map(|f| f.kind).collect();
    assert!(
        kinds.contains(&FaultKind::Kill(Target::Region(
            system_tests::chaos::schedule::Region::A
        ))) && kinds.contains(&FaultKind::RestartGateway)
            && kinds.iter().any(|k| matches!(k, FaultKind::Partition(_)))
            && kinds.iter().any(|k| matches!(k, FaultKind::Pause(_))),
        "the plan of seed {SEED} changed; pick a seed with a region kill, a partition, a \
         pause and a gateway restart:\n{}",
        plan.render()
    );

    // Given the compose stack, from images of the binaries under test
    build_images();
    let mut backend = DockerBackend::start(DockerOptions {
        durability: Durability::Async,
        image_tag: image_tag(),
        build_images: false,
    })
    .await
    .unwrap_or_else(|e| panic!("the Docker backend did not start: {e}"));
    let failovers = FailoverWatch::start(backend.endpoints().gateway.clone());

    // When the campaign runs its plan against it
    let report = campaign::run(
        &mut backend,
        Settings {
            seed: SEED,
            faults: FAULTS,
            durability: Durability::Async,
            clients: 4,
            rate: 20.0,
            cancel_percent: 15,
            settle_timeout: Duration::from_secs(120),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("the campaign could not run: {e}"));
    let unplanned = failovers.stop().await;
    let text = report::render(&report);
    println!("{text}");
    let actions = backend.actions().join("\n");
    println!("docker commands of the faults:\n{actions}");

    // Then the checker finds nothing
    assert_eq!(
        text.lines().last(),
        Some(format!("{FAULTS} faults, 0 violations").as_str()),
        "the docker campaign of seed {SEED} found violations:\n{text}"
    );
    // And every fault was really carried out, by Docker
    assert!(
        text.contains(&format!(
            "injected: {FAULTS} of {FAULTS} faults (0 not injected, 0 heals failed)"
        )),
        "{text}"
    );
    for command in [
        "docker kill redis-a node-a replicator-a",
        "docker start node-a replicator-a",
        "docker restart -t 10 gateway",
        "docker pause node-a",
        "docker unpause node-a",
        "docker network disconnect wan redis-b node-b replicator-b",
        "docker network connect wan redis-b node-b replicator-b",
    ] {
        assert!(
            actions.contains(command),
            "`{command}` was never run:\n{actions}"
        );
    }
    // And the gateway failed over by itself (not a planned switchover): region a,
    // active, was killed for seconds. (Region b's partition is planned for 1.4 s, about
    // the gateway's lease, so whether it fails over too is up to timing.)
    assert!(
        unplanned >= 1.0,
        "tandem_gateway_failovers_total{{reason=\"unhealthy\"}} moved by {unplanned}\n{text}"
    );
    eprintln!("[chaos-docker] the gateway failed over {unplanned} times by itself");
}

/// Samples the gateway's `tandem_gateway_failovers_total{reason="unhealthy"}` through
/// its published port while the campaign runs. The counter lives in the gateway's
/// memory and a restarted gateway starts it at 0 again, so the watch adds up what each
/// gateway's life counted. A new life shows as `tandem_gateway_requests_total` going
/// down: the old one had served thousands of requests, a new one cannot have caught up
/// within a sample's period.
struct FailoverWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Lives>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Lives {
    /// The first sample: failovers before the campaign (a gateway that flapped while
    /// the stack came up on a busy host) are not the faults'.
    baseline: Option<f64>,
    /// Unplanned failovers counted by the gateway's earlier lives.
    earlier: f64,
    /// The current life's last samples: unplanned failovers and requests served.
    failovers: f64,
    requests: f64,
    restarts_seen: u32,
}

impl FailoverWatch {
    fn start(gateway: String) -> FailoverWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Lives::default()));
        let (s, l) = (stop.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("http client");
            while !s.load(Ordering::Relaxed) {
                if let Ok(r) = http.get(format!("{gateway}/metrics")).send().await {
                    if let Ok(text) = r.text().await {
                        let sum = |metric: &str, labels: &[(&str, &str)]| {
                            system_tests::api::metric_sum(&text, metric, labels).unwrap_or(0.0)
                        };
                        let failovers =
                            sum("tandem_gateway_failovers_total", &[("reason", "unhealthy")]);
                        let requests = sum("tandem_gateway_requests_total", &[]);
                        let mut l = l.lock().unwrap();
                        l.baseline.get_or_insert(failovers);
                        if requests < l.requests || failovers < l.failovers {
                            l.earlier += l.failovers;
                            l.restarts_seen += 1;
                        }
                        l.failovers = failovers;
                        l.requests = requests;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        FailoverWatch { stop, seen, task }
    }

    /// Unplanned failovers over every life of the gateway since the watch started.
    async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let l = self.seen.lock().unwrap();
        eprintln!(
            "[chaos-docker] failover watch: {} gateway restarts seen, {l:?}",
            l.restarts_seen
        );
        l.earlier + l.failovers - l.baseline.unwrap_or(0.0)
    }
}

/// The binary plans for the backend it is given: the Docker plan of a seed has
/// partitions and gateway restarts and never a cut of the gateway's link to one region
/// (which the compose networks cannot cut alone), and the process plan stays as it was.
#[test]
fn the_docker_plan_differs_from_the_process_plan_only_in_the_docker_kinds() {
    let plan = |backend: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chaos"))
            .args(["--plan", "--faults", "200", "--seed", "7"])
            .args(["--backend", backend])
            .output()
            .expect("run chaos --plan");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let docker = plan("docker");
    assert!(docker.contains("partition region a"), "{docker}");
    assert!(docker.contains("restart gateway"), "{docker}");
    assert!(docker.contains("cut link a<->b"), "{docker}");
    assert!(!docker.contains("cut link gateway->"), "{docker}");
    let process = plan("process");
    assert!(!process.contains("partition region"), "{process}");
    assert!(!process.contains("restart gateway"), "{process}");
    assert!(process.contains("cut link gateway->"), "{process}");
}
