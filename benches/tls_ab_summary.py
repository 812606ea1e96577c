#!/usr/bin/env python3
"""Summarise benches/tls_ab.sh results: per concurrency, the median msgs/s of
each side, B/A of the medians, the paired B/A (per pass) median and range,
herald's and the sink's CPU per message (median), and the load.

    python3 benches/tls_ab_summary.py benches/results-2026-12-08-mta-sts-verified.jsonl [--passes 1-4]
"""
import argparse
import collections
import json
import statistics


def quiet(r):
    c = r["cpu"]
    return c["other_tenants_cores"] <= 0.1 and (c["pre_run_busy_cores"] or 0) <= 0.3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--passes", help="first-last: only these passes")
    ap.add_argument("--quiet", action="store_true",
                    help="only pairs whose two runs were undisturbed: other tenants <= 0.1 "
                         "cores during the run and <= 0.3 busy cores just before it")
    args = ap.parse_args()
    rows = [json.loads(l) for f in args.files for l in open(f) if l.strip()]
    if args.passes:
        lo, hi = (int(x) for x in args.passes.split("-"))
        rows = [r for r in rows if lo <= r["pass"] <= hi]
    by = collections.defaultdict(dict)
    for r in rows:
        by[(r["size"], r["conc"])].setdefault(r["pass"], {})[r["side"]] = r
    med = statistics.median
    for (size, conc), passes in sorted(by.items()):
        pairs = [p for p in passes.values() if "A" in p and "B" in p]
        if args.quiet:
            pairs = [p for p in pairs if all(quiet(p[s]) for s in "AB")]
        a = [p["A"]["msgs_per_s"] for p in pairs]
        b = [p["B"]["msgs_per_s"] for p in pairs]
        ratio = sorted(p["B"]["msgs_per_s"] / p["A"]["msgs_per_s"] for p in pairs)
        cpu = lambda side, key: med(1000 * p[side]["cpu"][key] / p[side]["count"] for p in pairs)
        cpu_pairs = [(p["B"]["cpu"]["sut_s"] / p["A"]["cpu"]["sut_s"]) for p in pairs]
        higher = sum(1 for x in cpu_pairs if x > 1)
        other = max(max(p[s]["cpu"]["other_tenants_cores"] for s in "AB") for p in pairs)
        pre = max(max(p[s]["cpu"]["pre_run_busy_cores"] or 0 for s in "AB") for p in pairs)
        print(f"size={size} conc={conc} passes={len(pairs)} ({','.join(str(k) for k, p in sorted(passes.items()) if p in pairs)}): A {med(a):,.0f} B {med(b):,.0f} msgs/s "
              f"B/A(medians) {med(b) / med(a):.2f} paired {med(ratio):.2f} [{ratio[0]:.2f}-{ratio[-1]:.2f}] "
              f"herald ms/msg A {cpu('A', 'sut_s'):.3f} B {cpu('B', 'sut_s'):.3f} "
              f"(B higher in {higher}/{len(pairs)}, paired CPU B/A median {med(cpu_pairs):.2f}) "
              f"sink ms/msg A {cpu('A', 'smtp_sink_s'):.3f} B {cpu('B', 'smtp_sink_s'):.3f} "
              f"max pre-run busy {pre:.2f} max other-tenant cores {other:.2f}")
        print("   A:", " / ".join(f"{x:,.0f}" for x in a), "  B:", " / ".join(f"{x:,.0f}" for x in b))


if __name__ == "__main__":
    main()
