"""Shared pieces of the abuse and durability benchmarks (kill9.py,
conn_flood.py, big_transfers.py, auth_memory.py): the loopback DNS server,
a recording SMTP sink, herald itself started from a generated config, a
small blocking SMTP client and /proc memory readings.

Everything runs on loopback. Each script keeps its files under var/<name>/
and its own ports, so that it does not collide with benches/run.sh or with a
second script running at the same time."""
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
HERALD = os.path.join(TARGET, "release", "herald")
BENCH_DNS = os.path.join(TARGET, "release", "examples", "bench_dns")

# Linux: choose the source port at connect(), not at bind(), so that many
# connections from one bound source address do not run out of ports.
IP_BIND_ADDRESS_NO_PORT = 24


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def workdir(name, clean=True):
    d = os.path.join(ROOT, "var", name)
    if clean and os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d, exist_ok=True)
    return d


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# ------------------------------------------------------------ /proc -----
def proc_status(pid):
    """VmRSS and VmHWM of a process in KiB (None when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        return None
    return out


def rss_mib(pid):
    s = proc_status(pid)
    return round(s["VmRSS"] / 1024, 1) if s else None


def hwm_mib(pid):
    s = proc_status(pid)
    return round(s["VmHWM"] / 1024, 1) if s else None


# ------------------------------------------------------------- DNS ------
class Dns:
    """examples/bench_dns: MX for each domain given, pointing at one IP."""

    def __init__(self, zones=("dest.example=127.0.0.2",)):
        self.p = subprocess.Popen([BENCH_DNS, *zones], stdout=subprocess.PIPE, text=True)
        self.addr = self.p.stdout.readline().strip()
        if not self.addr:
            raise RuntimeError("bench_dns printed no address")

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            self.p.wait()


# ------------------------------------------------------------ sink ------
_MID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.I | re.M)
_END = b"\r\n.\r\n"


class _SinkSession:
    """One SMTP session of the sink: accepts everything (the null sender
    too) and, at each message's final dot, records its Message-ID. Bodies
    are never kept: headers are looked at until the blank line, the rest is
    only scanned for the end of data."""

    def __init__(self, sink, transport):
        self.sink = sink
        self.t = transport
        self.buf = b""
        self.data = False
        self.t.write(b"220 sink.test ESMTP bench sink\r\n")

    def feed(self, chunk):
        if self.data:
            chunk = self._data(chunk)
            if chunk is None:
                return
        self.buf += chunk
        out = []
        while not self.data:
            i = self.buf.find(b"\r\n")
            if i < 0:
                if len(self.buf) > 8192:
                    self.t.close()
                break
            line, self.buf = self.buf[:i], self.buf[i + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                           b"250-SMTPUTF8\r\n250 SIZE 1073741824\r\n")
            elif verb == b"DATA":
                out.append(b"354 go on\r\n")
                self.data = True
                self.tail = b"\r\n"  # DATA's own CRLF: "." alone ends at once
                self.head = b""
                self.head_done = False
                self.mid = None
                rest, self.buf = self.buf, b""
                if out:
                    self.t.write(b"".join(out))
                    out = []
                rest = self._data(rest)
                if rest is None:
                    return
                self.buf = rest
            elif verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.t.write(b"".join(out))
                self.t.close()
                return
            elif verb in (b"STAR", b"AUTH", b"BDAT"):
                out.append(b"502 5.5.1 not here\r\n")
            else:  # HELO, MAIL, RCPT, RSET, NOOP, ...
                out.append(b"250 ok\r\n")
        if out:
            self.t.write(b"".join(out))

    def _data(self, chunk):
        """Consumes message data; returns what follows the final dot (bytes,
        possibly empty) once the message is complete, else None."""
        if not self.head_done:
            self.head += chunk
            j = self.head.find(b"\r\n\r\n")
            if j >= 0 or len(self.head) > 65536:
                self.head_done = True
                m = _MID.search(self.head, 0, j if j >= 0 else len(self.head))
                self.mid = m.group(1) if m else b"<none>"
                self.head = b""
        look = self.tail + chunk
        k = look.find(_END)
        if k < 0:
            self.tail = look[-4:]
            return None
        self.data = False
        self.sink.delivered(self.mid)
        self.t.write(b"250 2.0.0 Ok: stored\r\n")
        return look[k + len(_END):]


def _sink_main(addr, ids_path, count, ready, rate=None):
    import asyncio

    host, port = addr.rsplit(":", 1)

    class Recorder:
        def __init__(self):
            self.fd = os.open(ids_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if ids_path else None

        def delivered(self, mid):
            # One write per message: the file is the record even if the
            # sink is stopped abruptly.
            if self.fd is not None:
                os.write(self.fd, mid + b"\n")
            count.value += 1

    rec = Recorder()

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.s = _SinkSession(rec, transport)

        def data_received(self, data):
            self.s.feed(data)
            if rate:
                # A slow destination: each connection reads at most `rate`
                # bytes per second (TCP pushes back on the sender).
                self.transport.pause_reading()
                asyncio.get_running_loop().call_later(len(data) / rate, self._resume)

        def _resume(self):
            if not self.transport.is_closing():
                self.transport.resume_reading()

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Proto, host, int(port), backlog=1024, reuse_address=True)
        ready.set()
        async with srv:
            await srv.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


class Sink:
    """The recording sink, in its own process (the clients' threads would
    otherwise share one interpreter lock with it). `ids_path`: file that
    gets one Message-ID per delivered message; None discards them too.
    `rate`: bytes per second each connection reads at most (None: as fast
    as it can)."""

    def __init__(self, addr, ids_path=None, rate=None):
        self.addr = addr
        self.ids_path = ids_path
        self._count = multiprocessing.Value("q", 0, lock=False)
        ready = multiprocessing.Event()
        self.p = multiprocessing.Process(target=_sink_main, args=(addr, ids_path, self._count, ready, rate),
                                         daemon=True)
        self.p.start()
        if not ready.wait(10):
            raise RuntimeError(f"sink did not start on {addr}")
        self._off = 0
        self._tail = b""

    @property
    def count(self):
        return self._count.value

    def new_ids(self):
        """Message-IDs recorded since the last call."""
        with open(self.ids_path, "rb") as f:
            f.seek(self._off)
            data = f.read()
        self._off += len(data)
        data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        return [l.decode() for l in lines]

    def stop(self):
        if self.p.is_alive():
            self.p.terminate()
            self.p.join(5)


# ----------------------------------------------------------- herald -----
def hash_password(password):
    p = subprocess.run([HERALD, "hash-password"], input=password + "\n", capture_output=True,
                       text=True, check=True)
    return p.stdout.strip()


def config(wd, dns, *, listeners, server="", delivery_port, tenant_hash=None, delivery="",
           extra=""):
    """A herald config in the style of benches/herald-bench.toml. `listeners`
    is TOML text of [[listener]] tables; `server` and `delivery` are extra
    lines for those tables."""
    tenant = ""
    if tenant_hash:
        tenant = f"""
[[tenant]]
name = "bench"
username = "bench"
password_hash = "{tenant_hash}"
allowed_senders = ["*"]
bind_from_header = false
"""
    return f"""# Generated by benches/benchlib.py.
[server]
hostname = "bench.herald.test"
spool_dir = "{wd}/spool"
shutdown_grace = "2s"
{server}

{listeners}

[tls]
cert = "{wd}/relay.crt"
key = "{wd}/relay.key"
{tenant}
[dns]
nameservers = ["{dns}"]

[delivery]
helo_name = "bench.herald.test"
port = {delivery_port}
connect_timeout = "5s"
idle_timeout = "2s"
{delivery}

[events]
log = "{wd}/events.jsonl"

[admin]
address = "127.0.0.1:0"
{extra}
"""


class Herald:
    def __init__(self, config_text, wd, name="herald"):
        self.wd = wd
        self.cfg = os.path.join(wd, f"{name}.toml")
        with open(self.cfg, "w") as f:
            f.write(config_text)
        self.log = os.path.join(wd, f"{name}.log")
        self.p = None
        self.starts = 0

    def start(self, wait_for=None, timeout=60):
        """Starts herald; with `wait_for` ("host:port") returns once that
        listener accepts connections (seconds it took)."""
        logf = open(self.log, "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        t0 = time.monotonic()
        self.p = subprocess.Popen([HERALD, "--config", self.cfg, "serve"], stdout=logf,
                                  stderr=logf, env=env)
        logf.close()
        self.starts += 1
        if wait_for:
            host, port = wait_for.rsplit(":", 1)
            while time.monotonic() - t0 < timeout:
                if self.p.poll() is not None:
                    raise RuntimeError(f"herald exited with {self.p.returncode}; see {self.log}")
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    return time.monotonic() - t0
                except OSError:
                    time.sleep(0.01)
            raise RuntimeError(f"herald did not listen on {wait_for} within {timeout} s")
        return None

    @property
    def pid(self):
        return self.p.pid

    def kill9(self):
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def log_lines(self, *needles):
        """How many log lines contain any of `needles`."""
        n = 0
        try:
            with open(self.log, errors="replace") as f:
                for line in f:
                    if any(x in line for x in needles):
                        n += 1
        except OSError:
            pass
        return n


# ----------------------------------------------------------- client -----
class SmtpError(Exception):
    def __init__(self, code, text):
        super().__init__(text if text.startswith(str(code)) else f"{code} {text}")
        self.code = code
        self.text = text


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Smtp:
    """A minimal blocking SMTP client; replies are (code, last line)."""

    def __init__(self, addr, source=None, timeout=30):
        host, port = addr.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        if source:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source, 0))
        try:
            s.connect((host, int(port)))
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.f = s.makefile("rb")
        self.greeting = self.reply()

    def reply(self):
        while True:
            line = self.f.readline(65536)
            if not line:
                raise ConnectionError("connection closed")
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), line.decode(errors="replace").rstrip()

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def expect(self, line, code):
        c, text = self.cmd(line)
        if c != code:
            raise SmtpError(c, text)
        return text

    def starttls(self, ctx, ehlo="client.test"):
        self.expect(f"EHLO {ehlo}", 250)
        self.expect("STARTTLS", 220)
        self.f.close()
        self.sock = ctx.wrap_socket(self.sock, server_hostname="bench.herald.test")
        self.f = self.sock.makefile("rb")
        self.expect(f"EHLO {ehlo}", 250)

    def auth_plain(self, user, password):
        import base64
        tok = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {tok}")

    def send(self, sender, rcpt, data, size=None):
        """One transaction; `data` is the dot-stuffed message without the
        final dot (bytes, or a list of bytes sent one after the other).
        Returns the reply to the end of data, or the first refusal before
        it; `self.stage` then names the command it answered (MAIL, RCPT,
        DATA, or "end" for the end of data)."""
        mail = f"MAIL FROM:<{sender}>" + (f" SIZE={size}" if size else "")
        self.stage = "MAIL"
        c, t = self.cmd(mail)
        if c != 250:
            return c, t
        self.stage = "RCPT"
        c, t = self.cmd(f"RCPT TO:<{rcpt}>")
        if c != 250:
            self.cmd("RSET")
            return c, t
        self.stage = "DATA"
        c, t = self.cmd("DATA")
        if c != 354:
            return c, t
        self.stage = "end"
        for part in data if isinstance(data, list) else [data]:
            self.sock.sendall(part)
        self.sock.sendall(b".\r\n")
        return self.reply()

    def close(self, abort=False):
        try:
            if abort:
                # RST instead of FIN: no TIME_WAIT left behind per connection.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def message(mid, body_bytes=1024, sender="app@bench.example", rcpt="rcpt@dest.example"):
    """A dot-safe message of about `body_bytes`, ending with CRLF."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench\r\nMessage-ID: {mid}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * max(1, body_bytes // len(line))
