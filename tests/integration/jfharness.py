"""jfharness — what the integration tests need to drive jetfleet for real.

A nats-server with JetStream on free loopback ports (own store directory per
test), a small NATS protocol client written against the socket (no third-party
modules: the tests run with Debian's /usr/bin/python3 alone), JetStream API
helpers on top of it, and helpers that start jetfleet-consumer and run
jetfleet-publisher with their stderr captured to log files that are printed
when a test fails.

Binaries come from $JETFLEET_BIN (default /work/main/build/bin); the
nats-server from $JETFLEET_NATS_SERVER (default /usr/sbin/nats-server, then
PATH). Set JETFLEET_IT_KEEP=1 to keep every test's temporary directory and
JETFLEET_IT_VERBOSE=1 to print the logs of passing tests too.
"""

import base64
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid

SOURCE_DIR = os.environ.get(
    "JETFLEET_SOURCE_DIR",
    os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BIN_DIR = os.environ.get("JETFLEET_BIN", os.path.join(SOURCE_DIR, "build", "bin"))
CONSUMER = os.path.join(BIN_DIR, "jetfleet-consumer")
PUBLISHER = os.path.join(BIN_DIR, "jetfleet-publisher")


def _find_nats_server():
    explicit = os.environ.get("JETFLEET_NATS_SERVER")
    if explicit:
        return explicit
    if os.access("/usr/sbin/nats-server", os.X_OK):
        return "/usr/sbin/nats-server"
    return shutil.which("nats-server") or "/usr/sbin/nats-server"


NATS_SERVER = _find_nats_server()

RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
UUID4_RE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer", "ERROR: UndefinedBehaviorSanitizer")


# ---------------------------------------------------------------------------
# Small utilities

def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# scripts/valgrind runs the programs 10-50x slower and sets this factor: every
# wait_for deadline (so every program's startup wait too) is stretched by it.
TIMEOUT_SCALE = float(os.environ.get("JETFLEET_TIMEOUT_SCALE") or "1")


def wait_for(cond, timeout, what, interval=0.05, procs=()):
    """Polls cond() until it returns a truthy value, which is returned.

    Raises AssertionError naming `what` when `timeout` seconds pass first, or
    at once when one of `procs` (Popen) exits meanwhile: a crashed program
    should fail a test in seconds, not at its deadline."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = cond()
            if value:
                return value
            last_exc = None
        except (JsApiError, NatsTimeout, ConnectionError, OSError) as e:
            # A server that is busy or restarting is not yet a failure.
            last_exc = e
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(
                    "while waiting for %s: %s exited with code %s" %
                    (what, getattr(p, "jf_name", "process %d" % p.pid), p.returncode))
        if time.monotonic() >= deadline:
            extra = " (last error: %s)" % last_exc if last_exc else ""
            raise AssertionError("timed out after %.0fs waiting for %s%s" % (timeout, what, extra))
        time.sleep(interval)


def tail(path, lines=60, max_bytes=64 * 1024):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return "(cannot read %s: %s)" % (path, e)
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


def write_config(tmpdir, text, name="jetfleet.ini"):
    """Writes an INI file into tmpdir and returns its path."""
    path = os.path.join(tmpdir, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def make_config(nats_url, consumer=None, services=None, publisher=None, extra=""):
    """INI text: [nats] url, then [consumer]/[publisher] keys and one
    [service.NAME] section per entry of services ({name: {key: value}})."""
    out = ["[nats]", "url = %s" % nats_url, ""]
    if consumer:
        out.append("[consumer]")
        out += ["%s = %s" % kv for kv in consumer.items()]
        out.append("")
    if publisher:
        out.append("[publisher]")
        out += ["%s = %s" % kv for kv in publisher.items()]
        out.append("")
    for name, keys in (services or {}).items():
        out.append("[service.%s]" % name)
        out += ["%s = %s" % kv for kv in keys.items()]
        out.append("")
    if extra:
        out.append(extra)
    return "\n".join(out) + "\n"


def envelope(job_id, service="work", type_="t", priority=None, payload=None, **extra):
    env = {"id": job_id, "service": service, "type": type_}
    if priority is not None:
        env["priority"] = priority
    env["payload"] = {} if payload is None else payload
    env.update(extra)
    return env


def job_subject(service, priority, type_):
    return "jobs.%s.%s.%s" % (service, priority, type_)


# ---------------------------------------------------------------------------
# nats-server

class NatsServer:
    """nats-server -js on free loopback ports with its own store directory.

    start() waits until the client port accepts and the monitor reports
    JetStream healthy; stop() is SIGTERM then SIGKILL; kill9() simulates a
    crash; restart() starts it again on the same ports and store."""

    def __init__(self, tmpdir=None):
        self.own_tmp = tmpdir is None
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="jf-nats-")
        self.store_dir = os.path.join(self.tmpdir, "jetstream")
        self.log_path = os.path.join(self.tmpdir, "nats-server.log")
        self.port = None
        self.mon_port = None
        self.proc = None
        self._log = None

    @property
    def url(self):
        return "nats://127.0.0.1:%d" % self.port

    def start(self, timeout=30):
        attempts = 3 if self.port is None else 1
        for attempt in range(attempts):
            if self.port is None or attempt > 0:
                self.port, self.mon_port = free_port(), free_port()
                while self.mon_port == self.port:
                    self.mon_port = free_port()
            if self._spawn_and_wait(timeout):
                return self
            # Another process may have taken a port between free_port() and
            # the server's bind: try new ones.
            self._reap()
        raise RuntimeError("nats-server did not become ready:\n" + tail(self.log_path))

    def _spawn_and_wait(self, timeout):
        os.makedirs(self.store_dir, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(b"--- start %s on port %d\n" % (time.ctime().encode(), self.port))
        self._log.flush()
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port),
             "-m", str(self.mon_port), "-sd", self.store_dir],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._port_open() and self._healthy():
                return True
            time.sleep(0.05)
        return False

    def _port_open(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _healthy(self):
        try:
            body = self.monitor("/healthz?js-enabled-only=true", timeout=2)
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return isinstance(body, dict) and body.get("status") == "ok"

    def monitor(self, path, timeout=5):
        """GET http://127.0.0.1:<monitor port><path>, decoded from JSON."""
        url = "http://127.0.0.1:%d%s" % (self.mon_port, path)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            return json.loads(e.read().decode("utf-8") or "{}")

    def jsz_consumers(self):
        """{durable name: consumer info} of every consumer, taken in one
        monitoring request, so the numbers are close to one moment."""
        j = self.monitor("/jsz?accounts=true&streams=true&consumers=true")
        out = {}
        for acc in j.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                for c in st.get("consumer_detail") or []:
                    out[c.get("name")] = c
        return out

    def _reap(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout=10):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._reap()
        self.proc = None

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()
        self.proc = None

    def restart(self, timeout=30):
        self.stop()
        if not self._spawn_and_wait(timeout):
            self._reap()
            raise RuntimeError("nats-server did not come back:\n" + tail(self.log_path))
        return self

    def cleanup(self):
        self.stop()
        if self.own_tmp:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# A minimal NATS client

class NatsTimeout(Exception):
    pass


class NoResponders(Exception):
    pass


class JsApiError(Exception):
    def __init__(self, subject, error):
        self.code = error.get("code")
        self.err_code = error.get("err_code")
        self.description = error.get("description", "")
        super().__init__("%s: %s (code %s, err_code %s)" %
                         (subject, self.description, self.code, self.err_code))


class Msg:
    __slots__ = ("subject", "sid", "reply", "data", "headers", "status", "description")

    def __init__(self, subject, sid, reply, data, headers=None, status=None, description=None):
        self.subject = subject
        self.sid = sid
        self.reply = reply
        self.data = data
        self.headers = headers or {}
        self.status = status
        self.description = description

    def header(self, key, default=None):
        """First value of a header (case-insensitive name)."""
        for k, v in self.headers.items():
            if k.lower() == key.lower():
                return v[0] if v else default
        return default

    def json(self):
        return json.loads(self.data.decode("utf-8"))

    def __repr__(self):
        return "Msg(%r, reply=%r, status=%r, headers=%r, data=%r)" % (
            self.subject, self.reply, self.status, self.headers, self.data[:200])


def encode_headers(headers):
    """A NATS/1.0 header block; headers is a dict (values str or list)."""
    out = [b"NATS/1.0\r\n"]
    for k, v in headers.items():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            out.append(("%s: %s\r\n" % (k, item)).encode("utf-8"))
    out.append(b"\r\n")
    return b"".join(out)


def parse_headers(block):
    """(headers {name: [values]}, status, description) of a NATS/1.0 block."""
    text = block.decode("utf-8", "replace")
    lines = text.split("\r\n")
    first = lines[0]
    status = description = None
    if not first.startswith("NATS/1.0"):
        raise ValueError("bad header block %r" % block[:80])
    rest = first[len("NATS/1.0"):].strip()
    if rest:
        parts = rest.split(" ", 1)
        status = parts[0]
        description = parts[1] if len(parts) > 1 else ""
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        if not sep:
            continue
        headers.setdefault(k.strip(), []).append(v.strip())
    return headers, status, description


class Subscription:
    def __init__(self, client, sid, subject):
        self.client = client
        self.sid = sid
        self.subject = subject
        self._msgs = []
        self._cond = threading.Condition()

    def _deliver(self, msg):
        with self._cond:
            self._msgs.append(msg)
            self._cond.notify_all()

    def next_msg(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._msgs:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NatsTimeout("no message on %s within %.1fs" % (self.subject, timeout))
                self._cond.wait(left)
            return self._msgs.pop(0)

    def pending(self):
        with self._cond:
            return len(self._msgs)

    def unsubscribe(self):
        self.client.unsubscribe(self)


class NatsClient:
    """NATS core protocol over one socket, enough for tests.

    A reader thread parses INFO/MSG/HMSG/PING/PONG/+OK/-ERR and hands messages
    to subscriptions; writes are serialised by a lock, so the client can be
    used from several test threads at once."""

    def __init__(self, url, name="jfharness", timeout=10.0):
        m = re.match(r"^(?:nats://)?([^:/]+):(\d+)$", url.split(",")[0].strip())
        if not m:
            raise ValueError("cannot parse NATS url %r" % url)
        self.host, self.port = m.group(1), int(m.group(2))
        self.name = name
        self._wlock = threading.Lock()
        self._subs = {}
        self._sids = itertools.count(1)
        self._pong_cond = threading.Condition()
        self._pings_sent = 0
        self._pongs_seen = 0
        self._closed = False
        self.error = None
        self.server_info = {}
        self._inbox_prefix = "_INBOX.%s" % uuid.uuid4().hex
        self._resp_sub = None
        self._resp_waiters = {}
        self._resp_lock = threading.Lock()
        self._resp_ids = itertools.count(1)
        self._connect(timeout)

    # --- connection

    def _connect(self, timeout):
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        line = self._read_line_blocking(timeout)
        if not line.startswith(b"INFO "):
            raise ConnectionError("expected INFO, got %r" % line[:80])
        self.server_info = json.loads(line[5:].decode("utf-8"))
        self.max_payload = self.server_info.get("max_payload", 1024 * 1024)
        opts = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "protocol": 1, "name": self.name, "lang": "python-jfharness", "version": "0.1"}
        self._send(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
        # The first PONG (or -ERR) proves the CONNECT was accepted.
        while True:
            line = self._read_line_blocking(timeout)
            if line == b"PONG":
                break
            if line.startswith(b"-ERR"):
                raise ConnectionError("server refused CONNECT: %s" % line.decode())
            if line == b"PING":
                self._send(b"PONG\r\n")
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name="jfharness-nats-reader",
                                        daemon=True)
        self._reader.start()

    def _read_line_blocking(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NatsTimeout("no line from the server")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _send(self, data):
        with self._wlock:
            if self._closed:
                raise ConnectionError("client closed")
            self.sock.sendall(data)

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._pong_cond:
            self._pong_cond.notify_all()

    # --- reader

    def _read_loop(self):
        buf = self._buf
        self._buf = b""
        try:
            while not self._closed:
                pos = 0
                while True:
                    consumed = self._parse_one(buf, pos)
                    if consumed is None:
                        break
                    pos = consumed
                buf = buf[pos:]
                r, _, _ = select.select([self.sock], [], [], 0.5)
                if not r:
                    continue
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buf += chunk
        except (OSError, ValueError, ConnectionError) as e:
            if not self._closed:
                self.error = e
                self._closed = True
        finally:
            with self._pong_cond:
                self._pong_cond.notify_all()
            with self._resp_lock:
                for w in self._resp_waiters.values():
                    w["event"].set()

    def _parse_one(self, buf, pos):
        """Parses one protocol message at buf[pos:]; returns the new position,
        or None when more bytes are needed."""
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        line = buf[pos:end]
        op = line.split(b" ", 1)[0].upper()
        if op == b"MSG":
            parts = line.split()
            if len(parts) == 4:
                _, subject, sid, size = parts
                reply = None
            else:
                _, subject, sid, reply, size = parts
            size = int(size)
            start = end + 2
            if len(buf) < start + size + 2:
                return None
            data = buf[start:start + size]
            self._dispatch(Msg(subject.decode(), int(sid), reply.decode() if reply else None, data))
            return start + size + 2
        if op == b"HMSG":
            parts = line.split()
            if len(parts) == 5:
                _, subject, sid, hsize, tsize = parts
                reply = None
            else:
                _, subject, sid, reply, hsize, tsize = parts
            hsize, tsize = int(hsize), int(tsize)
            start = end + 2
            if len(buf) < start + tsize + 2:
                return None
            headers, status, desc = parse_headers(buf[start:start + hsize])
            data = buf[start + hsize:start + tsize]
            self._dispatch(Msg(subject.decode(), int(sid), reply.decode() if reply else None,
                               data, headers, status, desc))
            return start + tsize + 2
        if op == b"PING":
            self._send(b"PONG\r\n")
        elif op == b"PONG":
            with self._pong_cond:
                self._pongs_seen += 1
                self._pong_cond.notify_all()
        elif op == b"INFO":
            try:
                self.server_info = json.loads(line[5:].decode("utf-8"))
            except ValueError:
                pass
        elif op == b"-ERR":
            self.error = line.decode("utf-8", "replace")
        return end + 2

    def _dispatch(self, msg):
        sub = self._subs.get(msg.sid)
        if sub is not None:
            sub._deliver(msg)

    # --- API

    def flush(self, timeout=10.0):
        """Round trip to the server: everything sent before has been processed."""
        with self._pong_cond:
            self._pings_sent += 1
            want = self._pings_sent
        self._send(b"PING\r\n")
        deadline = time.monotonic() + timeout
        with self._pong_cond:
            while self._pongs_seen < want:
                if self._closed:
                    raise ConnectionError("connection closed: %s" % self.error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NatsTimeout("no PONG within %.1fs" % timeout)
                self._pong_cond.wait(left)

    def publish(self, subject, data=b"", reply=None, headers=None):
        if isinstance(data, str):
            data = data.encode("utf-8")
        rp = (" " + reply) if reply else ""
        if headers:
            hdr = encode_headers(headers)
            cmd = "HPUB %s%s %d %d\r\n" % (subject, rp, len(hdr), len(hdr) + len(data))
            self._send(cmd.encode() + hdr + data + b"\r\n")
        else:
            cmd = "PUB %s%s %d\r\n" % (subject, rp, len(data))
            self._send(cmd.encode() + data + b"\r\n")

    def subscribe(self, subject, queue=None):
        sid = next(self._sids)
        sub = Subscription(self, sid, subject)
        self._subs[sid] = sub
        self._send(("SUB %s%s %d\r\n" % (subject, (" " + queue) if queue else "", sid)).encode())
        return sub

    def unsubscribe(self, sub, max_msgs=None):
        if max_msgs:
            self._send(b"UNSUB %d %d\r\n" % (sub.sid, max_msgs))
        else:
            self._send(b"UNSUB %d\r\n" % sub.sid)
            self._subs.pop(sub.sid, None)

    def new_inbox(self):
        return "%s.%s" % (self._inbox_prefix, uuid.uuid4().hex)

    def _response_sub(self):
        with self._resp_lock:
            if self._resp_sub is None:
                sid = next(self._sids)
                sub = _ResponseMux(self, sid, self._inbox_prefix + ".r.*")
                self._subs[sid] = sub
                self._send(("SUB %s %d\r\n" % (sub.subject, sid)).encode())
                self._resp_sub = sub
            return self._resp_sub

    def request(self, subject, data=b"", timeout=5.0, headers=None):
        """Publishes with a unique reply subject and returns the first reply.

        Raises NoResponders on the server's 503 status, NatsTimeout when
        nothing arrives in time."""
        self._response_sub()
        token = "%d" % next(self._resp_ids)
        waiter = {"event": threading.Event(), "msg": None}
        with self._resp_lock:
            self._resp_waiters[token] = waiter
        try:
            self.publish(subject, data, reply="%s.r.%s" % (self._inbox_prefix, token),
                         headers=headers)
            if not waiter["event"].wait(timeout):
                raise NatsTimeout("no reply to %s within %.1fs" % (subject, timeout))
            msg = waiter["msg"]
            if msg is None:
                raise ConnectionError("connection closed: %s" % self.error)
            if msg.status == "503":
                raise NoResponders("no responders on %s" % subject)
            return msg
        finally:
            with self._resp_lock:
                self._resp_waiters.pop(token, None)

    # --- JetStream

    def js_api(self, subject, req=None, timeout=5.0):
        """A $JS.API request; returns the decoded reply, raising JsApiError
        when it carries an error."""
        data = b"" if req is None else json.dumps(req).encode()
        msg = self.request("$JS.API." + subject, data, timeout=timeout)
        reply = msg.json()
        if isinstance(reply, dict) and reply.get("error"):
            raise JsApiError(subject, reply["error"])
        return reply

    def stream_info(self, name, subjects_filter=None):
        req = {"subjects_filter": subjects_filter} if subjects_filter else None
        return self.js_api("STREAM.INFO." + name, req)

    def stream_names(self):
        return self.js_api("STREAM.NAMES", {"offset": 0}).get("streams") or []

    def stream_exists(self, name):
        try:
            self.stream_info(name)
            return True
        except JsApiError as e:
            if e.err_code == 10059 or e.code == 404:
                return False
            raise

    def add_stream(self, config):
        return self.js_api("STREAM.CREATE." + config["name"], config)

    def consumer_info(self, stream, durable):
        return self.js_api("CONSUMER.INFO.%s.%s" % (stream, durable))

    def consumer_names(self, stream):
        return self.js_api("CONSUMER.NAMES." + stream, {"offset": 0}).get("consumers") or []

    def stream_msg_get(self, stream, seq=None, last_by_subj=None):
        """The stored message: {"subject", "seq", "data" (bytes), "headers"
        ({name: [values]}), "time"}; None when there is no such message."""
        req = {"seq": seq} if seq is not None else {"last_by_subj": last_by_subj}
        try:
            reply = self.js_api("STREAM.MSG.GET." + stream, req)
        except JsApiError as e:
            if e.err_code == 10037 or e.code == 404 and "message" in e.description:
                return None
            raise
        m = reply["message"]
        headers = {}
        if m.get("hdrs"):
            headers, _, _ = parse_headers(base64.b64decode(m["hdrs"]))
        return {"subject": m["subject"], "seq": m["seq"],
                "data": base64.b64decode(m.get("data") or ""),
                "headers": headers, "time": m.get("time")}

    def stream_messages(self, stream):
        """Every stored message of a stream, in sequence order."""
        st = self.stream_info(stream)["state"]
        out = []
        if st.get("messages", 0) == 0:
            return out
        for seq in range(st["first_seq"], st["last_seq"] + 1):
            m = self.stream_msg_get(stream, seq)
            if m is not None:
                out.append(m)
        return out

    def all_dlq_messages(self, stream="JOBS_DLQ"):
        return self.stream_messages(stream)

    def pull(self, stream, durable, batch, expires=2.0, timeout=None):
        """One pull request on a durable (as a consumer process would send
        it): the job messages delivered before the request expires, without
        acknowledging them. Status replies (404/408/409) end the pull."""
        inbox = self.new_inbox()
        sub = self.subscribe(inbox)
        try:
            req = {"batch": batch, "expires": int(expires * 1e9)}
            self.publish("$JS.API.CONSUMER.MSG.NEXT.%s.%s" % (stream, durable),
                         json.dumps(req).encode(), reply=inbox)
            out = []
            deadline = time.monotonic() + (timeout or expires + 2.0)
            while len(out) < batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    m = sub.next_msg(left)
                except NatsTimeout:
                    break
                if m.status is not None:
                    if m.status == "100":
                        continue
                    break
                out.append(m)
            return out
        finally:
            self.unsubscribe(sub)

    def ack(self, msg, kind=b"+ACK", timeout=5.0):
        """Acknowledges a pulled message and waits for the server to confirm."""
        self.request(msg.reply, kind, timeout=timeout)

    def js_publish(self, subject, data, headers=None, timeout=5.0):
        """Publishes to a stream and returns the PubAck ({"stream", "seq",
        "duplicate"?}); raises JsApiError on a JetStream error and
        NoResponders when no stream holds the subject."""
        msg = self.request(subject, data, timeout=timeout, headers=headers)
        ack = msg.json()
        if ack.get("error"):
            raise JsApiError(subject, ack["error"])
        return ack


class _ResponseMux(Subscription):
    def _deliver(self, msg):
        token = msg.subject.rsplit(".", 1)[-1]
        with self.client._resp_lock:
            w = self.client._resp_waiters.get(token)
        if w is not None and w["msg"] is None:
            w["msg"] = msg
            w["event"].set()


def ack_metadata(reply):
    """Fields of a JetStream ack subject ($JS.ACK.<stream>.<consumer>.
    <delivered>.<sseq>.<cseq>.<ts>.<pending>, or the 11/12-token form with
    domain and account hash)."""
    t = reply.split(".")
    if len(t) == 9:
        t = t[:2] + ["", ""] + t[2:]
    if len(t) < 11 or t[0] != "$JS" or t[1] != "ACK":
        raise ValueError("not an ack subject: %r" % reply)
    return {"stream": t[4], "consumer": t[5], "delivered": int(t[6]), "stream_seq": int(t[7]),
            "consumer_seq": int(t[8]), "pending": int(t[10])}


def hval(headers, key):
    """First value of a header from a {name: [values]} dict, case-insensitive."""
    for k, v in headers.items():
        if k.lower() == key.lower():
            return v[0] if v else None
    return None


# ---------------------------------------------------------------------------
# jetfleet programs

def read_log_lines(proc_or_path):
    """The JSON lines of a program's stderr log (other lines are skipped)."""
    path = getattr(proc_or_path, "jf_log_path", proc_or_path)
    out = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    for raw in data.split(b"\n"):
        raw = raw.strip()
        if not raw.startswith(b"{"):
            continue
        try:
            obj = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def log_msgs(proc, msg):
    return [line for line in read_log_lines(proc) if line.get("msg") == msg]


class Programs:
    """Starts and tracks jetfleet processes of one test; everything they
    write to stderr goes to a log file in tmpdir."""

    def __init__(self, tmpdir, env=None):
        self.tmpdir = tmpdir
        self.env = dict(os.environ)
        # A developer's own environment must not change what a test runs.
        for k in list(self.env):
            if k.startswith("JETFLEET_") and k not in ("JETFLEET_BIN", "JETFLEET_SOURCE_DIR"):
                del self.env[k]
        self.env.update(env or {})
        self.procs = []
        self.logs = []
        self._counter = itertools.count(1)

    def start_consumer(self, config_path, *args, name=None, env=None, wait_ready=True,
                       ready_timeout=60):
        n = next(self._counter)
        name = name or "consumer-%d" % n
        log_path = os.path.join(self.tmpdir, "%s.log" % name)
        log = open(log_path, "wb")
        e = dict(self.env)
        e.update(env or {})
        cmd = [CONSUMER, "--config", config_path] + list(args)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=self.tmpdir, env=e)
        log.close()
        proc.jf_name = name
        proc.jf_log_path = log_path
        proc.jf_cmd = cmd
        self.procs.append(proc)
        self.logs.append((name, log_path))
        if wait_ready:
            wait_for(lambda: log_msgs(proc, "consumer ready"), ready_timeout,
                     "%s to log \"consumer ready\"" % name, interval=0.05, procs=[proc])
        return proc

    def run_publisher(self, args, input=None, timeout=120, env=None, check=None):
        """Runs jetfleet-publisher to completion: CompletedProcess with bytes
        stdout/stderr (the stderr also kept as a log file)."""
        n = next(self._counter)
        name = "publisher-%d" % n
        e = dict(self.env)
        e.update(env or {})
        if isinstance(input, str):
            input = input.encode("utf-8")
        cmd = [PUBLISHER] + list(args)
        cp = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=self.tmpdir, env=e, timeout=timeout,
                            stdin=None if input is not None else subprocess.DEVNULL)
        log_path = os.path.join(self.tmpdir, "%s.log" % name)
        with open(log_path, "wb") as f:
            f.write(b"$ " + " ".join(cmd).encode() + b"\n")
            f.write(b"--- exit %d\n--- stdout\n" % cp.returncode + cp.stdout)
            f.write(b"\n--- stderr\n" + cp.stderr)
        self.logs.append((name, log_path))
        if check is not None and cp.returncode != check:
            raise AssertionError("%s exited %d, expected %d\nstdout: %s\nstderr: %s" % (
                " ".join(cmd), cp.returncode, check, cp.stdout.decode(errors="replace"),
                cp.stderr.decode(errors="replace")))
        return cp

    def run_consumer_once(self, args, timeout=30, env=None):
        """Runs jetfleet-consumer expecting it to exit on its own (--help,
        bad config): CompletedProcess with bytes stdout/stderr."""
        e = dict(self.env)
        e.update(env or {})
        return subprocess.run([CONSUMER] + list(args), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.tmpdir,
                              env=e, timeout=timeout)

    def send_signal(self, proc, sig=signal.SIGTERM):
        """Sends sig once: a second SIGTERM tells the consumer to stop
        waiting for its jobs, so stop() does not repeat one sent here."""
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.jf_signalled = getattr(proc, "jf_signalled", set()) | {sig}

    def wait_exit(self, proc, timeout=60):
        """Its exit code, or None when it is still running after timeout."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, proc, sig=signal.SIGTERM, timeout=60):
        """Signals a process (unless sig was already sent) and waits; returns
        its exit code (None when it did not exit in time)."""
        if sig not in getattr(proc, "jf_signalled", set()):
            self.send_signal(proc, sig)
        return self.wait_exit(proc, timeout)

    def kill9(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def cleanup(self):
        for p in self.procs:
            if signal.SIGTERM not in getattr(p, "jf_signalled", set()):
                self.send_signal(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def sanitizer_reports(self):
        found = []
        for name, path in self.logs:
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            for marker in SANITIZER_MARKERS:
                if marker in text:
                    found.append((name, path, marker))
                    break
        return found


def publisher_json(cp):
    """The last JSON line of a publisher's stdout."""
    lines = [l for l in cp.stdout.decode("utf-8", "replace").splitlines() if l.strip()]
    if not lines:
        raise AssertionError("publisher printed nothing on stdout; stderr: %s" %
                             cp.stderr.decode(errors="replace"))
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise AssertionError("publisher stdout is not JSON: %r" % lines[-1])


# ---------------------------------------------------------------------------
# Test base

class JetfleetTestCase(unittest.TestCase):
    """Every test gets a temporary directory, its own nats-server -js, a
    client connected to it, and a Programs tracker. When a test fails, the
    tails of the server's and programs' logs are printed."""

    maxDiff = None

    def setUp(self):
        for path in (CONSUMER, PUBLISHER):
            if not os.access(path, os.X_OK):
                self.fail("%s is missing: build first (JETFLEET_BIN=%s)" % (path, BIN_DIR))
        self.tmp = tempfile.mkdtemp(prefix="jf-it-%s-" % self._testMethodName[:40])
        self.nats = NatsServer(self.tmp)
        try:
            self.nats.start()
            self.nc = NatsClient(self.nats.url)
        except BaseException:
            # tearDown does not run after a failed setUp.
            sys.stderr.write(tail(self.nats.log_path) + "\n")
            self.nats.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.progs = Programs(self.tmp, env={"JETFLEET_NATS_URL": self.nats.url})
        self.t0 = time.monotonic()

    def tearDown(self):
        failed = self._has_failed()
        try:
            self.progs.cleanup()
        finally:
            reports = self.progs.sanitizer_reports()
            if failed or reports or os.environ.get("JETFLEET_IT_VERBOSE"):
                self.dump_logs()
            self._stop_servers()
            if os.environ.get("JETFLEET_IT_KEEP") or failed or reports:
                sys.stderr.write("[%s] kept %s\n" % (self.id(), self.tmp))
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        if reports and not failed:
            self.fail("sanitizer report in " + ", ".join(
                "%s (%s)" % (name, marker) for name, _, marker in reports))

    def _stop_servers(self):
        """The servers of the test, once its programs are gone (a test case
        with other servers overrides this and borrows tearDown)."""
        try:
            self.nc.close()
        finally:
            self.nats.stop()

    def _has_failed(self):
        # unittest resets its success flag for each part (setUp, test,
        # tearDown), but records every failure in the result at once.
        result = getattr(getattr(self, "_outcome", None), "result", None)
        if result is None:
            return True
        for test, _ in list(getattr(result, "errors", [])) + list(getattr(result, "failures", [])):
            if test is self or getattr(test, "test_case", None) is self:
                return True
        return False

    def dump_logs(self, lines=60):
        out = ["", "=" * 70, "logs of %s (%s)" % (self.id(), self.tmp)]
        for name, path in self.progs.logs:
            out += ["--- %s: %s (last %d lines)" % (name, path, lines), tail(path, lines)]
        out += ["--- nats-server: %s (last 30 lines)" % self.nats.log_path,
                tail(self.nats.log_path, 30), "=" * 70, ""]
        sys.stderr.write("\n".join(out))
        sys.stderr.flush()

    # --- conveniences

    def config(self, **kw):
        return write_config(self.tmp, make_config(self.nats.url, **kw))

    def publish_batch(self, config_path, envelopes, name="jobs.ndjson", timeout=300):
        """Writes envelopes (dicts or raw bytes lines) as NDJSON and runs
        `jetfleet-publisher batch`; returns (CompletedProcess, summary dict)."""
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            for e in envelopes:
                line = e if isinstance(e, bytes) else json.dumps(e, separators=(",", ":")).encode()
                f.write(line + b"\n")
        cp = self.progs.run_publisher(["--config", config_path, "batch", path], timeout=timeout)
        return cp, publisher_json(cp)

    def durable_state(self, stream, durables):
        return {d: self.nc.consumer_info(stream, d) for d in durables}

    def wait_drained(self, durables, timeout, procs=(), stream="JOBS"):
        """Waits until every durable has nothing pending and nothing awaiting
        an ack; returns their consumer infos."""
        def drained():
            infos = self.durable_state(stream, durables)
            if all(i["num_pending"] == 0 and i["num_ack_pending"] == 0 for i in infos.values()):
                return infos
            return None
        return wait_for(drained, timeout, "durables %s to drain" % ", ".join(durables),
                        interval=0.2, procs=procs)

    def last_seq_of(self, subject, stream="JOBS"):
        m = self.nc.stream_msg_get(stream, last_by_subj=subject)
        return m["seq"] if m else 0

    def subject_counts(self, filt, stream="JOBS"):
        info = self.nc.stream_info(stream, subjects_filter=filt)
        return info["state"].get("subjects") or {}
