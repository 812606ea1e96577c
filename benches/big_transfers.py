#!/usr/bin/env python3
"""Memory under many large uploads at once: 100 clients each send one
message just under 25 MiB at the same moment, over the trusted plain
listener, and herald's VmRSS is sampled from /proc every 100 ms.

With server.max_receiving_bytes (default 512 MiB) herald refuses what does
not fit with 452 4.3.1: at DATA when MAIL FROM carried SIZE=, at the end of
data otherwise. Clients then wait a moment (0.2-0.5 s) and send again, until
all 100 are accepted. Delivery goes to a sink that discards bodies.

Runs, each with a fresh herald and spool: --budgets x (SIZE=, no SIZE=).
The 4GiB budget is the baseline: next to nothing is refused, so it shows
what the default budget saves. --sink-rate makes the destination slow (each sink
connection reads at most that many bytes per second), to see what accepted
messages waiting for delivery hold. Each refusal is counted by where it
came (refusals_by_stage: at DATA, or at the end of data after the whole
message was sent). One JSON line per run, appended to --out.
"""
import argparse
import collections
import json
import os
import random
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

MIB = 1024 * 1024

ap = argparse.ArgumentParser()
ap.add_argument("--clients", type=int, default=100)
ap.add_argument("--budgets", default="512MiB,4GiB")
ap.add_argument("--size-modes", default="size,nosize", help="size: MAIL FROM ... SIZE=; nosize: without")
ap.add_argument("--message-size", default="25MiB", help="server.max_message_size")
ap.add_argument("--listen", default="127.0.0.1:2745")
ap.add_argument("--sink", default="127.0.0.2:2746")
ap.add_argument("--hold-delivery", default="no,yes",
                help="yes: the sink is down until all are accepted (deliveries fail to "
                     "connect); retries still read bodies back up to max_bytes_in_flight, so "
                     "add --delivery-in-flight 1MiB for the receive path alone")
ap.add_argument("--delivery-in-flight", default=None,
                help="[delivery] max_bytes_in_flight (default: herald's, 256MiB)")
ap.add_argument("--sink-rate", default=None,
                help="a slow destination: each sink connection reads at most this many "
                     "bytes per second (e.g. 1MiB); default: as fast as it can")
ap.add_argument("--drain-timeout", type=float, default=600)
ap.add_argument("--out", required=True)
args = ap.parse_args()

max_size = int(args.message_size.removesuffix("MiB")) * MIB
sink_rate = None
if args.sink_rate:
    sink_rate = int(float(args.sink_rate.removesuffix("MiB")) * MIB) if args.sink_rate.endswith("MiB") \
        else int(float(args.sink_rate.removesuffix("KiB")) * 1024)
# The message stays a little under the limit: the limit counts the message
# as received, and SIZE= announces the limit itself.
line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/\r\n"
BODY = line * ((max_size - 64 * 1024) // len(line))


def sample_rss(pid, stop, samples, counts):
    """VmRSS every 100 ms; `counts()` gives (accepted, delivered) then."""
    while not stop.is_set():
        s = benchlib.proc_status(pid)
        if s is None:
            return
        samples.append((time.monotonic(), s["VmRSS"], *counts()))
        stop.wait(0.1)


def one_run(dns, budget, with_size, hold):
    wd = benchlib.workdir("big_transfers")
    ids = os.path.join(wd, "delivered.txt")
    sink = None if hold else benchlib.Sink(args.sink, ids_path=ids, rate=sink_rate)
    listeners = f"""[[listener]]
address = "{args.listen}"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
"""
    server = f'max_message_size = "{args.message_size}"\nmax_receiving_bytes = "{budget}"'
    cfg = benchlib.config(wd, dns.addr, listeners=listeners, server=server,
                          delivery_port=int(args.sink.rsplit(":", 1)[1]),
                          delivery='retry = ["1s"]' + (f'\nmax_bytes_in_flight = "{args.delivery_in_flight}"'
                                                       if args.delivery_in_flight else ""))
    herald = benchlib.Herald(cfg, wd)
    herald.start(wait_for=args.listen)
    time.sleep(1)
    rss_start = benchlib.rss_mib(herald.pid)
    stop = threading.Event()
    samples = []
    codes = collections.Counter()
    stages = collections.Counter()
    refused_clients = set()
    accepted_at = {}
    sinks = [sink]
    sampler = threading.Thread(target=sample_rss, daemon=True, args=(
        herald.pid, stop, samples, lambda: (len(accepted_at), sinks[0].count if sinks[0] else 0)))
    sampler.start()
    go = threading.Barrier(args.clients)
    lock = threading.Lock()

    def client(n):
        mid = f"<big.{os.getpid()}.{n}@bench.example>"
        head = (f"From: <app@bench.example>\r\nTo: <rcpt@dest.example>\r\nSubject: big\r\n"
                f"Message-ID: {mid}\r\n\r\n").encode()
        conn = None
        go.wait()
        while True:
            try:
                if conn is None:
                    conn = benchlib.Smtp(args.listen, timeout=300)
                    conn.expect("EHLO client.test", 250)
                code, text = conn.send("app@bench.example", "rcpt@dest.example", [head, BODY],
                                       size=max_size if with_size else None)
            except (OSError, ConnectionError, benchlib.SmtpError) as e:
                with lock:
                    codes["error " + type(e).__name__] += 1
                if conn:
                    conn.close()
                conn = None
                time.sleep(random.uniform(0.2, 0.5))
                continue
            key = text[:9] if code != 250 else "250"
            with lock:
                codes[key] += 1
                if code != 250:
                    # At DATA (nothing sent) or at the end of data (the
                    # whole message sent for nothing).
                    stages[f"{text[:9]} at {conn.stage}"] += 1
                if code == 250:
                    accepted_at[n] = time.monotonic()
                else:
                    refused_clients.add(n)
            if code == 250:
                break
            time.sleep(random.uniform(0.2, 0.5))
        try:
            conn.cmd("QUIT")
        except (OSError, ConnectionError):
            pass
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_accepted = time.monotonic()
    if sink is None:
        sink = benchlib.Sink(args.sink, ids_path=ids, rate=sink_rate)
        sinks[0] = sink
    while sink.count < args.clients and time.monotonic() - t_accepted < args.drain_timeout:
        time.sleep(0.2)
    t_drained = time.monotonic()
    time.sleep(1)
    stop.set()
    sampler.join()
    rss_after = benchlib.rss_mib(herald.pid)
    hwm = benchlib.hwm_mib(herald.pid)
    errors = herald.log_lines("ERROR", "panicked")
    herald.stop()
    sink.stop()
    delivered = len(set(sink.new_ids()))

    def peak(a, b):
        vals = [kib for t, kib, *_ in samples if a <= t <= b]
        return round(max(vals) / 1024, 1) if vals else None

    timeline, counts_timeline = [], []
    for t, kib, acc, dlv in samples:
        if not timeline or t - t0 >= timeline[-1][0] + 1:
            timeline.append((round(t - t0, 1), round(kib / 1024)))
            counts_timeline.append((round(t - t0, 1), acc, dlv))
    # RSS at its peak, and how many messages were accepted but not yet
    # delivered then (their bodies may still be in memory for delivery).
    top = max(samples, key=lambda x: x[1]) if samples else None
    budget_mib = int(budget.removesuffix("MiB")) if budget.endswith("MiB") \
        else int(budget.removesuffix("GiB")) * 1024
    rec = {
        "scenario": "big-transfers",
        "clients": args.clients,
        "message_mib": round((len(BODY) + 100) / MIB, 2),
        "max_receiving_bytes": budget,
        "size_param": with_size,
        "delivery_held": hold,
        "delivery_max_bytes_in_flight": args.delivery_in_flight or "256MiB",
        "sink_rate_per_connection": args.sink_rate,
        "accepted": len(accepted_at),
        "first_try_250": args.clients - len(refused_clients),
        "clients_refused_at_least_once": len(refused_clients),
        "replies": dict(codes),
        "refusals_by_stage": dict(stages),
        "refused_after_data_mib": round(sum(n for k, n in stages.items() if k.endswith(" at end"))
                                        * (len(BODY) + 100) / MIB),
        "all_accepted_s": round(t_accepted - t0, 1),
        "drain_s": round(t_drained - t_accepted, 1),
        "delivered": delivered,
        "rss_start_mib": rss_start,
        "peak_rss_receiving_mib": peak(t0, t_accepted),
        "peak_rss_mib": peak(t0, float("inf")),
        "hwm_mib": hwm,
        "rss_after_drain_mib": rss_after,
        "budget_mib": budget_mib,
        # glibc tunables herald inherited, if any (they change what RSS
        # keeps of freed buffers).
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))},
        "rss_timeline_s_mib": timeline,
        "accepted_delivered_timeline": counts_timeline,
        "at_peak": {"t_s": round(top[0] - t0, 1), "rss_mib": round(top[1] / 1024),
                    "accepted": top[2], "delivered": top[3]} if top else None,
        "herald_log_errors": errors,
        "time": benchlib.now(),
    }
    print(json.dumps(rec), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    # 100 x 25 MiB per run: free the disk before the next one.
    benchlib.workdir("big_transfers")
    return rec


dns = benchlib.Dns()
try:
    for budget in args.budgets.split(","):
        for mode in args.size_modes.split(","):
            for hold in args.hold_delivery.split(","):
                one_run(dns, budget, mode == "size", hold == "yes")
finally:
    dns.stop()
