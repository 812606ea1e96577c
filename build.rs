//! Puts the git commit herald is built from into `herald --version`
//! (`HERALD_GIT_COMMIT`; "unknown" outside a git checkout, "+dirty" when
//! the tree has uncommitted changes).

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    let dirty = commit.is_some()
        && !Command::new("git")
            .args([
                "diff",
                "--quiet",
                "HEAD",
                "--",
                "src",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .status()
            .is_ok_and(|s| s.success());
    let label = match commit {
        Some(c) if dirty => format!("{c}+dirty"),
        Some(c) => c,
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=HERALD_GIT_COMMIT={label}");
    // Rebuilt when HEAD moves (a commit, a checkout); only paths that exist,
    // or cargo would run this on every build.
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        for p in ["HEAD", "index"] {
            let path = dir.join(p);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--git-common-dir"]).map(PathBuf::from);
            if let Some(path) = common.map(|c| c.join(&reference)).filter(|p| p.exists()) {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
