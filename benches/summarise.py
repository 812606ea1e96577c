#!/usr/bin/env python3
"""Summarises benches/results.jsonl as the Markdown tables of RESULTS.md:
medians over repetitions, and each scenario as a ratio to the direct
smtp-source -d -> smtp-sink ceiling (scenario a) of the same size and
concurrency, measured in the same session."""
import json
import statistics
import sys
from collections import defaultdict

path = sys.argv[1] if len(sys.argv) > 1 else "benches/results.jsonl"
runs = defaultdict(list)
idle = []
for line in open(path):
    r = json.loads(line)
    if r.get("scenario") == "idle-connections":
        idle.append(r)
        continue
    runs[(r["scenario"], r["size"], r["conc"])].append(r)

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

ceiling = {}
for (sc, size, conc), rs in runs.items():
    if sc.startswith("a-"):
        ceiling[(size, conc)] = med(r["msgs_per_s"] for r in rs)

print("| scenario | size | conc | msgs/s (median) | ratio to (a) | accept p99 ms | herald CPU ms/msg | runs |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for (sc, size, conc) in sorted(runs, key=lambda k: (k[1], k[2], k[0])):
    rs = runs[(sc, size, conc)]
    mps = med(r["msgs_per_s"] for r in rs)
    ratio = mps / ceiling[(size, conc)] if mps and ceiling.get((size, conc)) else None
    cpu = med((r["cpu"]["sut_s"] * 1000 / r["count"]) if "cpu" in r else r.get("sut_cpu_ms_per_msg") for r in rs)
    p99 = med(r.get("p99_ms") for r in rs)
    print(f"| {sc} | {size // 1024} KiB | {conc} | {mps:,.0f} | {'' if ratio is None else f'{ratio:.0%}'} | "
          f"{'' if p99 is None else f'{p99:.1f}'} | {'' if sc.startswith('a-') or cpu is None else f'{cpu:.3f}'} | {len(rs)} |")
for r in idle:
    print(f"\nidle connections: {r['connections']} (ehlo={r['ehlo']}, starttls={r['starttls']}): "
          f"RSS {r['rss_before_mib']} -> {r['rss_with_idle_mib']} MiB ({r['kib_per_connection']} KiB each)")
