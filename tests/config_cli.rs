//! `herald check-config` on broken configs: every file in
//! tests/bad_configs/ names, in its first line (`# expect: ...`), the key
//! path and reason the command must print; and the shipped default config
//! must pass. Also `--version`, `completions` and `man`.

use std::path::Path;
use std::process::Command;

fn check_config(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(path)
        .arg("check-config")
        .output()
        .expect("run herald");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn every_bad_config_is_refused_with_its_key_path() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an '# expect: ' line", path.display()));
        let (ok, output) = check_config(&path);
        assert!(!ok, "{} was accepted:\n{output}", path.display());
        assert!(
            output.contains(expect),
            "{}: expected {expect:?} in:\n{output}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} bad configs found");
}

#[test]
fn several_problems_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.toml");
    std::fs::write(
        &path,
        "[server]\nhostnme = \"x\"\n[[listener]]\naddress = \"127.0.0.1:2587\"\ntls = \"sometimes\"\n[delivery]\nport = 0\n",
    )
    .unwrap();
    let (ok, output) = check_config(&path);
    assert!(!ok);
    for want in [
        "server.hostnme",
        "listener[0].tls",
        "delivery.port",
        "3 problem(s)",
    ] {
        assert!(output.contains(want), "missing {want} in:\n{output}");
    }
}

#[test]
fn shipped_default_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/herald.toml");
    let (ok, output) = check_config(&path);
    assert!(ok, "{output}");
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .output()
        .expect("run herald");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn version_names_the_commit() {
    let (ok, out) = run(&["--version"]);
    assert!(ok);
    let expected = format!("herald {} (", env!("CARGO_PKG_VERSION"));
    assert!(out.starts_with(&expected), "{out}");
    // A commit hash (12 hex digits, maybe +dirty), or "unknown" outside git.
    let inside = out
        .trim()
        .trim_start_matches(&expected)
        .trim_end_matches(')');
    let hash = inside.trim_end_matches("+dirty");
    assert!(
        inside == "unknown" || (hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())),
        "{out}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    for (shell, marker) in [
        ("bash", "_herald()"),
        ("zsh", "#compdef herald"),
        ("fish", "complete -c herald"),
    ] {
        let (ok, out) = run(&["completions", shell]);
        assert!(ok, "{shell}");
        assert!(out.contains(marker), "{shell}: {out}");
        // Every subcommand is completed.
        for sub in ["serve", "check-config", "tls", "domain", "queue"] {
            assert!(out.contains(sub), "{shell} lacks {sub}");
        }
    }
    let (ok, page) = run(&["man"]);
    assert!(ok);
    assert!(page.contains(".TH herald 1"), "{page}");
    assert!(page.contains("check\\-config"), "{page}");
    let (ok, _) = run(&["completions", "tcsh"]);
    assert!(!ok, "an unknown shell is refused");
}
