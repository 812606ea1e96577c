#!/usr/bin/env python3
"""Scenario (d) of benches/run.sh: `herald loadgen` (STARTTLS + AUTH) into
herald, delivered to smtp-sink, measured like ../shared/bench/smtpbench.py
measures smtp-source: messages/s until the sink has the last message, plus
loadgen's own accept-latency percentiles and herald's CPU per message.
Appends JSON lines to --out."""
import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
import smtpbench  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--scenario", default="loadgen-starttls-auth")
ap.add_argument("--herald", default="target/release/herald")
ap.add_argument("--target", default="127.0.0.1:2587")
ap.add_argument("--sink", default="127.0.0.2:2526")
ap.add_argument("--sizes", default="2048,102400")
ap.add_argument("--concs", default="10,50")
ap.add_argument("--counts", default="2048=20000,102400=2000")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--auth", default="bench:bench-password")
ap.add_argument("--extra", default="--starttls", help="extra loadgen flags")
ap.add_argument("--sut-pidfile", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

counts = dict(kv.split("=") for kv in args.counts.split(","))
sink = smtpbench.Sink(args.sink)
sut = smtpbench.read_pidfile(args.sut_pidfile)
try:
    for size in map(int, args.sizes.split(",")):
        for conc in map(int, args.concs.split(",")):
            for rep in range(args.reps):
                n = int(counts[str(size)])
                smtpbench.wait_quiet(0.3, 60)
                base = sink.count
                su0 = smtpbench.tree_cpu(sut)
                t0 = time.monotonic()
                cmd = [args.herald, "loadgen", "--target", args.target, "--messages", str(n),
                       "--concurrency", str(conc), "--size", str(size), "--auth", args.auth,
                       "--from", "loadgen@bench.example", "--to", "rcpt@dest.example"]
                cmd += args.extra.split()
                p = subprocess.run(cmd, capture_output=True, text=True)
                tsrc = time.monotonic()
                tend = sink.wait_for(base + n, 600)
                su1 = smtpbench.tree_cpu(sut)
                out = p.stdout
                def num(label):
                    m = re.search(label + r"[^0-9]*([0-9.]+)", out)
                    return float(m.group(1)) if m else None
                rec = {
                    "scenario": args.scenario, "size": size, "conc": conc, "count": n, "rep": rep,
                    "msgs_per_s": n / (tend - t0) if tend else None,
                    "accept_msgs_per_s": n / (tsrc - t0),
                    "p50_ms": num("p50"), "p99_ms": num("p99"), "max_ms": num("max"),
                    "loadgen_rc": p.returncode, "loadgen_out": out[-800:], "loadgen_err": p.stderr[-300:],
                    "sut_cpu_ms_per_msg": round((su1 - su0) * 1000 / n, 3),
                    "sink_received": sink.count - base,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
                print(json.dumps(rec), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                time.sleep(2)
finally:
    sink.stop()
