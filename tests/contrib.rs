//! What ships for operators refers only to what herald exports: every
//! metric in contrib/prometheus/herald-alerts.yml's `expr`s and in every
//! panel of contrib/grafana/herald-dashboard.json is on a running relay's
//! `/metrics` page (as a `# HELP` line: labeled counters print theirs before
//! their first sample).

mod common;

use std::collections::BTreeSet;

use common::dns::{TestDns, Zone};
use common::relay::{Setup, TestRelay};

/// The `herald_*` metric names in an expression; a histogram's
/// `_bucket`/`_sum`/`_count` series name the histogram.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

/// The `expr:` of every rule: a one-line value, or a `|` block whose lines
/// are indented deeper than the key. Read as text: there is no YAML parser
/// in the build, and the file keeps to these two forms.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value == "|" || value == ">" {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" "));
        } else {
            exprs.push(value.to_string());
        }
    }
    exprs
}

fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_metrics_herald_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let yaml = std::fs::read_to_string(format!("{root}/contrib/prometheus/herald-alerts.yml"))
        .expect("alert rules");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/contrib/grafana/herald-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let alerts = alert_exprs(&yaml);
    assert!(alerts.len() >= 10, "{alerts:?}");
    assert_eq!(
        alerts.len(),
        yaml.matches("- alert:").count(),
        "one expr per rule"
    );
    let panels = dashboard_exprs(&dashboard);
    assert!(panels.len() >= 20, "{panels:?}");
    let used: BTreeSet<String> = alerts
        .iter()
        .chain(&panels)
        .flat_map(|e| metric_names(e))
        .collect();

    let dns = TestDns::start(Zone::new("test.")).await;
    let relay = TestRelay::start(Setup::new(dns.addr, 25)).await;
    let page = relay.metrics_page().await;
    let exported: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    let missing: Vec<_> = used
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{page}");
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(herald_dns_lookup_seconds_bucket[5m]))) / herald_queue_messages"
        ),
        vec!["herald_dns_lookup_seconds", "herald_queue_messages"]
    );
    let yaml = "  - alert: A\n    expr: up == 0\n  - alert: B\n    expr: |\n      a\n        / b\n    for: 1m\n";
    assert_eq!(alert_exprs(yaml), vec!["up == 0", "a / b"]);
}
