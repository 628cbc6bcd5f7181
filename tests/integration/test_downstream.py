"""Downstream services against real servers: a real nats-server -js per
test, real jetfleet-mock HTTP services on free ports, and where the ledger
is involved a real PostgreSQL (pgharness). Retries and backoff, dead letters
counted at the mock, Retry-After, circuit breakers, the fleet-wide in-flight
cap and rate limit, kill -9 and a PostgreSQL restart with the ledger on.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_downstream
"""

import http.server
import json
import os
import signal
import subprocess
import threading
import time
import unittest
import urllib.request

import pgharness
from jfharness import (BIN_DIR, envelope, free_port, hval, log_msgs, make_config, read_log_lines,
                       tail, wait_for, write_config)
from test_fleet import PRIORITIES, FleetTestCase

MOCK = os.path.join(BIN_DIR, "jetfleet-mock")


def enc(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def durables_of(service):
    return tuple("%s-%s" % (service, p) for p in PRIORITIES)


def max_in_window(ts_ms, window_ms=1000):
    """The most timestamps found in any window [t, t + window_ms), and where
    it starts. A window holding the most calls can always be slid to start at
    one of them, so looking at those starts covers every window."""
    ts = sorted(ts_ms)
    best, at, j = 0, None, 0
    for i, t in enumerate(ts):
        while j < len(ts) and ts[j] < t + window_ms:
            j += 1
        if j - i > best:
            best, at = j - i, t
    return best, at


# ---------------------------------------------------------------------------
# jetfleet-mock

class Mock:
    """One jetfleet-mock on a free loopback port, its stdout/stderr kept in
    <name>.out and its request log in <name>.calls.ndjson."""

    def __init__(self, tmpdir, name, args=()):
        self.tmpdir = tmpdir
        self.name = name
        self.args = list(args)
        self.out_path = os.path.join(tmpdir, "%s.out" % name)
        self.log_path = os.path.join(tmpdir, "%s.calls.ndjson" % name)
        self.port = None
        self.proc = None

    def start(self, timeout=20):
        if not os.access(MOCK, os.X_OK):
            raise AssertionError("%s is missing: build first (JETFLEET_BIN=%s)" % (MOCK, BIN_DIR))
        for _ in range(3):
            self.port = free_port()
            out = open(self.out_path, "ab")
            cmd = [MOCK, "--listen", "127.0.0.1:%d" % self.port, "--log", self.log_path] + self.args
            out.write(b"$ " + " ".join(cmd).encode() + b"\n")
            out.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
            out.close()
            self.proc.jf_name = self.name
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if ("listening on 127.0.0.1:%d" % self.port) in self._out():
                    return self
                time.sleep(0.02)
            # The port may have been taken between free_port() and the bind.
            self._kill()
        raise AssertionError("jetfleet-mock did not print \"listening on\":\n" + tail(self.out_path))

    def _out(self):
        try:
            with open(self.out_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def url(self, path="/call"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def _admin(self, method, path, body=None, timeout=5):
        data = None if body is None else enc(body)
        req = urllib.request.Request(self.url(path), data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode("utf-8")
            if r.status != 200:
                raise AssertionError("%s %s: HTTP %d %s" % (method, path, r.status, text))
            return json.loads(text) if text.strip() else None

    def stats(self):
        return self._admin("GET", "/_mock/stats")

    def configure(self, **options):
        self._admin("POST", "/_mock/config", options)

    def reset(self):
        self._admin("POST", "/_mock/reset", {})

    def calls(self):
        """The request log: one dict per call, in log order."""
        out = []
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return out
        for raw in data.split(b"\n"):
            raw = raw.strip()
            if raw.startswith(b"{"):
                try:
                    out.append(json.loads(raw.decode("utf-8")))
                except ValueError:
                    pass  # a line being written right now
        return out

    def stop(self, timeout=10):
        """SIGTERM (the log is complete afterwards) and wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


class Recorder:
    """A tiny HTTP service (Python's http.server) that records every POST's
    headers and body and answers 200 with a fixed JSON body: the one way to
    see what the consumer really sends (the mock's log keeps no headers)."""

    def __init__(self, answer):
        self.requests = []
        lock = self.lock = threading.Lock()
        requests = self.requests
        body = enc(answer)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                with lock:
                    requests.append({"path": self.path, "headers": dict(self.headers.items()),
                                     "body": data})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/call"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def snapshot(self):
        with self.lock:
            return list(self.requests)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------
# Base

class DownstreamTestCase(FleetTestCase):
    """FleetTestCase plus mocks and, on demand, a PostgreSQL server; their
    output joins the logs printed when a test fails."""

    def setUp(self):
        super().setUp()
        self.mocks = []
        self.recorders = []
        self.pg = None

    def tearDown(self):
        try:
            for m in self.mocks:
                m.stop()
            for r in self.recorders:
                r.stop()
        finally:
            try:
                super().tearDown()
            finally:
                if self.pg is not None:
                    self.pg.cleanup()

    def start_mock(self, *args, name=None):
        m = Mock(self.tmp, name or "mock-%d" % (len(self.mocks) + 1), args)
        self.mocks.append(m)
        self.progs.logs.append((m.name, m.out_path))
        m.start()
        return m

    def start_recorder(self, answer):
        r = Recorder(answer)
        self.recorders.append(r)
        return r

    def start_postgres(self):
        ok, why = pgharness.available()
        if not ok:
            self.skipTest("no PostgreSQL: " + why)
        pg = pgharness.PostgresServer()
        self.pg = pg
        self.progs.logs.append(("postgresql", pg.log_path))
        pg.start()
        return pg

    def http_service(self, mock_or_url, **keys):
        s = {"kind": "http", "url": mock_or_url if isinstance(mock_or_url, str) else mock_or_url.url(),
             "timeout": "5s", "max_deliver": 5, "backoff": "200ms"}
        s.update(keys)
        return s

    def ds_config(self, services, max_in_flight=64, ledger=False, **consumer):
        c = {"max_in_flight": max_in_flight, "stats_interval": "200ms"}
        c.update(consumer)
        extra = ""
        if ledger:
            extra = "[postgres]\ndsn = %s\n" % self.pg.dsn()
        return write_config(self.tmp, make_config(self.nats.url, consumer=c, services=services,
                                                  extra=extra))

    def publish_one(self, service, job_id, payload, priority="normal", type_="t"):
        body = enc(envelope(job_id, service=service, type_=type_, priority=priority,
                            payload=payload))
        subject = "jobs.%s.%s.%s" % (service, priority, type_)
        seq = self.nc.js_publish(subject, body, headers={"Nats-Msg-Id": job_id})["seq"]
        return seq, subject, body

    def publish_jobs(self, cfg, jobs, name="jobs.ndjson"):
        cp, summary = self.publish_batch(cfg, jobs, name=name)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual((summary["published"], summary["duplicates"], summary["invalid"],
                          summary["failed"]), (len(jobs), 0, 0, 0), summary)
        return summary

    def start_consumers(self, cfg, n, env=None, name_prefix="consumer"):
        procs = [self.progs.start_consumer(cfg, name="%s-%d" % (name_prefix, i + 1), env=env,
                                           wait_ready=False) for i in range(n)]
        for p in procs:
            wait_for(lambda p=p: log_msgs(p, "consumer ready"), 60, "%s ready" % p.jf_name,
                     procs=procs)
        return procs

    def calls_by_key(self, mock):
        out = {}
        for c in mock.calls():
            out.setdefault(c.get("key"), []).append(c)
        return out

    def ledger_rows(self, job_id):
        """[(job_id, status, attempts, result, error)] of one job."""
        rows = self.pg.query("SELECT job_id, status, attempts, result, error FROM jetfleet_jobs "
                             "WHERE job_id = '%s'" % job_id.replace("'", "''"))
        return [(r[0], r[1], int(r[2]), None if r[3] is None else json.loads(r[3]), r[4])
                for r in rows]

    def ledger_counts(self):
        """(rows, distinct job ids, succeeded, not succeeded)."""
        r = self.pg.query("SELECT count(*), count(DISTINCT job_id), "
                          "count(*) FILTER (WHERE status = 'succeeded'), "
                          "count(*) FILTER (WHERE status <> 'succeeded') FROM jetfleet_jobs")
        return tuple(int(x) for x in r[0])

    def assert_no_dead_letters(self, procs):
        self.assertEqual(self.dlq_count(), 0, "dead letters: %r" % [
            (hval(m["headers"], "Jetfleet-Reason"), hval(m["headers"], "Jetfleet-Error"))
            for m in self.nc.all_dlq_messages()[:5]])
        for p in procs:
            self.assertEqual(log_msgs(p, "dead-lettered"), [], p.jf_name)


# ---------------------------------------------------------------------------
# kind = http: one job at a time

class TestHttpJobs(DownstreamTestCase):

    def test_retries_with_backoff_then_success_ledger(self):
        self.start_postgres()
        mock = self.start_mock()
        cfg = self.ds_config({"svc": self.http_service(mock, max_deliver=5, backoff="200ms")},
                             ledger=True)
        proc = self.progs.start_consumer(cfg)
        payload = {"mock": {"fail_first": 2}, "n": 7}
        t0 = time.monotonic()
        seq, _, _ = self.publish_one("svc", "r-1", payload)

        infos = self.wait_drained(durables_of("svc"), 30, procs=[proc])
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(infos["svc-normal"]["ack_floor"]["stream_seq"], seq)
        self.assert_no_dead_letters([proc])

        stats = mock.stats()
        self.assertEqual(stats["by_key"].get("r-1"), 3, "calls at the mock: %r" % stats["by_key"])
        self.assertEqual(stats["by_status"].get("503"), 2, stats["by_status"])
        self.assertEqual(stats["by_status"].get("200"), 1, stats["by_status"])
        mock.stop()
        calls = self.calls_by_key(mock).get("r-1", [])
        # Idempotency-Key and Jetfleet-Attempt arrive: the mock logs both.
        self.assertEqual([(c.get("attempt"), c.get("status")) for c in calls],
                         [(1, 503), (2, 503), (3, 200)], calls)

        rows = self.ledger_rows("r-1")
        self.assertEqual(len(rows), 1, rows)
        job_id, status, attempts, result, error = rows[0]
        self.assertEqual((status, attempts), ("succeeded", 3), rows[0])
        self.assertEqual(result, {"ok": True, "id": "r-1", "attempt": 3, "echo": payload},
                         "the ledger's result must be the mock's answer")
        self.assertEqual(self.ledger_counts(), (1, 1, 1, 0))
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("dead"), stopped.get("retried")),
                         (1, 0, 2), stopped)
        gaps = [calls[i + 1]["ts_ms"] - calls[i]["ts_ms"] for i in range(2)]
        print("\n[retry] fail_first=2: 3 calls (503, 503, 200), gaps %s ms, ledger succeeded "
              "attempts=3, %.2fs" % (gaps, elapsed))

    def test_poison_job_dead_lettered_after_max_deliver_calls(self):
        for ledger in (False, True):
            with self.subTest(ledger=ledger):
                self._poison(ledger)

    def _poison(self, ledger):
        if ledger and self.pg is None:
            self.start_postgres()
        mock = self.start_mock(name="mock-ledger" if ledger else "mock")
        svc = "poisonl" if ledger else "poison"
        cfg = self.ds_config({svc: self.http_service(mock, max_deliver=4, backoff="100ms")},
                             ledger=ledger)
        proc = self.progs.start_consumer(cfg, name="consumer-%s" % svc)
        job_id = "%s-1" % svc
        seq, subject, body = self.publish_one(svc, job_id, {"mock": {"status": 503}})
        wait_for(lambda: seq in self.dlq_by_seq(), 30, "%s dead-lettered" % job_id, procs=[proc])
        self.wait_drained(durables_of(svc), 30, procs=[proc])

        dls = self.dlq_by_seq()[seq]
        self.assertEqual(len(dls), 1)
        self.assert_dead_letter(dls[0], "max_deliveries", seq, subject, body, deliveries="4")
        self.assertIn("503", hval(dls[0]["headers"], "Jetfleet-Error"))
        self.assertEqual(mock.stats()["by_key"].get(job_id), 4,
                         "a poison job gets exactly max_deliver calls")
        lines = log_msgs(proc, "dead-lettered")
        self.assertEqual([(l.get("job_id"), l.get("reason")) for l in lines],
                         [(job_id, "max_deliveries")])
        if ledger:
            rows = self.ledger_rows(job_id)
            self.assertEqual([(r[1], r[2]) for r in rows], [("dead", 4)], rows)
            self.assertIn("503", rows[0][4] or "")
        self.stop_consumer(proc)
        print("\n[poison%s] status 503 always, max_deliver=4: 4 calls, dead-lettered "
              "max_deliveries, Jetfleet-Deliveries 4" % (" +ledger" if ledger else ""))

    def test_400_dead_lettered_permanent_after_one_call(self):
        mock = self.start_mock()
        cfg = self.ds_config({"svc": self.http_service(mock, max_deliver=5, backoff="100ms")})
        proc = self.progs.start_consumer(cfg)
        seq, subject, body = self.publish_one("svc", "bad-1", {"mock": {"status": 400}})
        ok_seq, _, _ = self.publish_one("svc", "good-1", {"x": 1})
        wait_for(lambda: seq in self.dlq_by_seq(), 30, "bad-1 dead-lettered", procs=[proc])
        infos = self.wait_drained(durables_of("svc"), 30, procs=[proc])
        self.assertGreaterEqual(infos["svc-normal"]["ack_floor"]["stream_seq"], ok_seq)
        dls = self.dlq_by_seq()
        self.assertEqual(sorted(dls), [seq], "only bad-1 may be dead")
        self.assert_dead_letter(dls[seq][0], "permanent", seq, subject, body, deliveries="1")
        self.assertIn("400", hval(dls[seq][0]["headers"], "Jetfleet-Error"))
        by_key = mock.stats()["by_key"]
        self.assertEqual((by_key.get("bad-1"), by_key.get("good-1")), (1, 1), by_key)
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("dead"), stopped.get("retried")),
                         (1, 1, 0), stopped)
        print("\n[400] dead-lettered permanent after 1 call")

    def test_429_retry_after_honoured(self):
        mock = self.start_mock()
        cfg = self.ds_config({"svc": self.http_service(mock, max_deliver=5, backoff="100ms")})
        proc = self.progs.start_consumer(cfg)
        payload = {"mock": {"fail_first": 1, "status": 429, "retry_after": "2"}}
        seq, _, _ = self.publish_one("svc", "ra-1", payload)
        wait_for(lambda: mock.stats()["by_key"].get("ra-1") == 2, 30, "the second call of ra-1",
                 procs=[proc])
        self.wait_drained(durables_of("svc"), 30, procs=[proc])
        self.assert_no_dead_letters([proc])
        mock.stop()
        calls = self.calls_by_key(mock).get("ra-1", [])
        self.assertEqual([(c["attempt"], c["status"]) for c in calls], [(1, 429), (2, 200)], calls)
        gap = calls[1]["ts_ms"] - calls[0]["ts_ms"]
        # Millisecond timestamps: each may be truncated by up to 1 ms.
        self.assertGreaterEqual(gap, 1999, "Retry-After: 2 must hold the retry back 2 s, "
                                "backoff is only 100ms")
        self.assertLess(gap, 6000, "the retry should come soon after Retry-After ends")
        # A 429 is the service asking for patience, not a fault: no breaker trip.
        self.assertEqual([l for l in log_msgs(proc, "breaker state") if l.get("state") == "open"],
                         [])
        self.stop_consumer(proc)
        print("\n[429] Retry-After: 2 with backoff 100ms: second call %d ms after the first" % gap)

    def test_http_headers_auth_and_result_required(self):
        secret = "Bearer jf-s3cr3t-%d-do-not-log" % os.getpid()
        rec = self.start_recorder({"score": 5, "why": "ok"})
        mock = self.start_mock()
        services = {
            "rec": self.http_service(rec.url("/score"), auth_header_env="JF_TEST_AUTH",
                                     result_required="score"),
            "shape": self.http_service(mock, result_required="score", max_deliver=3,
                                       backoff="100ms"),
        }
        cfg = self.ds_config(services)
        proc = self.progs.start_consumer(cfg, "--log-level", "debug",
                                         env={"JF_TEST_AUTH": "Authorization: " + secret})
        _, _, rec_body = self.publish_one("rec", "h-1", {"q": "héllo"})
        bad_seq, bad_subject, bad_body = self.publish_one(
            "shape", "shape-bad", {"mock": {"body": {"other": 1}}})
        good_seq, _, _ = self.publish_one("shape", "shape-good", {"mock": {"body": {"score": 0.5}}})

        wait_for(lambda: bad_seq in self.dlq_by_seq(), 30, "shape-bad dead-lettered", procs=[proc])
        infos = self.wait_drained(durables_of("rec") + durables_of("shape"), 30, procs=[proc])
        self.assertGreaterEqual(infos["shape-normal"]["ack_floor"]["stream_seq"], good_seq)

        reqs = rec.snapshot()
        self.assertEqual(len(reqs), 1, reqs)
        r = reqs[0]
        h = {k.lower(): v for k, v in r["headers"].items()}
        self.assertEqual(r["path"], "/score")
        self.assertEqual(r["body"], rec_body, "the body is the envelope as published")
        self.assertTrue(h.get("content-type", "").startswith("application/json"), h)
        self.assertEqual(h.get("idempotency-key"), "h-1", h)
        self.assertEqual(h.get("jetfleet-attempt"), "1", h)
        self.assertEqual(h.get("authorization"), secret, "the auth header from auth_header_env")

        dls = self.dlq_by_seq()
        self.assertEqual(sorted(dls), [bad_seq])
        self.assert_dead_letter(dls[bad_seq][0], "max_deliveries", bad_seq, bad_subject, bad_body,
                                deliveries="3")
        err = hval(dls[bad_seq][0]["headers"], "Jetfleet-Error")
        self.assertIn("score", err, "the error must name the missing key")
        by_key = mock.stats()["by_key"]
        self.assertEqual((by_key.get("shape-bad"), by_key.get("shape-good")), (3, 1), by_key)

        # At debug level nats.c's "connection closed" line may follow
        # "consumer stopped": only the exit code is checked here.
        self.assertEqual(self.progs.stop(proc), 0)
        with open(proc.jf_log_path, "rb") as f:
            log = f.read().decode("utf-8", "replace")
        self.assertNotIn("s3cr3t", log, "the auth header value appeared in the consumer's log")
        print("\n[http] headers ok; result_required=score: 3 calls then max_deliveries (%s); "
              "secret not in %d log lines" % (err, len(read_log_lines(proc))))


# ---------------------------------------------------------------------------
# Breakers and fleet-wide limits

class TestBreakerAndLimits(DownstreamTestCase):

    def test_503_storm_opens_breaker_other_service_unaffected(self):
        njobs, max_deliver, nproc = 200, 5, 2
        mock_a = self.start_mock(name="mock-a")
        mock_b = self.start_mock("--latency", "50ms", name="mock-b")
        breaker = {"breaker_min_calls": 5, "breaker_open": "1s", "breaker_open_max": "2s"}
        services = {
            "sa": self.http_service(mock_a, max_deliver=max_deliver, backoff="200ms", **breaker),
            "sb": self.http_service(mock_b, max_deliver=max_deliver, backoff="200ms", **breaker),
        }
        cfg = self.ds_config(services)
        mock_a.configure(error_rate=1)
        procs = self.start_consumers(cfg, nproc)

        jobs = []
        for i in range(njobs):
            for s in ("sa", "sb"):
                jobs.append(envelope("%s-%d" % (s, i), service=s, priority=PRIORITIES[i % 3],
                                     payload={"n": i}))
        t0 = time.monotonic()
        self.publish_jobs(cfg, jobs)

        def a_open():
            return [l for p in procs for l in log_msgs(p, "breaker state")
                    if l.get("service") == "sa" and l.get("state") == "open"]
        self.wait_drained(durables_of("sb"), 60, procs=procs)
        b_done = time.monotonic() - t0
        b_stats = mock_b.stats()
        self.assertEqual(b_stats["by_status"].get("200"), njobs,
                         "every job of sb succeeds while sa is down: %r" % b_stats["by_status"])
        wait_for(a_open, 30, "sa's breaker to open", procs=procs)
        a_status = mock_a.stats()["by_status"]
        self.assertEqual(set(a_status), {"503"}, "the storm is still on when sb is done: %r"
                         % a_status)
        self.assertEqual(mock_b.stats()["by_key"].get("sa-0"), None)

        # Keep the storm on a while longer: an open breaker must keep the
        # calls to sa down to a few probes.
        opened_at = time.monotonic()
        at_open = mock_a.stats()["requests"]
        wait_for(lambda: time.monotonic() - opened_at >= 4, 10, "4s of storm with the breaker open",
                 procs=procs)
        st = mock_a.stats()
        storm_calls = st["requests"]
        storm_s = time.monotonic() - t0
        self.assertEqual(set(st["by_status"]), {"503"}, st["by_status"])
        mock_a.configure(error_rate=0)
        off_at = time.monotonic()

        self.wait_drained(durables_of("sa"), 90, procs=procs)
        recovered = time.monotonic() - off_at
        a_final = mock_a.stats()
        self.assertEqual(a_final["by_status"].get("200"), njobs, a_final["by_status"])
        self.assert_no_dead_letters(procs)
        self.assertLess(storm_calls, njobs * max_deliver // 4,
                        "the breaker must stop the hammering: %d calls in the storm" % storm_calls)
        stopped = self.stop_consumers(procs)
        self.assertEqual(sum(s.get("dead", 0) for s in stopped), 0, stopped)
        self.assertGreaterEqual(sum(s.get("acked", 0) for s in stopped), 2 * njobs, stopped)
        opens = len(a_open())
        print("\n[storm] %d jobs each on sa and sb, %d consumers: sb all done %.2fs after publishing, "
              "while sa was down; sa's breaker opened %d times; sa got %d calls during %.1fs of "
              "storm (%d by the time its breaker was seen open, %d in the %.1fs after) vs jobs x "
              "max_deliver = %d; sa all done %.2fs after recovery; 0 dead-lettered"
              % (njobs, nproc, b_done, opens, storm_calls, storm_s, at_open,
                 storm_calls - at_open, off_at - opened_at, njobs * max_deliver, recovered))

    def test_fleet_in_flight_cap_across_processes(self):
        njobs, cap, nproc = 200, 10, 3
        mock = self.start_mock("--latency", "300ms")
        cfg = self.ds_config({"slow": self.http_service(mock, fleet_in_flight=cap)},
                             max_in_flight=64)
        procs = self.start_consumers(cfg, nproc)
        jobs = [envelope("c-%d" % i, service="slow", priority=PRIORITIES[i % 3], payload={"n": i})
                for i in range(njobs)]
        t0 = time.monotonic()
        self.publish_jobs(cfg, jobs)
        self.wait_drained(durables_of("slow"), 120, procs=procs)
        wall = time.monotonic() - t0
        st = mock.stats()
        self.assertEqual(st["by_status"].get("200"), njobs, st)
        self.assert_no_dead_letters(procs)
        self.assertLessEqual(st["peak_in_flight"], cap,
                             "fleet_in_flight=%d exceeded at the mock" % cap)
        self.assertEqual(st["peak_in_flight"], cap, "the fleet never used its %d slots" % cap)
        mock.stop()
        calls = mock.calls()
        busy_ms = sum(c.get("latency_ms", 300) for c in calls)
        span = (max(c["ts_ms"] for c in calls) - min(c["ts_ms"] for c in calls)) + 300
        mean = busy_ms / span if span > 0 else 0
        ideal = njobs * 0.3 / cap
        stopped = self.stop_consumers(procs)
        per_proc = [s.get("acked", 0) for s in stopped]
        self.assertGreaterEqual(sum(per_proc), njobs)
        # Saturated: the calls keep the cap busy most of the run.
        self.assertGreaterEqual(mean, 0.7 * cap, "mean concurrency at the mock %.1f of %d"
                                % (mean, cap))
        print("\n[fleet_in_flight] cap %d, %d consumers x max_in_flight 64, %d jobs of 300ms: "
              "peak at mock %d, mean concurrency %.1f, calls span %.2fs (ideal %.1fs), wall %.2fs, "
              "acked per consumer %s" % (cap, nproc, njobs, st["peak_in_flight"], mean,
                                          span / 1000, ideal, wall, per_proc))

    def test_rate_limit_across_processes(self):
        njobs, rate, burst, nproc = 200, 20, 1, 3
        mock = self.start_mock()
        cfg = self.ds_config({"rl": self.http_service(mock, rate="%d/s" % rate, burst=burst)})
        procs = self.start_consumers(cfg, nproc)
        jobs = [envelope("rl-%d" % i, service="rl", priority=PRIORITIES[i % 3], payload={"n": i})
                for i in range(njobs)]
        t0 = time.monotonic()
        self.publish_jobs(cfg, jobs)
        self.wait_drained(durables_of("rl"), 120, procs=procs)
        wall = time.monotonic() - t0
        st = mock.stats()
        self.assertEqual(st["by_status"].get("200"), njobs, st)
        self.assert_no_dead_letters(procs)
        mock.stop()
        ts = [c["ts_ms"] for c in mock.calls()]
        self.assertEqual(len(ts), njobs)
        highest, at = max_in_window(ts)
        span = (max(ts) - min(ts)) / 1000
        per_second = max(st.get("per_second", {"": 0}).values())
        stopped = self.stop_consumers(procs)
        per_proc = [s.get("acked", 0) for s in stopped]
        self.assertLessEqual(highest, rate + burst - 1,
                             "a 1-second window starting at ts_ms %s holds %d calls" % (at, highest))
        self.assertGreaterEqual(span, (njobs - rate) / rate)
        self.assertGreaterEqual(wall, (njobs - rate) / rate)
        self.assertLess(span, 2 * njobs / rate, "the fleet fell far behind its rate")
        print("\n[rate] %d/s burst %d, %d consumers, %d jobs: most calls in any sliding 1s "
              "window %d, most in a calendar second %d, calls span %.2fs (bound >= %.1fs), "
              "wall %.2fs, acked per consumer %s"
              % (rate, burst, nproc, njobs, highest, per_second, span, (njobs - rate) / rate,
                 wall, per_proc))


# ---------------------------------------------------------------------------
# Ledger under crashes

class TestLedgerCrashes(DownstreamTestCase):

    def test_kill9_consumers_one_ledger_row_per_job(self):
        njobs, nproc, rounds = 1000, 3, 3
        self.start_postgres()
        mock = self.start_mock("--latency", "20ms-80ms")
        # Few slots per process keep the run long enough for several kills;
        # ack_wait 2s brings back the jobs a killed process held.
        cfg = self.ds_config({"llm": self.http_service(mock, max_deliver=10, ack_wait="2s")},
                             max_in_flight=4, ledger=True)
        procs = self.start_consumers(cfg, nproc)
        jobs = [envelope("k-%d" % i, service="llm", priority=PRIORITIES[i % 3], payload={"n": i})
                for i in range(njobs)]
        t0 = time.monotonic()
        self.publish_jobs(cfg, jobs)

        kills, mid_run = 0, 0
        for r in range(1, rounds + 1):
            target = r * njobs // (rounds + 1)
            wait_for(lambda: mock.stats()["requests"] >= target, 120,
                     "%d calls at the mock before kill round %d" % (target, r), procs=procs)
            pending = sum(i["num_pending"] + i["num_ack_pending"]
                          for i in self.durable_state("JOBS", durables_of("llm")).values())
            victims = procs[:2]
            for v in victims:
                self.progs.kill9(v)
                kills += 1
            if pending > 0:
                mid_run += 1
            procs = self.start_consumers(cfg, 2, name_prefix="round%d" % r) + procs[2:]
        self.assertGreaterEqual(mid_run, 2, "the kills came after the work was done: "
                                "the test proves nothing")

        self.wait_drained(durables_of("llm"), 150, procs=procs)
        wall = time.monotonic() - t0
        rows, distinct, ok, other = self.ledger_counts()
        self.assertEqual((rows, distinct), (njobs, njobs), "exactly one ledger row per job")
        self.assertEqual((ok, other), (njobs, 0), self.pg.query(
            "SELECT job_id, status, attempts, error FROM jetfleet_jobs "
            "WHERE status <> 'succeeded' LIMIT 5"))
        self.assert_no_dead_letters(procs)
        st = mock.stats()
        missing = [j["id"] for j in jobs if j["id"] not in st["by_key"]]
        self.assertEqual(missing, [], "jobs never called")
        extra = st["requests"] - njobs
        attempts_max = int(self.pg.query("SELECT max(attempts) FROM jetfleet_jobs")[0][0])
        stopped = self.stop_consumers(procs)
        skipped = sum(s.get("skipped", 0) for s in stopped)
        print("\n[kill -9] %d jobs, %d consumers, %d kill -9 in %d rounds (%d mid-run): wall "
              "%.2fs; ledger %d rows, %d distinct, all succeeded; %d calls at the mock (%d repeated "
              "by the crashes), highest attempts %d; acked without a call (already in the "
              "ledger) by the last processes %d; DLQ empty; acked by the last processes %s" % (njobs, nproc, kills, rounds, mid_run, wall, rows, distinct,
                                     st["requests"], extra, attempts_max, skipped,
                                     [s.get("acked") for s in stopped]))

    def test_postgres_restart_mid_run_loses_nothing(self):
        njobs, nproc = 500, 2
        pg = self.start_postgres()
        mock = self.start_mock("--latency", "50ms")
        cfg = self.ds_config({"llm": self.http_service(mock, max_deliver=5)}, max_in_flight=4,
                             ledger=True)
        procs = self.start_consumers(cfg, nproc)
        jobs = [envelope("p-%d" % i, service="llm", priority=PRIORITIES[i % 3], payload={"n": i})
                for i in range(njobs)]
        t0 = time.monotonic()
        self.publish_jobs(cfg, jobs)
        wait_for(lambda: mock.stats()["requests"] >= 100, 60, "100 calls before the restart",
                 procs=procs)
        at_restart = mock.stats()["requests"]
        r0 = time.monotonic()
        pg.restart()
        restart_s = time.monotonic() - r0
        self.assertLess(at_restart, njobs - 100, "the run was nearly over at the restart")

        self.wait_drained(durables_of("llm"), 150, procs=procs)
        wall = time.monotonic() - t0
        rows, distinct, ok, other = self.ledger_counts()
        self.assertEqual((rows, distinct), (njobs, njobs), "exactly one ledger row per job")
        self.assertEqual((ok, other), (njobs, 0), self.pg.query(
            "SELECT job_id, status, attempts, error FROM jetfleet_jobs "
            "WHERE status <> 'succeeded' LIMIT 5"))
        self.assert_no_dead_letters(procs)
        st = mock.stats()
        missing = [j["id"] for j in jobs if j["id"] not in st["by_key"]]
        self.assertEqual(missing, [], "jobs never called")
        ledger_trips = [l for p in procs for l in read_log_lines(p)
                        if l.get("level") in ("warn", "error") and
                        ("ledger" in str(l.get("msg")) or "postgres" in str(l.get("msg")))]
        self.assertTrue(ledger_trips, "no consumer noticed the restart: the test proves nothing")
        stopped = self.stop_consumers(procs)
        print("\n[pg restart] %d jobs, %d consumers, PostgreSQL restarted (fast) after %d calls, "
              "took %.2fs; wall %.2fs; ledger %d rows, all succeeded; %d calls at the mock; %d "
              "ledger warnings logged; deferred %s, acked %s; DLQ empty"
              % (njobs, nproc, at_restart, restart_s, wall, rows, st["requests"],
                 len(ledger_trips), [s.get("deferred") for s in stopped],
                 [s.get("acked") for s in stopped]))


if __name__ == "__main__":
    unittest.main()
