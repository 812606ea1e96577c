#!/usr/bin/env python3
"""Connection floods: herald's memory with many idle clients, and whether an
app that logged in before still gets its mail in while strangers hold every
slot they may take.

herald runs with max_connections = 11000, reserved_connections = 1000 and
max_unauthenticated_per_ip = 10000, so one flood IP can hold all 10,000
strangers' slots.

1. Memory (--rss): for each count and mode a fresh herald, then
   benches/idle_conns.py holds that many idle clients, plain (EHLO on the
   trusted plain listener) or after STARTTLS + EHLO (on the STARTTLS
   listener), and reads herald's RSS.
2. Flood (--flood): one herald. The app (source 127.0.0.4) logs in once,
   so its IP is known. Then N app transactions are timed, each connect ->
   EHLO -> STARTTLS -> EHLO -> AUTH PLAIN -> MAIL/RCPT/DATA -> 250: first
   without a flood (baseline), then while 10,000 unauthenticated
   connections from 127.0.0.3 are held (greeted, nothing more), then again
   without. During the flood a new stranger (127.0.0.5) must get 421.
   Then herald is restarted on the same spool, the flood opened again at
   once, and the app tries again (flood-after-restart).
3. Restart before a flood (--restart-before-flood), on its own: a fresh
   herald, the app logs in once (its IP is then known, and should be in
   <spool_dir>/known_clients.json), herald is stopped (SIGTERM, or SIGKILL
   with --restart-signal kill) and started again on the same spool and
   config, the flood is opened at once, and the app must still get in
   (flood-restart-before-flood).

One JSON line per measurement, appended to --out.
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--rss", action="store_true", help="run the memory part")
ap.add_argument("--flood", action="store_true", help="run the flood part")
ap.add_argument("--restart-before-flood", action="store_true",
                help="run only the restart case: login, restart, flood, app")
ap.add_argument("--restart-signal", choices=("term", "kill"), default="term",
                help="how --restart-before-flood stops herald")
ap.add_argument("--drop-known-file", action="store_true",
                help="control for --restart-before-flood: delete known_clients.json "
                     "while herald is stopped (the app should then be refused)")
ap.add_argument("--counts", default="1000,5000,10000")
ap.add_argument("--flood-connections", type=int, default=10000)
ap.add_argument("--app-runs", type=int, default=50)
ap.add_argument("--plain", default="127.0.0.1:2735", help="trusted plain listener")
ap.add_argument("--submission", default="127.0.0.1:2737", help="STARTTLS + AUTH listener")
ap.add_argument("--sink", default="127.0.0.2:2736")
ap.add_argument("--flood-source", default="127.0.0.3")
ap.add_argument("--app-source", default="127.0.0.4")
ap.add_argument("--stranger-source", default="127.0.0.5")
ap.add_argument("--out", required=True)
args = ap.parse_args()
if not (args.rss or args.flood or args.restart_before_flood):
    args.rss = args.flood = True

PASSWORD = "bench-password"


def emit(rec):
    rec["time"] = benchlib.now()
    print(json.dumps(rec), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def herald_config(wd, dns, tenant_hash):
    listeners = f"""[[listener]]
address = "{args.plain}"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.1/32"]

[[listener]]
address = "{args.submission}"
tls = "starttls"
auth = "required"
"""
    server = """max_connections = 11000
max_connections_per_ip = 11000
max_unauthenticated_per_ip = 10000
reserved_connections = 1000"""
    return benchlib.config(wd, dns, listeners=listeners, server=server, tenant_hash=tenant_hash,
                           delivery_port=int(args.sink.rsplit(":", 1)[1]))


# ------------------------------------------------------------ flood -----
def _flood_main(conn, target, source, n, workers):
    """Runs in its own process: opens n connections from `source`, reads
    each greeting, reports, holds them until told to close."""
    held, refused, errors = [], {}, {}

    def one(_):
        try:
            c = benchlib.Smtp(target, source=source, timeout=60)
        except OSError as e:
            return ("error", type(e).__name__, None)
        code, text = c.greeting
        if code != 220:
            c.close(abort=True)
            return ("refused", f"{code}", text)
        return ("held", None, c)

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        for kind, key, obj in ex.map(one, range(n)):
            if kind == "held":
                held.append(obj)
            elif kind == "refused":
                refused[key] = refused.get(key, 0) + 1
                refused["sample"] = obj
            else:
                errors[key] = errors.get(key, 0) + 1
    conn.send({"held": len(held), "refused": refused, "errors": errors,
               "open_s": round(time.monotonic() - t0, 2)})
    conn.recv()
    # A held connection herald dropped meanwhile shows up as readable EOF.
    dropped = 0
    for c in held:
        c.sock.setblocking(False)
        try:
            if c.sock.recv(1) == b"":
                dropped += 1
        except BlockingIOError:
            pass
        except OSError:
            dropped += 1
        c.close(abort=True)
    conn.send({"dropped_while_held": dropped})


class Flood:
    def __init__(self, target, source, n, workers=32):
        self.conn, child = multiprocessing.Pipe()
        self.p = multiprocessing.Process(target=_flood_main, args=(child, target, source, n, workers),
                                         daemon=True)
        self.p.start()
        self.report = self.conn.recv()

    def release(self):
        self.conn.send("close")
        self.report.update(self.conn.recv())
        self.p.join(30)
        return self.report


# -------------------------------------------------------------- app -----
def app_transaction(i, label):
    """One app submission from scratch; seconds from connect to the 250."""
    ctx = benchlib.tls_context()
    mid = f"<flood.{label}.{i}.{os.getpid()}@bench.example>"
    data = benchlib.message(mid, 2048)
    t0 = time.monotonic()
    c = benchlib.Smtp(args.submission, source=args.app_source, timeout=60)
    try:
        if c.greeting[0] != 220:
            raise benchlib.SmtpError(*c.greeting)
        c.starttls(ctx)
        code, text = c.auth_plain("bench", PASSWORD)
        if code != 235:
            raise benchlib.SmtpError(code, text)
        code, text = c.send("app@bench.example", "rcpt@dest.example", data)
        if code != 250:
            raise benchlib.SmtpError(code, text)
        dt = time.monotonic() - t0
        c.cmd("QUIT")
        return dt
    finally:
        c.close()


def app_series(label, n):
    times, failures = [], {}
    for i in range(n):
        try:
            times.append(app_transaction(i, label))
        except (OSError, ConnectionError, benchlib.SmtpError) as e:
            failures[str(e)[:120]] = failures.get(str(e)[:120], 0) + 1
    ms = [t * 1000 for t in times]
    return {"runs": n, "ok": len(times), "failures": failures,
            "p50_ms": round(benchlib.percentile(ms, 50), 1) if ms else None,
            "p99_ms": round(benchlib.percentile(ms, 99), 1) if ms else None,
            "max_ms": round(max(ms), 1) if ms else None}


def stranger():
    try:
        c = benchlib.Smtp(args.submission, source=args.stranger_source, timeout=10)
    except OSError as e:
        return {"error": str(e)}
    code, text = c.greeting
    c.close(abort=True)
    return {"code": code, "reply": text}


def known_file(wd):
    """What <spool_dir>/known_clients.json holds (None when it is absent)."""
    try:
        with open(os.path.join(wd, "spool", "known_clients.json")) as f:
            return json.load(f)
    except OSError:
        return None
    except ValueError as e:
        return {"unreadable": str(e)}


def flood_after_restart(h, wd, scenario, how, drop_known=False):
    """herald `h` has seen the app log in: stop it (SIGTERM or SIGKILL),
    start it on the same spool and config, open the flood at once, and
    time the app during and after it."""
    rec = {"scenario": scenario, "flood_connections": args.flood_connections,
           "restart_signal": how, "known_file_before_restart": known_file(wd)}
    if how == "kill":
        h.kill9()
    else:
        h.stop()
    if drop_known:
        os.remove(os.path.join(wd, "spool", "known_clients.json"))
        rec["known_file_dropped"] = True
    rec["restart_to_listening_s"] = round(h.start(wait_for=args.submission), 2)
    flood = Flood(args.submission, args.flood_source, args.flood_connections)
    rec["flood"] = dict(flood.report)
    rec["stranger_during_flood"] = stranger()
    rec["during_flood"] = app_series("restart-flood", min(args.app_runs, 10))
    rec["rss_flood_mib"] = benchlib.rss_mib(h.pid)
    rec["flood"] = flood.release()
    time.sleep(1)
    rec["after_flood"] = app_series("restart-after", min(args.app_runs, 10))
    rec["herald_log_errors"] = h.log_lines("ERROR", "panicked")
    h.stop()
    return rec


# ------------------------------------------------------------- main -----
dns = benchlib.Dns()
sink = benchlib.Sink(args.sink)
try:
    tenant_hash = benchlib.hash_password(PASSWORD)
    if args.rss:
        for mode in ("plain", "starttls"):
            for n in map(int, args.counts.split(",")):
                wd = benchlib.workdir("conn_flood")
                h = benchlib.Herald(herald_config(wd, dns.addr, tenant_hash), wd)
                h.start(wait_for=args.submission)
                time.sleep(1)
                cmd = [sys.executable, os.path.join(benchlib.ROOT, "benches", "idle_conns.py"),
                       "--pid", str(h.pid), "--connections", str(n), "--out", args.out]
                cmd += ["--target", args.plain, "--ehlo"] if mode == "plain" else \
                       ["--target", args.submission, "--starttls"]
                r = subprocess.run(cmd)
                hwm = benchlib.hwm_mib(h.pid)
                h.stop()
                if r.returncode != 0:
                    emit({"scenario": "idle-connections", "mode": mode, "connections": n,
                          "error": f"idle_conns.py exited {r.returncode}"})
                else:
                    emit({"scenario": "idle-connections-hwm", "mode": mode, "connections": n,
                          "hwm_mib": hwm})
    if args.flood:
        wd = benchlib.workdir("conn_flood")
        h = benchlib.Herald(herald_config(wd, dns.addr, tenant_hash), wd)
        h.start(wait_for=args.submission)
        rec = {"scenario": "flood", "flood_connections": args.flood_connections,
               "rss_start_mib": benchlib.rss_mib(h.pid)}
        # The app's IP becomes known by logging in once.
        app_transaction(0, "login")
        rec["baseline_before"] = app_series("before", args.app_runs)
        flood = Flood(args.submission, args.flood_source, args.flood_connections)
        rec["flood"] = dict(flood.report)
        rec["stranger_during_flood"] = stranger()
        rec["rss_flood_mib"] = benchlib.rss_mib(h.pid)
        rec["during_flood"] = app_series("flood", args.app_runs)
        rec["stranger_after_app"] = stranger()
        rec["flood"] = flood.release()
        time.sleep(1)
        rec["baseline_after"] = app_series("after", args.app_runs)
        rec["stranger_after_flood"] = stranger()
        rec["rss_end_mib"] = benchlib.rss_mib(h.pid)
        rec["hwm_mib"] = benchlib.hwm_mib(h.pid)
        base = [rec["baseline_before"]["p50_ms"], rec["baseline_after"]["p50_ms"]]
        if all(base) and rec["during_flood"]["p50_ms"]:
            rec["p50_ratio_flood_to_baseline"] = round(rec["during_flood"]["p50_ms"] / min(base), 2)
        rec["herald_log_errors"] = h.log_lines("ERROR", "panicked")
        emit(rec)

        # The same flood right after a restart (a deploy, a crash): the app
        # logged in 50+ times within the last minute, before the restart.
        emit(flood_after_restart(h, wd, "flood-after-restart", "term"))
    if args.restart_before_flood:
        # On its own: one login, then the restart, then the flood.
        wd = benchlib.workdir("conn_flood")
        h = benchlib.Herald(herald_config(wd, dns.addr, tenant_hash), wd)
        h.start(wait_for=args.submission)
        app_transaction(0, "login")
        time.sleep(1)  # the login's save is written in the background
        emit(flood_after_restart(h, wd, "flood-restart-before-flood", args.restart_signal,
                                 drop_known=args.drop_known_file))
finally:
    sink.stop()
    dns.stop()
