//! The deployment files as their tools read them: Prometheus' config and alert rules
//! through `promtool` (with the rules' unit tests), `docker-compose.yml` through every
//! compose tool on the machine, the Grafana dashboard's JSON, and the command line of
//! `scripts/build-release.sh` (the build itself, with PGO, takes minutes and is run by
//! hand and by `bench/gateway.sh`). What they do on a running stack is
//! `compose_stack.rs`'s business.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use serde_yaml_ng::Value as Yaml;
use system_tests::compose::{docker_required, ComposeTool};
use system_tests::process::workspace_root;

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

fn yaml(path: &Path) -> Yaml {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// Runs promtool with `args` in deploy/prometheus; panics with its output on failure.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool not found ({e}): install Debian's `prometheus` package (scripts/test.sh does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn prometheus_configs_and_alert_rules_pass_promtool() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "config", "prometheus-gateways.yml"]);
    promtool(&["check", "config", "local.yml"]);
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_rule_is_tested_firing_and_quiet() {
    let rules = yaml(&deploy("prometheus/alerts.yml"));
    let names: BTreeSet<String> = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    let required = [
        "TandemRegionDown",
        "TandemFailover",
        "TandemReplicationLagHigh",
        "TandemReplicatorPeerUnreachable",
        "TandemDeadLetters",
        "TandemNodeFenced",
        "TandemQuarantineNotEmpty",
        "TandemDurabilityDegraded",
        "TandemConsumerLagHigh",
        "TandemGatewayRejecting",
    ];
    for r in required {
        assert!(names.contains(r), "alerts.yml has no rule {r}");
    }
    // For each rule: (a case where it fires, a case where it stays quiet).
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    let tests = yaml(&deploy("prometheus/alerts_test.yml"));
    for t in tests["tests"].as_sequence().expect("tests") {
        for case in t["alert_rule_test"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
        {
            let name = case["alertname"].as_str().unwrap_or("").to_string();
            let fires = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 = true;
            } else {
                entry.1 = true;
            }
        }
    }
    for name in &names {
        let (fires, quiet) = cases.get(name).copied().unwrap_or_default();
        assert!(fires, "alerts_test.yml never shows {name} firing");
        assert!(quiet, "alerts_test.yml never shows {name} staying quiet");
    }
}

/// `config` of docker-compose.yml with `env`, by `tool`; (success, output).
fn compose_config(tool: &ComposeTool, env: &[(&str, &str)], extra: &[&str]) -> (bool, String) {
    compose_config_with(tool, &[], env, extra)
}

/// The same with compose `files` over docker-compose.yml.
fn compose_config_with(
    tool: &ComposeTool,
    files: &[&str],
    env: &[(&str, &str)],
    extra: &[&str],
) -> (bool, String) {
    let root = workspace_root();
    let empty = std::env::temp_dir().join(format!("tandem-empty-{}.env", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let mut cmd = tool.std_command();
    cmd.current_dir(&root)
        .arg("--env-file")
        .arg(&empty)
        .arg("-f")
        .arg(root.join("docker-compose.yml"));
    for f in files {
        cmd.arg("-f").arg(root.join(f));
    }
    cmd.arg("config").args(extra).stdin(Stdio::null());
    for key in [
        "TANDEM_ADMIN_TOKEN",
        "TANDEM_NODE_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
    ] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the compose tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const TOKENS: &[(&str, &str)] = &[
    ("TANDEM_ADMIN_TOKEN", "t1"),
    ("TANDEM_NODE_TOKEN", "t2"),
    ("GRAFANA_ADMIN_PASSWORD", "t3"),
];

fn compose_tools() -> Vec<ComposeTool> {
    let tools = ComposeTool::installed();
    if tools.is_empty() {
        assert!(
            !docker_required(),
            "no compose tool (Compose v2 or docker-compose) but Docker is required here"
        );
        eprintln!("SKIPPED: no compose tool on this machine");
    }
    tools
}

#[test]
fn compose_file_parses_with_every_compose_tool_and_wants_tokens() {
    for tool in compose_tools() {
        // Given the tokens, every installed tool accepts the file (Debian's 1.29 has no
        // top-level `name:`, for one).
        let (ok, out) = compose_config(&tool, TOKENS, &["-q"]);
        assert!(ok, "{} config -q failed:\n{out}", tool.name());
        // Without them it refuses, and says what to do.
        let (ok, out) = compose_config(&tool, &[], &["-q"]);
        assert!(!ok, "{} accepted the file without tokens", tool.name());
        assert!(out.contains("deploy/init-env.sh"), "{}: {out}", tool.name());
    }
}

#[test]
fn compose_publishes_only_the_gateway_and_monitoring_on_loopback() {
    for tool in compose_tools() {
        // With Grafana's profile on: Compose v2 leaves out the services of a profile
        // that is off.
        let env = [TOKENS, &[("COMPOSE_PROFILES", "grafana")]].concat();
        let (ok, out) = compose_config(&tool, &env, &[]);
        assert!(ok, "{out}");
        let config: Yaml = serde_yaml_ng::from_str(&out).expect("config output is YAML");
        let services = config["services"].as_mapping().expect("services");
        let mut published = BTreeSet::new();
        for (name, service) in services {
            let name = name.as_str().unwrap_or("?").to_string();
            for port in service["ports"].as_sequence().cloned().unwrap_or_default() {
                // 1.29 prints "127.0.0.1:8080:8080/tcp"; v2 a mapping with host_ip.
                let host_ip = match &port {
                    Yaml::String(s) => s.split(':').next().unwrap_or("").to_string(),
                    other => other["host_ip"].as_str().unwrap_or("").to_string(),
                };
                assert_eq!(
                    host_ip, "127.0.0.1",
                    "{name} publishes {port:?} beyond loopback"
                );
                published.insert(name.clone());
            }
            // Hardened: no service keeps Linux capabilities it does not need.
            if name != "grafana" {
                assert_eq!(
                    service["read_only"],
                    Yaml::Bool(true),
                    "{name} not read-only"
                );
                assert!(
                    format!("{:?}", service["cap_drop"]).contains("ALL"),
                    "{name} keeps its capabilities"
                );
            }
        }
        assert_eq!(
            published,
            BTreeSet::from(["gateway".into(), "grafana".into(), "prometheus".into()]),
            "{}",
            tool.name()
        );
        let grafana = &services[&Yaml::String("grafana".into())]["environment"];
        assert_eq!(grafana["GF_AUTH_ANONYMOUS_ENABLED"].as_str(), Some("false"));
    }
}

#[test]
fn dashboard_plots_what_a_drill_needs() {
    let text = std::fs::read_to_string(deploy("grafana/dashboards/tandem.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("tandem.json is JSON");
    fn exprs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
                ("expr", Value::String(e)) => out.push(e.clone()),
                _ => exprs(v, out),
            }),
            Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    for metric in [
        "tandem_replicator_peer_up",
        "tandem_replicator_redis_up",
        "tandem_replicator_state",
        "tandem_node_redis_up",
        "tandem_gateway_rejected_total",
        "tandem_node_durability_degraded",
        "tandem_node_fenced",
        "tandem_node_quarantined_events",
    ] {
        assert!(
            all.iter().any(|e| e.contains(metric)),
            "no panel of the dashboard queries {metric}"
        );
    }
}

#[test]
fn gateways_override_parses_and_runs_two_hardened_gateways_and_etcd() {
    for tool in compose_tools() {
        let files = ["docker-compose.gateways.yml"];
        let (ok, out) = compose_config_with(&tool, &files, TOKENS, &[]);
        assert!(
            ok,
            "{} config with the override failed:\n{out}",
            tool.name()
        );
        let config: Yaml = serde_yaml_ng::from_str(&out).expect("config output is YAML");
        let services = config["services"].as_mapping().expect("services");
        let service = |name: &str| services[&Yaml::String(name.into())].clone();
        for name in ["gw-1", "gw-2", "etcd"] {
            let s = service(name);
            assert_eq!(s["read_only"], Yaml::Bool(true), "{name} not read-only");
            assert!(
                format!("{:?}", s["cap_drop"]).contains("ALL"),
                "{name} keeps its capabilities"
            );
        }
        // Two gateways on loopback ports of their own, one etcd they both use, unpublished.
        for (name, id) in [("gw-1", "gw-1"), ("gw-2", "gw-2")] {
            let env = &service(name)["environment"];
            assert_eq!(env["GATEWAY_ID"].as_str(), Some(id));
            assert_eq!(
                env["GATEWAY_ETCD_ENDPOINTS"].as_str(),
                Some("http://etcd:2379")
            );
            let ports = format!("{:?}", service(name)["ports"]);
            assert!(ports.contains("127.0.0.1"), "{name}: {ports}");
        }
        assert_eq!(service("etcd")["ports"], Yaml::Null, "etcd is published");
        // The single gateway is parked behind a profile nobody enables: Compose v2 leaves
        // it out of the configuration, 1.29 lists it with its profile.
        if let Some(single) = services.get(Yaml::String("gateway".into())) {
            assert!(
                format!("{:?}", single["profiles"]).contains("single-gateway"),
                "{}: the single gateway would start beside gw-1 and gw-2",
                tool.name()
            );
        }
        // Prometheus reads the two-gateway config.
        assert!(
            format!("{:?}", service("prometheus")["command"]).contains("prometheus-gateways.yml"),
            "{out}"
        );
    }
}

#[test]
fn release_build_script_explains_itself_and_refuses_unknown_arguments() {
    let script = workspace_root().join("scripts/build-release.sh");
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash -n scripts/build-release.sh");
    assert!(syntax.status.success(), "{syntax:?}");
    let help = Command::new("bash")
        .arg(&script)
        .arg("--help")
        .output()
        .expect("run scripts/build-release.sh --help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{help:?}");
    assert!(
        text.contains("--no-pgo") && text.contains("profile-guided"),
        "{text}"
    );

    let wrong = Command::new("bash")
        .arg(&script)
        .arg("--fast")
        .output()
        .expect("run scripts/build-release.sh --fast");
    assert_eq!(wrong.status.code(), Some(64), "{wrong:?}");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("unknown argument '--fast'"), "{err}");
}
