#!/usr/bin/env bash
# A/B of delivery TLS modes with benches/run.sh scenario (b), alternated
# run by run (A B, B A, ...) in one session:
#   MODE=mta-sts   A: opportunistic TLS   B: verified under a cached MTA-STS
#                  enforce policy             (both to examples/bench_tls)
#   MODE=dane      A: opportunistic TLS   B: DANE-EE 3 1 1 verified
#                  (both with the DNSSEC-signed zone)
#   MODE=nopolicy  A: [delivery.mta_sts] enabled = false   B: the defaults
#                  (to smtp-sink; dest.example publishes no policy)
# Each run's JSON line gets "side", "pass", "commit", "load" (uptime before
# the run) and "tls_verified" (the delivered events' tls_info.verified
# counts, from var/bench/events.jsonl), "sink_sessions_total" (SMTP
# sessions the sink saw in the whole run.sh call, from smtpbench's
# /tmp/smtp-sink.counter); a run whose events are not what the
# side must show stops the script. Needs the release build of herald,
# bench_dns and bench_tls (run.sh without SKIP_BUILD once).
#   MODE=mta-sts PASSES=4 OUT=benches/results-x.jsonl benches/tls_ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:?MODE is mta-sts, dane or nopolicy}
PASSES=${PASSES:-4}
FIRST=${FIRST:-1}
OUT=${OUT:?OUT=FILE for the results}
# WARMUP (unrecorded messages before each run.sh call's runs): default 200
# for mta-sts and dane, so the policy or TLSA records are cached when the
# recorded runs start; none for nopolicy (as the 2026-12-07 section).
export SCENARIOS=b SIZES=${SIZES:-2048} CONCS=${CONCS:-10,50} REPS=1 SKIP_BUILD=1 QUIET_WAIT=${QUIET_WAIT:-10}
ab=benches/tls-ab
case $MODE in
  mta-sts) A=(SINK=tls EXTRA_CONFIG=$ab/mta-sts-off.toml); B=(SINK=tls EXTRA_CONFIG=$ab/mta-sts-verified.toml)
           WANT_A=none WANT_B=mta-sts ;;
  dane) A=(SINK=tls SIGNED=1 EXTRA_CONFIG=$ab/mta-sts-off.toml); B=(SINK=tls SIGNED=1 EXTRA_CONFIG=$ab/dane-verified.toml)
        WANT_A=none WANT_B=dane ;;
  nopolicy) A=(EXTRA_CONFIG=$ab/mta-sts-off.toml); B=(EXTRA_CONFIG=)
            WANT_A=plain WANT_B=plain ;;
  *) echo "MODE is mta-sts, dane or nopolicy" >&2; exit 2 ;;
esac
if [ "$MODE" != nopolicy ]; then export WARMUP=${WARMUP:-200}; fi
commit=$(git rev-parse --short HEAD)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for pass in $(seq "$FIRST" $((FIRST + PASSES - 1))); do
  if [ $((pass % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for side in $order; do
    if [ "$side" = A ]; then envs=("${A[@]}"); want=$WANT_A; else envs=("${B[@]}"); want=$WANT_B; fi
    load=$(uptime | sed 's/.*load average: //')
    echo "# $(date +%T) pass $pass side $side (${envs[*]}) load $load"
    # the busiest processes over one second (top's second frame)
    top -bn2 -d 1 -o %CPU | awk '/^ *PID /{f++; next} f==2 && n++<4'
    : > "$tmp"
    env "${envs[@]}" OUT="$tmp" benches/run.sh
    python3 - "$tmp" "$OUT" "$side" "$pass" "$commit" "$load" "$want" <<'PY'
import collections, json, sys
tmp, out, side, pas, commit, load, want = sys.argv[1:]
seen = collections.Counter()
for line in open("var/bench/events.jsonl"):
    e = json.loads(line)
    if e.get("event") == "delivered" or e.get("type") == "delivered":
        t = e.get("tls_info")
        seen[t["verified"] if t else "plain"] += 1
if set(seen) != {want}:
    sys.exit(f"side {side}: delivered events show {dict(seen)}, not all {want!r}")
import re
m = re.findall(rb"sess=(\d+)", open("/tmp/smtp-sink.counter", "rb").read())
sessions = int(m[-1]) if m else None
with open(out, "a") as o:
    for line in open(tmp):
        r = json.loads(line)
        r["side"], r["pass"], r["commit"], r["load"] = side, int(pas), commit, load
        r["tls_verified"] = dict(seen)
        # the sink's sessions over the whole run.sh call (warm-up included)
        r["sink_sessions_total"] = sessions
        o.write(json.dumps(r) + "\n")
        c = r["cpu"]
        print(f"  {r['scenario']} c={r['conc']} msgs/s={r['msgs_per_s'] and round(r['msgs_per_s'])} "
              f"herald={1000 * c['sut_s'] / r['count']:.3f}ms/msg sink={c['smtp_sink_s']}s src={c['smtp_source_s']}s "
              f"pre_busy={c['pre_run_busy_cores']} other={c['other_tenants_cores']} tls={dict(seen)} sessions={sessions}")
PY
  done
done
