#!/bin/sh
# Check herald-alerts.yml with promtool: syntax, then the unit tests in
# herald-alerts.test.yml (annotations stripped: the tests compare labels).
set -eu
cd "$(dirname "$0")"
promtool check rules herald-alerts.yml
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
grep -Ev '^[[:space:]]+(annotations|summary|description):' herald-alerts.yml > "$tmp/herald-alerts.stripped.yml"
cp herald-alerts.test.yml "$tmp/"
promtool test rules "$tmp/herald-alerts.test.yml"
