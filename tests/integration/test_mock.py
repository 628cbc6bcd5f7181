"""jetfleet-mock, the downstream HTTP service of the tests and run-local:
what a client sees (status, body, headers, timing) and what the mock counts
(/_mock/stats, --log), for every behaviour of its contract.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_mock
"""

import http.client
import json
import os
import re
import resource
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

from jfharness import BIN_DIR, SANITIZER_MARKERS, free_port, tail, wait_for

MOCK = os.path.join(BIN_DIR, "jetfleet-mock")
LISTENING_RE = re.compile(r"^listening on 127\.0\.0\.1:(\d+)$")


def envelope(job_id, payload=None):
    return {"id": job_id, "service": "llm", "type": "analyze",
            "created_at": "2026-01-01T00:00:00Z", "payload": payload if payload is not None else {}}


class Answer:
    def __init__(self, status, headers, body, elapsed):
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<%d %r after %.3fs>" % (self.status, self.body[:200], self.elapsed)


class Mock:
    """One jetfleet-mock process on a free loopback port (port 0: the mock
    picks it and says which on stdout), its stderr in a file."""

    def __init__(self, tmpdir, *args, port=0):
        self.stderr_path = os.path.join(tmpdir, "mock-%d.stderr" % id(self))
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([MOCK, "--listen", "127.0.0.1:%d" % port] + list(args),
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self.line = self._read_line(10)
        m = LISTENING_RE.match(self.line)
        if not m:
            self.stop(check=False)
            raise AssertionError("unexpected first line %r; stderr: %s" %
                                 (self.line, tail(self.stderr_path)))
        self.port = int(m.group(1))

    def _read_line(self, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no 'listening on' line within %ds; stderr: %s" %
                                     (timeout, tail(self.stderr_path)))
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1)
                if not chunk:
                    raise AssertionError("mock exited (code %s) before listening; stderr: %s" %
                                         (self.proc.wait(), tail(self.stderr_path)))
                buf += chunk
        return buf.decode().rstrip("\n")

    def stop(self, sig=signal.SIGTERM, check=True, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("mock did not stop within %ds of signal %d" % (timeout, sig))
        finally:
            self.proc.stdout.close()
            self._stderr.close()
        if check and rc != 0:
            raise AssertionError("mock exited with %s; stderr: %s" % (rc, tail(self.stderr_path)))
        return rc

    def sanitizer_report(self):
        with open(self.stderr_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return next((m for m in SANITIZER_MARKERS if m in text), None)

    # --- HTTP

    def request(self, method, path, body=None, headers=None, timeout=30, conn=None):
        own = conn is None
        if own:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        t0 = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return Answer(resp.status, resp, data, time.monotonic() - t0)
        finally:
            if own:
                conn.close()

    def call(self, job_id="job-1", payload=None, key=None, attempt=None, path="/analyze",
             timeout=30, conn=None, body=None):
        headers = {}
        if key is not None:
            headers["Idempotency-Key"] = key
        if attempt is not None:
            headers["Jetfleet-Attempt"] = str(attempt)
        if body is None:
            body = envelope(job_id, payload)
        return self.request("POST", path, body, headers, timeout=timeout, conn=conn)

    def stats(self):
        a = self.request("GET", "/_mock/stats")
        assert a.status == 200, a
        return a.json()

    def config(self, **options):
        return self.request("POST", "/_mock/config", options)


def read_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_next_second():
    """Returns the unix second that has just begun (with 50 ms to spare), so
    that a few quick calls land in it."""
    now = int(time.time())
    wait_for(lambda: time.time() >= now + 1.05, 3, "the next second", interval=0.01)
    return now + 1


def concurrently(n, fn):
    """Runs fn(i) in n threads released together; returns the results in
    order (an exception in a thread is re-raised here)."""
    results = [None] * n
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(timeout=30)
            results[i] = fn(i)
        except BaseException as e:  # noqa: B902 — handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


class MockTestCase(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        if not os.access(MOCK, os.X_OK):
            self.fail("%s is missing: build first (JETFLEET_BIN=%s)" % (MOCK, BIN_DIR))
        self.tmp = tempfile.mkdtemp(prefix="jf-mock-%s-" % self._testMethodName[:40])
        self.mocks = []

    def tearDown(self):
        reports = []
        for m in self.mocks:
            if m.proc.poll() is None:
                m.stop(check=False)
            r = m.sanitizer_report()
            if r:
                reports.append(r)
                sys.stderr.write("--- mock stderr:\n%s\n" % tail(m.stderr_path))
        shutil.rmtree(self.tmp, ignore_errors=True)
        if reports:
            self.fail("sanitizer report in the mock's stderr: %s" % reports)

    def start(self, *args, port=0):
        m = Mock(self.tmp, *args, port=port)
        self.mocks.append(m)
        return m

    def run_mock(self, *args, timeout=10):
        return subprocess.run([MOCK] + list(args), capture_output=True, timeout=timeout)


class TestStartAndOptions(MockTestCase):

    def test_listening_line_on_the_given_port_and_clean_exit_on_signals(self):
        port = free_port()
        m = self.start(port=port)
        self.assertEqual(m.line, "listening on 127.0.0.1:%d" % port)
        self.assertEqual(m.call().status, 200)
        self.assertEqual(m.stop(signal.SIGTERM), 0)

        m = self.start()
        self.assertNotEqual(m.port, 0, "port 0 is resolved to the port actually bound")
        self.assertEqual(m.call().status, 200)
        self.assertEqual(m.stop(signal.SIGINT), 0)

    def test_bad_options_exit_2_naming_the_option(self):
        cases = [
            ([], "--listen"),
            (["--listen", "example.invalid:80"], "--listen"),
            (["--listen", "127.0.0.1:70000"], "--listen"),
            (["--listen", "127.0.0.1:0", "--latency", "fast"], "--latency"),
            (["--listen", "127.0.0.1:0", "--latency", "2s-1s"], "--latency"),
            (["--listen", "127.0.0.1:0", "--latency", "exp:"], "--latency"),
            (["--listen", "127.0.0.1:0", "--error-rate", "1.5"], "--error-rate"),
            (["--listen", "127.0.0.1:0", "--timeout-rate", "-0.1"], "--timeout-rate"),
            (["--listen", "127.0.0.1:0", "--rate-limit-rate", "x"], "--rate-limit-rate"),
            (["--listen", "127.0.0.1:0", "--invalid-json-rate", ""], "--invalid-json-rate"),
            (["--listen", "127.0.0.1:0", "--retry-after", ""], "--retry-after"),
            (["--listen", "127.0.0.1:0", "--seed", "-3"], "--seed"),
            (["--listen", "127.0.0.1:0", "--status", "99"], "--status"),
            (["--listen", "127.0.0.1:0", "--error-rate", "0.6", "--timeout-rate", "0.6"],
             "more than 1"),
            (["--listen", "127.0.0.1:0", "--frobnicate"], "--frobnicate"),
            (["--listen", "127.0.0.1:0", "extra"], "extra"),
            (["--listen"], "--listen"),
        ]
        for args, named in cases:
            with self.subTest(args=args):
                cp = self.run_mock(*args)
                err = cp.stderr.decode()
                self.assertEqual(cp.returncode, 2, err)
                self.assertIn(named, err)
                self.assertEqual(cp.stdout, b"")

    def test_help_and_version(self):
        cp = self.run_mock("--help")
        self.assertEqual(cp.returncode, 0)
        out = cp.stdout.decode()
        for word in ("--listen", "--latency", "--error-rate", "--timeout-rate",
                     "--rate-limit-rate", "--retry-after", "--invalid-json-rate", "--log",
                     "--seed", "fail_first", "/_mock/stats"):
            self.assertIn(word, out)
        cp = self.run_mock("--version")
        self.assertEqual(cp.returncode, 0)
        self.assertRegex(cp.stdout.decode(), r"^jetfleet-mock \d+\.\d+\.\d+\n$")

    def test_port_in_use_is_a_runtime_error(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            cp = self.run_mock("--listen", "127.0.0.1:%d" % s.getsockname()[1])
        self.assertEqual(cp.returncode, 1)
        self.assertIn("cannot listen", cp.stderr.decode())
        self.assertIn("in use", cp.stderr.decode())

    def test_unwritable_log_file_is_a_usage_error(self):
        cp = self.run_mock("--listen", "127.0.0.1:0", "--log", os.path.join(self.tmp, "no/such"))
        self.assertEqual(cp.returncode, 2)
        self.assertIn("--log", cp.stderr.decode())


class TestCalls(MockTestCase):

    def test_call_answers_id_attempt_and_echo(self):
        m = self.start()
        payload = {"text": "tender", "n": [1, 2.5, None, True]}
        a = m.call("job-7", payload, key="job-7", attempt=3)
        self.assertEqual(a.status, 200)
        self.assertEqual(a.headers.getheader("Content-Type"), "application/json")
        self.assertEqual(a.json(), {"ok": True, "id": "job-7", "attempt": 3, "echo": payload})

        a = m.call("job-8", path="/v1/anything/else")
        self.assertEqual(a.json(), {"ok": True, "id": "job-8", "attempt": None, "echo": {}},
                         "any path is a call; no Jetfleet-Attempt is null")
        a = m.call(body=b"not an envelope")
        self.assertEqual((a.status, a.json()),
                         (200, {"ok": True, "id": None, "attempt": None, "echo": None}))

    def test_keep_alive_connection_serves_many_calls(self):
        m = self.start()
        conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
        try:
            for i in range(20):
                a = m.call("job-%d" % i, conn=conn)
                self.assertEqual(a.json()["id"], "job-%d" % i)
            sock = conn.sock
            self.assertIsNotNone(sock, "the connection stayed open")
        finally:
            conn.close()
        self.assertEqual(m.stats()["requests"], 20)

    def test_other_methods_and_admin_paths(self):
        m = self.start()
        a = m.request("GET", "/analyze")
        self.assertEqual(a.status, 405)
        self.assertEqual(a.headers.getheader("Allow"), "POST")
        self.assertEqual(m.request("GET", "/_mock/nothing").status, 404)
        a = m.request("POST", "/_mock/stats", {})
        self.assertEqual(a.status, 405)
        self.assertEqual(a.headers.getheader("Allow"), "GET")
        self.assertEqual(m.request("GET", "/_mock/reset").status, 405)
        self.assertEqual(m.stats()["requests"], 0, "only POST calls are counted")

    def test_request_body_limit(self):
        m = self.start()
        big = {"id": "big", "payload": {"blob": "x" * (1024 * 1024)}}
        a = m.call(body=big)
        self.assertEqual(a.status, 200)
        self.assertEqual(len(a.json()["echo"]["blob"]), 1024 * 1024)
        a = m.call(body=b"x" * (8 * 1024 * 1024 + 1))
        self.assertEqual(a.status, 413)
        self.assertFalse(a.json()["ok"])
        s = m.stats()
        self.assertEqual(s["by_status"], {"200": 1, "413": 1})
        self.assertEqual(s["in_flight"], 0)


class TestLatency(MockTestCase):

    def test_no_latency_is_fast(self):
        m = self.start()
        times = [m.call().elapsed for _ in range(20)]
        self.assertLess(sorted(times)[10], 0.05, times)

    def test_fixed_latency(self):
        m = self.start("--latency", "150ms")
        times = [a.elapsed for a in concurrently(10, lambda i: m.call("j%d" % i))]
        for t in times:
            self.assertGreaterEqual(t, 0.150, times)
            self.assertLess(t, 0.150 + 0.25, times)

    def test_uniform_range(self):
        m = self.start("--latency", "50ms-400ms", "--seed", "7")
        times = sorted(a.elapsed for a in concurrently(40, lambda i: m.call("j%d" % i)))
        self.assertGreaterEqual(times[0], 0.050, times)
        self.assertLess(times[-1], 0.400 + 0.25, times)
        # 40 uniform draws: the extremes land in the outer fifths almost surely.
        self.assertLess(times[0], 0.120, times)
        self.assertGreater(times[-1], 0.330, times)

    def test_exponential_mean(self):
        m = self.start("--latency", "exp:100ms", "--seed", "3",
                       "--log", os.path.join(self.tmp, "calls.log"))
        concurrently(50, lambda i: [m.call("j%d-%d" % (i, k)) for k in range(4)])
        lat = [json.loads(line)["latency_ms"] for line in read_lines(os.path.join(self.tmp,
                                                                                "calls.log"))]
        self.assertEqual(len(lat), 200)
        mean = sum(lat) / len(lat)
        # The mean of 200 exponential draws has a standard error of 7 ms.
        self.assertGreater(mean, 70, mean)
        self.assertLess(mean, 140, mean)
        self.assertGreater(max(lat), 250, "an exponential has a long tail")

    def test_config_changes_latency(self):
        m = self.start()
        a = m.config(latency="300ms")
        self.assertEqual(a.status, 200, a)
        self.assertEqual(a.json()["latency"], "300ms")
        self.assertGreaterEqual(m.call().elapsed, 0.300)
        self.assertEqual(m.config(latency=0).status, 200)
        self.assertLess(m.call().elapsed, 0.2)


class TestFailures(MockTestCase):

    def count_statuses(self, m, n, threads=5):
        def worker(i):
            conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
            out = []
            try:
                for k in range(n // threads):
                    a = m.call("j%d-%d" % (i, k), conn=conn)
                    out.append(a.status)
                    if a.headers.getheader("Connection", "").lower() == "close":
                        conn.close()
            finally:
                conn.close()
            return out

        statuses = [s for lst in concurrently(threads, worker) for s in lst]
        counts = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        return counts

    def test_error_rate(self):
        m = self.start("--error-rate", "0.2", "--seed", "11")
        counts = self.count_statuses(m, 500)
        self.assertEqual(sum(counts.values()), 500)
        self.assertEqual(set(counts), {200, 503}, counts)
        # Binomial(500, 0.2): mean 100, standard deviation 9.
        self.assertGreater(counts[503], 65, counts)
        self.assertLess(counts[503], 135, counts)
        s = m.stats()
        self.assertEqual(s["by_status"], {str(k): v for k, v in counts.items()})
        self.assertEqual(s["requests"], 500)

    def test_rate_limit_with_retry_after(self):
        m = self.start("--rate-limit-rate", "1", "--retry-after", "7")
        a = m.call()
        self.assertEqual(a.status, 429)
        self.assertEqual(a.headers.getheader("Retry-After"), "7")
        self.assertFalse(a.json()["ok"])

        date = "Wed, 21 Oct 2026 07:28:00 GMT"
        self.assertEqual(m.config(retry_after=date).status, 200)
        self.assertEqual(m.call().headers.getheader("Retry-After"), date)

        m2 = self.start("--rate-limit-rate", "0.5", "--seed", "5")
        answers = [m2.call() for _ in range(100)]
        limited = [a for a in answers if a.status == 429]
        self.assertTrue(20 < len(limited) < 80, len(limited))
        self.assertEqual({a.headers.getheader("Retry-After") for a in limited}, {"1"},
                         "Retry-After defaults to 1")
        self.assertEqual({a.headers.getheader("Retry-After") for a in answers
                          if a.status == 200}, {None})

    def test_invalid_json_answers(self):
        m = self.start("--invalid-json-rate", "1")
        a = m.call()
        self.assertEqual(a.status, 200)
        self.assertEqual(a.headers.getheader("Content-Type"), "application/json")
        with self.assertRaises(ValueError):
            json.loads(a.body)

    def test_timeout_holds_until_the_client_gives_up(self):
        log = os.path.join(self.tmp, "calls.log")
        m = self.start("--timeout-rate", "1", "--log", log)
        t0 = time.monotonic()
        with self.assertRaises((socket.timeout, TimeoutError)):
            m.call("held", key="held", attempt=1, timeout=1)
        self.assertGreaterEqual(time.monotonic() - t0, 1.0)
        # The client closed its socket: the held call leaves in_flight.
        s = wait_for(lambda: (lambda s: s if s["in_flight"] == 0 else None)(m.stats()), 5,
                     "in_flight back to 0 after the client left")
        self.assertEqual(s["requests"], 1)
        self.assertEqual(s["peak_in_flight"], 1)
        self.assertEqual(s["unanswered"], 1)
        self.assertEqual(s["by_status"], {})
        lines = wait_for(lambda: read_lines(log), 5, "the log line of the held call")
        self.assertEqual(len(lines), 1, lines)
        entry = json.loads(lines[0])
        self.assertEqual((entry["key"], entry["attempt"], entry["status"]), ("held", 1, 0))
        # The client's second started before the mock had the whole request.
        self.assertGreaterEqual(entry["latency_ms"], 900)

    def test_held_call_counts_in_flight_while_held(self):
        m = self.start("--timeout-rate", "1")
        socks = []
        try:
            for i in range(3):
                s = socket.create_connection(("127.0.0.1", m.port), timeout=5)
                body = json.dumps(envelope("h%d" % i)).encode()
                s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                socks.append(s)
            wait_for(lambda: m.stats()["in_flight"] == 3, 5, "3 held calls in flight")
            r, _, _ = select.select(socks, [], [], 1.0)
            self.assertEqual(r, [], "a held call gets no answer")
            socks.pop().close()
            wait_for(lambda: m.stats()["in_flight"] == 2, 5, "in_flight 2 after one client left")
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: m.stats()["in_flight"] == 0, 5, "in_flight 0 after all clients left")
        self.assertEqual(m.stats()["peak_in_flight"], 3)


class TestDirectives(MockTestCase):

    def test_status_directive(self):
        m = self.start()
        for _ in range(3):
            a = m.call(payload={"mock": {"status": 400}})
            self.assertEqual(a.status, 400)
            self.assertFalse(a.json()["ok"])
        a = m.call(payload={"mock": {"status": 201}})
        self.assertEqual((a.status, a.json()["ok"]), (201, True))

    def test_fail_first_counts_per_idempotency_key(self):
        m = self.start()
        d = {"mock": {"fail_first": 2}}
        self.assertEqual([m.call("a", d, key="a", attempt=n).status for n in (1, 2, 3, 4)],
                         [503, 503, 200, 200])
        self.assertEqual([m.call("b", d, key="b").status for _ in range(3)], [503, 503, 200],
                         "another key has its own count")
        # Without the header the envelope id stands in for the key.
        self.assertEqual([m.call("c", d).status for _ in range(3)], [503, 503, 200])
        self.assertEqual(m.stats()["by_key"], {"a": 4, "b": 3, "c": 3})

    def test_fail_first_with_status_and_retry_after(self):
        m = self.start()
        d = {"mock": {"fail_first": 2, "status": 429, "retry_after": "2"}}
        answers = [m.call("r", d, key="r") for _ in range(3)]
        self.assertEqual([a.status for a in answers], [429, 429, 200])
        self.assertEqual([a.headers.getheader("Retry-After") for a in answers], ["2", "2", None])

    def test_latency_body_invalid_json_and_timeout_directives(self):
        m = self.start()
        a = m.call(payload={"mock": {"latency": "300ms"}})
        self.assertEqual(a.status, 200)
        self.assertGreaterEqual(a.elapsed, 0.300)
        self.assertLess(m.call().elapsed, 0.2, "the latency was for that call only")

        body = {"result": {"label": "tender", "score": 0.9}, "model": "mock"}
        a = m.call(payload={"mock": {"body": body}})
        self.assertEqual((a.status, a.json()), (200, body))

        a = m.call(payload={"mock": {"invalid_json": True}})
        self.assertEqual(a.status, 200)
        with self.assertRaises(ValueError):
            json.loads(a.body)

        with self.assertRaises((socket.timeout, TimeoutError)):
            m.call(payload={"mock": {"timeout": True}}, timeout=0.5)

    def test_directives_override_global_options(self):
        m = self.start("--error-rate", "1", "--latency", "1s")
        a = m.call("f", {"mock": {"fail_first": 1, "latency": 0}}, key="f")
        self.assertEqual(a.status, 503)
        self.assertLess(a.elapsed, 0.5)
        a = m.call("f", {"mock": {"fail_first": 1, "latency": "0"}}, key="f")
        self.assertEqual(a.status, 200, "past fail_first the global error rate does not apply")
        self.assertEqual(m.call(payload={"mock": {"body": {"x": 1}, "latency": 0}}).json(),
                         {"x": 1})
        m.config(status=503, latency=0)
        self.assertEqual(m.call(payload={"mock": {"status": 404}}).status, 404)
        self.assertEqual(m.call(payload={"mock": {"latency": 0}}).status, 503,
                         "a latency directive alone keeps the global outcome")

    def test_bad_directive_is_a_400_naming_it(self):
        m = self.start()
        for mock, named in (({"stauts": 400}, "stauts"), ({"status": "400"}, "status"),
                            ({"latency": "soon"}, "latency"), ({"fail_first": -1}, "fail_first"),
                            ("x", "payload.mock")):
            with self.subTest(mock=mock):
                a = m.call(payload={"mock": mock})
                self.assertEqual(a.status, 400)
                self.assertIn(named, a.json()["error"])


class TestStats(MockTestCase):

    def test_peak_in_flight_of_50_concurrent_calls(self):
        m = self.start("--latency", "300ms")
        t0 = time.monotonic()
        answers = concurrently(50, lambda i: m.call("j%d" % i, key="j%d" % i))
        wall = time.monotonic() - t0
        self.assertEqual([a.status for a in answers], [200] * 50)
        self.assertLess(wall, 3.0, "50 calls of 300 ms were served concurrently")
        s = m.stats()
        self.assertEqual(s["requests"], 50)
        self.assertEqual(s["peak_in_flight"], 50)
        self.assertEqual(s["in_flight"], 0)
        self.assertEqual(s["by_status"], {"200": 50})
        self.assertEqual(s["by_key"], {"j%d" % i: 1 for i in range(50)})

    def test_in_flight_while_calls_wait(self):
        m = self.start("--latency", "1s")
        done = []
        t = threading.Thread(target=lambda: done.append(
            concurrently(5, lambda i: m.call("j%d" % i))))
        t.start()
        try:
            s = wait_for(lambda: (lambda s: s if s["in_flight"] == 5 else None)(m.stats()), 5,
                         "5 calls in flight")
            self.assertEqual(s["requests"], 5)
        finally:
            t.join(30)
        self.assertEqual([a.status for a in done[0]], [200] * 5)
        self.assertEqual(m.stats()["in_flight"], 0)

    def test_per_second_and_by_key(self):
        m = self.start()
        before = int(time.time())
        for i in range(12):
            m.call("k%d" % (i % 3), key="k%d" % (i % 3))
        after = int(time.time())
        s = m.stats()
        self.assertEqual(s["by_key"], {"k0": 4, "k1": 4, "k2": 4})
        secs = {int(k): v for k, v in s["per_second"].items()}
        self.assertEqual(sum(secs.values()), 12)
        for sec in secs:
            self.assertTrue(before <= sec <= after, (before, sec, after))

    def test_per_second_spreads_over_seconds(self):
        m = self.start()
        first = wait_next_second()
        for _ in range(3):
            m.call()
        second = wait_next_second()
        for _ in range(5):
            m.call()
        secs = {int(k): v for k, v in m.stats()["per_second"].items()}
        self.assertEqual(secs, {first: 3, second: 5})

    def test_reset_zeroes_counters(self):
        m = self.start()
        concurrently(4, lambda i: m.call("j%d" % i, key="j%d" % i))
        m.call(payload={"mock": {"status": 500}})
        self.assertEqual(m.stats()["requests"], 5)
        a = m.request("POST", "/_mock/reset", {})
        self.assertEqual(a.status, 200)
        s = m.stats()
        self.assertEqual((s["requests"], s["in_flight"], s["peak_in_flight"], s["by_status"],
                          s["per_second"], s["by_key"]), (0, 0, 0, {}, {}, {}))
        m.call(key="j0", payload={"mock": {"fail_first": 1}})
        self.assertEqual(m.stats()["by_key"], {"j0": 1}, "fail_first counts restart too")


class TestConfig(MockTestCase):

    def test_503_storm_on_and_off(self):
        m = self.start()
        self.assertEqual(m.call().status, 200)
        a = m.config(status=503)
        self.assertEqual(a.status, 200)
        self.assertEqual(a.json()["status"], 503)
        self.assertEqual([m.call().status for _ in range(10)], [503] * 10)
        self.assertEqual(m.request("GET", "/_mock/config").json()["status"], 503)
        self.assertEqual(m.config(status=None).status, 200)
        self.assertEqual([m.call().status for _ in range(5)], [200] * 5)
        self.assertEqual(m.stats()["by_status"], {"200": 6, "503": 10})

        self.assertEqual(m.config(error_rate=1).status, 200)
        self.assertEqual(m.call().status, 503)
        self.assertEqual(m.config(error_rate=0).status, 200)
        self.assertEqual(m.call().status, 200)

    def test_config_round_trip_and_rejections(self):
        m = self.start("--latency", "50ms-2s", "--retry-after", "3")
        cfg = m.request("GET", "/_mock/config").json()
        self.assertEqual(cfg, {"latency": "50ms-2s", "error_rate": 0, "timeout_rate": 0,
                               "rate_limit_rate": 0, "invalid_json_rate": 0,
                               "retry_after": "3", "status": 0})
        for bad, named in (({"error_rate": 2}, "error_rate"), ({"latency": "fast"}, "latency"),
                           ({"colour": "red"}, "colour"), ({"status": 42}, "status"),
                           ({"retry_after": "a\r\nb"}, "retry_after"),
                           ({"error_rate": 0.7, "timeout_rate": 0.7}, "more than 1")):
            with self.subTest(bad=bad):
                a = m.config(**bad)
                self.assertEqual(a.status, 400)
                self.assertIn(named, a.json()["error"])
        a = m.request("POST", "/_mock/config", b"[1]")
        self.assertEqual(a.status, 400)
        # A rejected update changes nothing, not even its valid parts.
        self.assertEqual(m.config(error_rate=0.5, latency="soon").status, 400)
        self.assertEqual(m.request("GET", "/_mock/config").json(), cfg)


class TestLog(MockTestCase):

    def test_one_json_line_per_call(self):
        log = os.path.join(self.tmp, "calls.log")
        m = self.start("--latency", "100ms", "--log", log)
        t0 = time.time()
        m.call("a", key="a", attempt=1)
        m.call("a", {"mock": {"status": 429}}, key="a", attempt=2)
        m.call(body=b"{}")  # no key at all
        lines = wait_for(lambda: (lambda ls: ls if len(ls) == 3 else None)(read_lines(log)), 5,
                         "3 log lines")
        entries = [json.loads(line) for line in lines]
        for e in entries:
            self.assertEqual(set(e), {"ts_ms", "key", "attempt", "status", "latency_ms"})
            self.assertLess(abs(e["ts_ms"] / 1000 - t0), 60)
            self.assertGreaterEqual(e["latency_ms"], 100)
        self.assertEqual([(e["key"], e["attempt"], e["status"]) for e in entries],
                         [("a", 1, 200), ("a", 2, 429), (None, None, 200)])
        self.assertLessEqual(entries[0]["ts_ms"], entries[1]["ts_ms"])
        m.stop()
        m2 = self.start("--log", log)
        m2.call("b", key="b")
        lines = wait_for(lambda: (lambda ls: ls if len(ls) == 4 else None)(read_lines(log)), 5,
                         "a 4th line appended")
        self.assertEqual(json.loads(lines[3])["key"], "b")


class TestScale(MockTestCase):

    def test_1000_concurrent_delayed_calls_on_one_mock(self):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        n = min(1000, soft - 64)
        if n < 200:
            self.skipTest("open-file limit %d too low" % soft)
        m = self.start("--latency", "1s")
        body = json.dumps(envelope("j")).encode()
        req = (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        socks = []
        got = {}
        t0 = time.monotonic()
        try:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
                s.sendall(req)
                socks.append(s)
            poller = select.poll()
            by_fd = {s.fileno(): s for s in socks}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                for fd, _ in poller.poll(1000):
                    data = by_fd[fd].recv(65536)
                    got[fd] = got.get(fd, b"") + data
                    if b"\r\n\r\n" in got[fd] and got[fd].endswith(b"}") or not data:
                        poller.unregister(fd)
            wall = time.monotonic() - t0
        finally:
            for s in socks:
                s.close()
        self.assertEqual(len(got), n)
        self.assertEqual(sum(1 for v in got.values() if v.startswith(b"HTTP/1.1 200")), n)
        self.assertLess(wall, 10, "1000 calls of 1 s were held at once, not one after another")
        s = m.stats()
        self.assertEqual(s["peak_in_flight"], n)
        self.assertEqual(s["by_status"], {"200": n})

    def test_stop_with_calls_held_and_waiting(self):
        m = self.start("--timeout-rate", "0.5", "--latency", "5s", "--seed", "1")
        socks = []
        try:
            for i in range(20):
                s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
                body = json.dumps(envelope("j%d" % i)).encode()
                s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" %
                          (len(body), body))
                socks.append(s)
            wait_for(lambda: m.stats()["in_flight"] == 20, 5, "20 calls in flight")
            t0 = time.monotonic()
            self.assertEqual(m.stop(), 0)
            self.assertLess(time.monotonic() - t0, 3, "stopping does not wait for held calls")
        finally:
            for s in socks:
                s.close()


if __name__ == "__main__":
    unittest.main()
