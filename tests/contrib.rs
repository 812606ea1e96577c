//! What ships for operators refers only to what herald exports: every
//! metric in contrib/prometheus/herald-alerts.yml's `expr`s and in every
//! panel of contrib/grafana/herald-dashboard.json is on a running relay's
//! `/metrics` page, after a message went through it.
//!
//! herald prints `# HELP` and `# TYPE` for every metric, also for a labeled
//! counter that has no sample yet (its series appear with their first
//! increment): a name is exported when the page has its `# TYPE` line; a
//! histogram's `_bucket`/`_sum`/`_count` series must be on the page, and
//! its bare name is not a series. The alert file is read as text (there is
//! no YAML parser in the build): block-style mappings, as the file is
//! written, with plain, quoted or block-scalar (`|`, `>`) values;
//! `promtool check rules` checks it fully (contrib/prometheus/test-rules.sh).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::relay::{field, one_test};

const WAIT: Duration = Duration::from_secs(30);

/// The `herald_*` names in a PromQL expression, as written (a histogram's
/// series keep their `_bucket`/`_sum`/`_count` suffix).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("herald_") {
        // `xherald_y` is some other identifier.
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// One rule of the alert file: its `alert` name, line, and every
/// `key: value` under it (nested keys by their own name: `severity`,
/// `summary`, ...).
#[derive(Debug)]
struct Rule {
    alert: String,
    line: usize,
    keys: BTreeMap<String, String>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// A scalar written on the key's line: quoted, or plain (where ` #` starts
/// a comment).
fn scalar(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return inner.replace("\\\"", "\"").replace("\\\\", "\\");
    }
    if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return inner.replace("''", "'");
    }
    match v.find(" #") {
        Some(at) => v[..at].trim_end().to_string(),
        None => v.to_string(),
    }
}

/// The rules of a Prometheus rule file written in block style.
fn alert_rules(yaml: &str) -> Vec<Rule> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    // The indentation of the current rule's `-`.
    let mut rule_indent = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if is_blank_or_comment(line) {
            continue;
        }
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            rule_indent = Some(indent(line));
            rules.push(Rule {
                alert: scalar(name),
                line: i,
                keys: BTreeMap::new(),
            });
            continue;
        }
        let Some(d) = rule_indent else { continue };
        if indent(line) <= d {
            // A sibling (`- record:`) or the end of the rule list.
            rule_indent = None;
            continue;
        }
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let key = key.trim().to_string();
        let value = value.trim();
        let block = ["|", "|-", "|+", ">", ">-", ">+"].contains(&value);
        let value = if block {
            // Every following line indented deeper than the key (blank
            // lines included) belongs to the value.
            let key_indent = indent(line);
            let mut parts = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key_indent) {
                if !lines[i].trim().is_empty() {
                    parts.push(lines[i].trim());
                }
                i += 1;
            }
            parts.join(" ").trim().to_string()
        } else {
            scalar(value)
        };
        let rule = rules.last_mut().expect("a rule");
        assert!(
            rule.keys.insert(key.clone(), value).is_none(),
            "alert {} (line {}): {key} given twice",
            rule.alert,
            rule.line
        );
    }
    rules
}

/// The panels of a dashboard, also those inside collapsed rows.
fn panels(json: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in json["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Checks the dashboard's structure; returns every query it makes.
fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    let schema = json["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(schema >= 36, "schemaVersion {schema}");
    let inputs = json["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS input: {inputs:?}"
    );
    let ds = |v: &serde_json::Value, what: &str| {
        assert_eq!(
            v["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{what}: datasource {}",
            v["datasource"]
        );
    };
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in panels(json) {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice ({title})");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        if p["type"] == "row" {
            continue;
        }
        ds(p, title);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            ds(t, title);
            let expr = t["expr"].as_str().expect("expr");
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            exprs.push(expr.to_string());
        }
    }
    for v in json["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            ds(v, "template variable");
            exprs.push(v["definition"].as_str().expect("definition").to_string());
        }
    }
    exprs
}

/// What a `/metrics` page declares (`# TYPE`) and which series it has.
struct Page {
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    series: BTreeMap<String, f64>,
}

impl Page {
    fn parse(text: &str) -> Page {
        let mut page = Page {
            types: BTreeMap::new(),
            helps: BTreeSet::new(),
            series: BTreeMap::new(),
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                page.types.insert(name.to_string(), kind.to_string());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                page.helps
                    .insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name_end = line.find(['{', ' ']).expect("a sample");
                let value: f64 = line
                    .rsplit(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|_| panic!("sample value: {line}"));
                *page.series.entry(line[..name_end].to_string()).or_default() += value;
            }
        }
        page
    }

    /// The metric a name in an expression refers to, or why it does not.
    fn resolve(&self, name: &str) -> Result<String, String> {
        if let Some(kind) = self.types.get(name) {
            if kind == "histogram" {
                return Err(format!(
                    "{name} is a histogram: use its _bucket, _sum or _count series"
                ));
            }
            if !self.helps.contains(name) {
                return Err(format!("{name} has no # HELP line"));
            }
            return Ok(name.to_string());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && self.types.get(base).map(String::as_str) == Some("histogram")
            {
                return match self.series.contains_key(name) {
                    true => Ok(base.to_string()),
                    false => Err(format!("histogram {base} has no {name} series")),
                };
            }
        }
        Err(format!("{name} is not exported"))
    }
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

    // Every rule: an expr, a for:, a severity, and words for the on-call.
    let rules = alert_rules(&yaml);
    assert_eq!(
        rules.len(),
        yaml.lines()
            .filter(|l| l.trim_start().starts_with("- alert:"))
            .count()
    );
    assert!(rules.len() >= 20, "{rules:?}");
    let mut names = BTreeSet::new();
    for r in &rules {
        let at = format!("alert {} (line {})", r.alert, r.line);
        assert!(names.insert(&r.alert), "{at}: name twice");
        for key in ["expr", "for", "summary", "description"] {
            let v = r.keys.get(key).map(String::as_str).unwrap_or("");
            assert!(!v.is_empty(), "{at}: no {key}: {:?}", r.keys);
        }
        let severity = r.keys.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{at}: severity {severity:?}"
        );
    }
    let alert_exprs: Vec<&str> = rules.iter().map(|r| r.keys["expr"].as_str()).collect();
    assert!(
        alert_exprs
            .iter()
            .any(|e| e.contains("up{job=\"herald\"} == 0")),
        "a relay-down rule: {alert_exprs:?}"
    );
    let panel_exprs = dashboard_exprs(&dashboard);
    assert!(panel_exprs.len() >= 30, "{panel_exprs:?}");

    // A relay that has delivered a message, so that the counters that
    // appear with their first increment are there too.
    let w = one_test(|_| {}).await;
    let reply = w
        .relay
        .submit(
            "billing@acme.test",
            &["bob@one.test"],
            b"From: <billing@acme.test>\r\nTo: <bob@one.test>\r\nSubject: metrics\r\n\
              Message-ID: <contrib-1@acme.test>\r\n\r\nHello.\r\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    w.relay
        .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;
    w.relay.wait_queue_empty(WAIT).await;
    let text = w.relay.metrics_page().await;
    let page = Page::parse(&text);
    for (series, at_least) in [
        ("herald_messages_received_total", 1.0),
        ("herald_recipients_delivered_total", 1.0),
        ("herald_connections_out_total", 1.0),
        ("herald_delivery_latency_seconds_count", 1.0),
        ("herald_accept_latency_seconds_count", 1.0),
        ("herald_dns_lookup_seconds_count", 1.0),
    ] {
        let got = page.series.get(series).copied().unwrap_or(0.0);
        assert!(got >= at_least, "{series} = {got}:\n{text}");
    }

    let mut problems = Vec::new();
    let mut resolve = |exprs: &[&str], what: &str| -> BTreeSet<String> {
        let mut used = BTreeSet::new();
        for e in exprs {
            for name in metric_names(e) {
                match page.resolve(&name) {
                    Ok(base) => {
                        used.insert(base);
                    }
                    Err(why) => problems.push(format!("{what}: {why} (in {e})")),
                }
            }
        }
        used
    };
    let in_alerts = resolve(&alert_exprs, "alert rules");
    let panel_refs: Vec<&str> = panel_exprs.iter().map(String::as_str).collect();
    let in_dashboard = resolve(&panel_refs, "dashboard");
    assert!(problems.is_empty(), "{problems:#?}\n{text}");

    // The rules watch what an operator pages on.
    for needed in [
        "herald_queue_oldest_age_seconds",
        "herald_recipients_deferred_total",
        "herald_recipients_bounced_total",
        "herald_spool_full",
        "herald_spool_lost_messages_total",
        "herald_spool_quarantined_segments",
        "herald_dns_failures_total",
        "herald_tls_policy_failures_total",
        "herald_mta_sts_failures_total",
    ] {
        assert!(in_alerts.contains(needed), "no alert rule on {needed}");
    }
    // Every metric herald exports is on the dashboard: a new metric gets
    // a panel.
    let missing: Vec<_> = page
        .types
        .keys()
        .filter(|m| !in_dashboard.contains(*m))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(herald_dns_lookup_seconds_bucket{instance=~\"$instance\"}[5m]))) / herald_queue_messages"
        ),
        vec!["herald_dns_lookup_seconds_bucket", "herald_queue_messages"]
    );
    assert_eq!(
        metric_names("job:herald_x:rate5m + up"),
        Vec::<String>::new()
    );
}

#[test]
fn alert_rules_are_read_from_block_style_yaml() {
    let yaml = "\
groups:
  - name: g
    rules:
      - alert: A
        expr: up == 0   # down
        for: 1m
        labels:
          severity: critical
        annotations:
          summary: \"say \\\"hi\\\"\"
      # a comment
      - alert: B
        expr: |
          a

            / b
        for: 5m
        annotations:
          description: 'it''s b'
      - record: r
        expr: c
  - name: h
    rules:
      - alert: C
        expr: >-
          d
          > 1
";
    let rules = alert_rules(yaml);
    let got: Vec<_> = rules
        .iter()
        .map(|r| (r.alert.as_str(), r.keys["expr"].as_str()))
        .collect();
    assert_eq!(got, vec![("A", "up == 0"), ("B", "a / b"), ("C", "d > 1")]);
    assert_eq!(rules[0].keys["severity"], "critical");
    assert_eq!(rules[0].keys["summary"], "say \"hi\"");
    assert_eq!(rules[1].keys["description"], "it's b");
    assert_eq!(rules[1].keys["for"], "5m");
    assert!(!rules[1].keys.contains_key("severity"));
}
