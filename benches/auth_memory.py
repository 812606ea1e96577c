#!/usr/bin/env python3
"""Memory under concurrent password guessing: --connections clients (each
from its own source address 127.0.1.N by default, so that neither the
per-IP limits nor the per-IP check queue serialise them) open STARTTLS
sessions, and then all send AUTH PLAIN with a wrong password at the same
moment. herald checks each against the tenant's argon2id hash (~19 MiB of
work area per check); it runs at most one check per core, each in a reused
work area, so its memory should grow by about cores x 19 MiB once and not
with the number of guesses.

herald runs with max_auth_failures = 1000 so every attempt is checked.
Reports VmRSS at start, with the sessions open (before AUTH), after each
round of attempts, and VmHWM. One JSON line, appended to --out.
"""
import argparse
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--connections", type=int, default=60)
ap.add_argument("--rounds", type=int, default=3, help="rounds of concurrent wrong AUTH")
ap.add_argument("--same-ip", action="store_true", help="all clients from 127.0.0.1")
ap.add_argument("--listen", default="127.0.0.1:2757")
ap.add_argument("--out", required=True)
args = ap.parse_args()

wd = benchlib.workdir("auth_memory")
dns = benchlib.Dns()
listeners = f"""[[listener]]
address = "{args.listen}"
tls = "starttls"
auth = "required"
"""
server = f"""max_auth_failures = 1000
max_unauthenticated_per_ip = {args.connections + 10}"""
herald = benchlib.Herald(benchlib.config(wd, dns.addr, listeners=listeners, server=server,
                                         tenant_hash=benchlib.hash_password("bench-password"),
                                         delivery_port=2756), wd)
rec = {"scenario": "auth-memory", "connections": args.connections, "same_ip": args.same_ip,
       "cores": os.cpu_count()}
try:
    herald.start(wait_for=args.listen)
    time.sleep(1)
    rec["rss_start_mib"] = benchlib.rss_mib(herald.pid)
    ctx = benchlib.tls_context()
    conns = []
    for i in range(args.connections):
        src = "127.0.0.1" if args.same_ip else f"127.0.1.{i + 1}"
        c = benchlib.Smtp(args.listen, source=src, timeout=300)
        c.starttls(ctx)
        conns.append(c)
    time.sleep(1)
    rec["rss_sessions_open_mib"] = benchlib.rss_mib(herald.pid)
    rounds = []
    for r in range(args.rounds):
        replies = [None] * len(conns)
        go = threading.Barrier(len(conns))

        def guess(i):
            go.wait()
            t = time.monotonic()
            try:
                code, text = conns[i].auth_plain("bench", f"wrong-{r}-{i}")
                replies[i] = (code, time.monotonic() - t)
            except (OSError, ConnectionError) as e:
                replies[i] = (type(e).__name__, time.monotonic() - t)

        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                s = benchlib.proc_status(herald.pid)
                peak[0] = max(peak[0], s["VmRSS"])
                stop.wait(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        time.sleep(1)
        stop.set()
        sampler.join()
        codes = {}
        for code, _ in replies:
            codes[str(code)] = codes.get(str(code), 0) + 1
        waits = [w for _, w in replies]
        rounds.append({"replies": codes, "all_replied_s": round(elapsed, 2),
                       "reply_s_p50": round(benchlib.percentile(waits, 50), 2),
                       "reply_s_max": round(max(waits), 2),
                       "peak_rss_mib": round(peak[0] / 1024, 1),
                       "rss_after_mib": benchlib.rss_mib(herald.pid)})
    rec["rounds"] = rounds
    rec["hwm_mib"] = benchlib.hwm_mib(herald.pid)
    rec["growth_mib"] = round(rounds[-1]["rss_after_mib"] - rec["rss_sessions_open_mib"], 1)
    rec["herald_log_errors"] = herald.log_lines("ERROR", "panicked")
    for c in conns:
        c.close()
finally:
    herald.stop()
    dns.stop()
rec["time"] = benchlib.now()
print(json.dumps(rec))
with open(args.out, "a") as f:
    f.write(json.dumps(rec) + "\n")
