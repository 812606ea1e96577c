#!/usr/bin/env bash
# The core relay benchmark (issue 2), all scenarios in one session so that
# ratios compare like with like:
#   (a) smtp-source -d -> smtp-sink directly: the ceiling
#   (b) smtp-source -d -> herald (trusted listener) -> smtp-sink
#   (c) smtp-source    -> herald (one connection per message) -> smtp-sink
#   (d) herald loadgen (STARTTLS + AUTH) -> herald -> smtp-sink
# Needs Debian's postfix package (smtp-source, smtp-sink) and python3.
# Results: JSON lines in $OUT; summarise with benches/summarise.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results.jsonl}
SIZES=${SIZES:-2048,102400}
CONCS=${CONCS:-10,50}
REPS=${REPS:-3}
COUNTS=${COUNTS:-2048=20000,102400=2000}
SCENARIOS=${SCENARIOS:-a b c d}
BENCH=../shared/bench/smtpbench.py

command -v smtp-source >/dev/null || { echo "install postfix (smtp-source, smtp-sink): apt-get install postfix" >&2; exit 1; }
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin herald --example bench_dns --example bench_tls
mkdir -p var/bench
rm -rf var/bench/spool var/bench/events.jsonl

# SINK=tls: deliver to examples/bench_tls instead of smtp-sink: STARTTLS
# with a certificate for mx.dest.example from a test CA
# (var/bench/tls/ca.pem, for [delivery.mta_sts] ca_file), and an MTA-STS
# policy (enforce, mx: mx.dest.example) published for dest.example
# (_mta-sts TXT, mta-sts.dest.example on 127.0.0.3, HTTPS port 8443).
# smtpbench.py starts it as it starts smtp-sink, through a shim named
# smtp-sink first in its PATH (bench_tls prints smtp-sink's counters).
# SIGNED=1 (with SINK=tls): the DNS zone is DNSSEC-signed with a key of its
# own, written to var/bench/tls/anchor (for [delivery.dane] trust_anchor),
# and mx.dest.example has a TLSA 3 1 1 record for the sink's key.
# Whether herald uses the policy or DANE is up to EXTRA_CONFIG.
DNS_ARGS=(dest.example=127.0.0.2)
BENCH_PATH=$PATH
case "${SINK:-}" in
  tls)
    mkdir -p var/bench/tls var/bench/shim
    SPKI=$(target/release/examples/bench_tls init var/bench/tls)
    printf '#!/bin/sh\n# started by smtpbench.py in place of smtp-sink (its arguments ignored)\nexec "%s/target/release/examples/bench_tls" serve "%s/var/bench/tls" --smtp 127.0.0.2:2526 --https 127.0.0.3:8443\n' \
      "$PWD" "$PWD" > var/bench/shim/smtp-sink
    chmod +x var/bench/shim/smtp-sink
    BENCH_PATH=$PWD/var/bench/shim:$PATH
    DNS_ARGS+=(--txt "_mta-sts.dest.example=v=STSv1; id=1;" --a mta-sts.dest.example=127.0.0.3)
    if [ -n "${SIGNED:-}" ]; then
      DNS_ARGS+=(--tlsa "_2526._tcp.mx.dest.example=3,1,1,$SPKI" --signed var/bench/tls/anchor)
    fi ;;
  "") ;;
  *) echo "SINK is tls or unset (smtp-sink)" >&2; exit 2 ;;
esac
rm -f var/bench/tls/anchor
target/release/examples/bench_dns "${DNS_ARGS[@]}" > var/bench/dns.addr &
DNS_PID=$!
HERALD_PID=
cleanup() {
  [ -n "$HERALD_PID" ] && kill "$HERALD_PID" 2>/dev/null || true
  kill "$DNS_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -s var/bench/dns.addr ] && break; sleep 0.1; done
[ -z "${SIGNED:-}" ] || for _ in $(seq 100); do [ -s var/bench/tls/anchor ] && break; sleep 0.1; done
sed "s/@DNS@/$(cat var/bench/dns.addr)/" benches/herald-bench.toml > var/bench/herald.toml
# DKIM=rsa-sha256 or DKIM=ed25519: sign every message (smtp-source's From:
# is sender@bench.example) to measure the relay with signing on.
LABEL=
if [ -n "${DKIM:-}" ]; then
  rm -rf var/bench/dkim
  target/release/herald dkim keygen --domain bench.example --selector bench \
    --algorithm "$DKIM" --dir var/bench/dkim > /dev/null 2>&1
  printf '\n[[dkim]]\ndomain = "bench.example"\nselector = "bench"\nalgorithm = "%s"\nkey = "%s"\n' \
    "$([ "$DKIM" = ed25519 ] && echo ed25519-sha256 || echo rsa-sha256)" \
    "$(ls var/bench/dkim/*.key)" >> var/bench/herald.toml
  LABEL="-dkim-$DKIM"
fi

# POLICY=off: no spam scoring, no DMARC alignment check (the baseline for
# the policy stage's cost); POLICY=full: the defaults plus an IP and a
# domain blocklist zone (answered NXDOMAIN by bench_dns, so cached);
# unset: the defaults (spam scoring on, DMARC alignment "warn").
case "${POLICY:-}" in
  off)
    printf '\n[policy.spam]\nenabled = false\n[policy.dmarc]\naction = "off"\n' >> var/bench/herald.toml
    LABEL="$LABEL-policy-off" ;;
  full)
    printf '\n[[policy.dnsbl]]\nzone = "bl.bench.example"\nkind = "ip"\n[[policy.dnsbl]]\nzone = "dbl.bench.example"\nkind = "domain"\n' >> var/bench/herald.toml
    LABEL="$LABEL-policy-full" ;;
  "") ;;
  *) echo "POLICY is off or full" >&2; exit 2 ;;
esac

if [ -n "${SINK:-}" ]; then LABEL="$LABEL-sink-$SINK${SIGNED:+-signed}"; fi

# EXTRA_CONFIG=FILE: append FILE to the generated config (e.g. a
# "[delivery.mta_sts] enabled = false" section for an A/B run); its base
# name is added to the scenario label.
if [ -n "${EXTRA_CONFIG:-}" ]; then
  { echo; cat "$EXTRA_CONFIG"; } >> var/bench/herald.toml
  LABEL="$LABEL-$(basename "$EXTRA_CONFIG" .toml)"
fi

ulimit -n "$(ulimit -Hn)" || true
RUST_LOG=warn target/release/herald --config var/bench/herald.toml serve 2> var/bench/herald.log &
HERALD_PID=$!
echo "$HERALD_PID" > var/bench/herald.pid
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && break; sleep 0.1; done

common=(--sizes "$SIZES" --concs "$CONCS" --reps "$REPS" --counts "$COUNTS" --rcpt rcpt@dest.example --out "$OUT")
# QUIET_WAIT=S: wait at most S seconds for a quiet machine before each run
# (smtpbench's default 120); WARMUP=N: N unrecorded messages first (herald's
# connections, DNS and policy caches warm).
[ -z "${QUIET_WAIT:-}" ] || common+=(--quiet-wait "$QUIET_WAIT")
[ -z "${WARMUP:-}" ] || common+=(--warmup "$WARMUP")
for s in $SCENARIOS; do
  case $s in
    a) PATH=$BENCH_PATH python3 $BENCH --scenario a-direct-reuse --target 127.0.0.2:2526 --sink 127.0.0.2:2526 --reuse "${common[@]}" ;;
    b) PATH=$BENCH_PATH python3 $BENCH --scenario b-herald-reuse$LABEL --target 127.0.0.1:2525 --sink 127.0.0.2:2526 --reuse \
         --sut-pidfile var/bench/herald.pid "${common[@]}" ;;
    c) PATH=$BENCH_PATH python3 $BENCH --scenario c-herald-noreuse$LABEL --target 127.0.0.1:2525 --sink 127.0.0.2:2526 \
         --sut-pidfile var/bench/herald.pid "${common[@]}" ;;
    d) python3 benches/loadgen_bench.py --sut-pidfile var/bench/herald.pid --sizes "$SIZES" --concs "$CONCS" \
         --reps "$REPS" --counts "$COUNTS" --out "$OUT" ;;
  esac
done
