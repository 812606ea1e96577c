#!/usr/bin/env bash
# Builds target/debian/herald_<version>_<arch>.deb with cargo-deb
# (`cargo install cargo-deb`): the release binary, the default config with
# system paths, the systemd unit, the man page and shell completions.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked
mkdir -p target/debian-assets
sed -e 's#"var/spool#"/var/lib/herald/spool#' \
    -e 's#"var/events.jsonl"#"/var/log/herald/events.jsonl"#' \
    -e 's#"certs/#"/var/lib/herald/certs/#' \
    config/herald.toml > target/debian-assets/herald.toml
target/release/herald man > target/debian-assets/herald.1
gzip -9nf target/debian-assets/herald.1
target/release/herald completions bash > target/debian-assets/herald.bash
cargo deb --no-build --locked --strip "$@"
