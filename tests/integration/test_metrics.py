"""The consumer's [consumer] metrics_listen endpoint against real servers (a
nats-server -js and jetfleet-mock): /metrics counts what really happened
(successes, retries, every dead-letter reason, redeliveries, a breaker trip,
rate-limit waits, handler latency), /healthz and /readyz follow NATS.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_metrics
"""

import http.client
import json
import re
import signal
import time
import unittest
from datetime import datetime, timedelta, timezone

from jfharness import envelope, hval, log_msgs, read_log_lines, wait_for
from test_downstream import DownstreamTestCase, enc

LINE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
OUTCOMES = ("succeeded", "retried", "dead_invalid", "dead_expired", "dead_permanent",
            "dead_max_deliveries", "skipped", "deferred")


def http_get(port, path, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode("utf-8")
    finally:
        conn.close()


class Scrape:
    """One /metrics answer: samples by (name, labels) and the families'
    HELP/TYPE lines, checked for the text format's rules as it is parsed."""

    def __init__(self, text, test):
        self.samples = {}
        self.order = []
        self.types = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind
                continue
            if line.startswith("#") or not line:
                continue
            m = LINE_RE.match(line)
            test.assertIsNotNone(m, "not a sample line: %r" % line)
            labels = tuple(sorted(LABEL_RE.findall(m.group(2) or "")))
            key = (m.group(1), labels)
            test.assertNotIn(key, self.samples, "sample given twice: %r" % line)
            self.samples[key] = float(m.group(3))
            self.order.append(key)
            family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
            test.assertTrue(m.group(1) in self.types or family in self.types,
                            "no TYPE line before %s" % m.group(1))

    def get(self, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        if key not in self.samples:
            raise AssertionError("no sample %s%r" % (name, labels))
        return self.samples[key]

    def jobs(self, service, priority, outcome):
        return self.get("jetfleet_jobs_total", service=service, priority=priority, outcome=outcome)

    def sum_jobs(self, outcome):
        return sum(v for (n, l), v in self.samples.items()
                   if n == "jetfleet_jobs_total" and ("outcome", outcome) in l)

    def buckets(self, service):
        """[(le, cumulative count)] in exposition order."""
        return [(dict(l)["le"], v) for (n, l) in self.order
                if n == "jetfleet_handler_duration_seconds_bucket" and ("service", service) in l
                for v in [self.samples[(n, l)]]]


class MetricsTestCase(DownstreamTestCase):

    def metrics_port(self, proc):
        line = wait_for(lambda: log_msgs(proc, "metrics listening"), 30,
                        "%s to log \"metrics listening\"" % proc.jf_name, procs=[proc])[0]
        return line["port"]

    def scrape(self, port):
        st, h, text = http_get(port, "/metrics")
        self.assertEqual(st, 200, text)
        self.assertTrue(h.get("content-type", "").startswith("text/plain; version=0.0.4"), h)
        return Scrape(text, self)


class TestMetrics(MetricsTestCase):

    def test_counters_match_what_happened(self):
        mock = self.start_mock("--latency", "20ms")
        cfg = self.ds_config({
            "api": self.http_service(mock.url("/api"), max_deliver=2, backoff="100ms",
                                     rate="20/s"),
            "down": self.http_service(mock.url("/down"), max_deliver=1, fleet_in_flight=1,
                                      breaker_window=4, breaker_min_calls=2,
                                      breaker_failure_rate=50, breaker_open="1m",
                                      breaker_open_max="1m"),
        }, metrics_listen="127.0.0.1:0", pull_expires="1s")
        proc = self.progs.start_consumer(cfg)
        port = self.metrics_port(proc)

        # Before any job every series is there, at zero.
        s = self.scrape(port)
        for svc in ("api", "down"):
            for prio in ("high", "normal", "low"):
                for outcome in OUTCOMES:
                    self.assertEqual(s.jobs(svc, prio, outcome), 0)
            self.assertEqual(s.get("jetfleet_breaker_state", service=svc), 0)
        self.assertEqual(s.get("jetfleet_in_flight_limit"), 64)

        past = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        jobs = [envelope("ok-%d" % i, service="api") for i in range(5)]
        jobs += [envelope("ff-1", service="api", priority="high", payload={"mock": {"fail_first": 1}}),
                 envelope("ff-2", service="api", payload={"mock": {"fail_first": 1}}),
                 envelope("perm-1", service="api", payload={"mock": {"status": 400}}),
                 envelope("always-1", service="api", payload={"mock": {"status": 503}}),
                 envelope("exp-1", service="api", deadline=past)]
        jobs += [envelope("down-%d" % i, service="down", payload={"mock": {"status": 503}})
                 for i in range(4)]
        self.publish_jobs(cfg, jobs)
        # Not an envelope (no type, no payload): dead-lettered as invalid.
        self.nc.js_publish("jobs.api.normal.t", b'{"id":"inv-1","service":"api"}',
                           headers={"Nats-Msg-Id": "inv-1"})

        self.wait_drained(["api-high", "api-normal", "api-low"], 60, procs=[proc])
        wait_for(lambda: len(self.nc.all_dlq_messages()) >= 6, 30, "6 dead letters",
                 procs=[proc])
        wait_for(lambda: self.scrape(port).get("jetfleet_breaker_state", service="down") == 1,
                 10, "down's breaker to show open", procs=[proc])
        s = self.scrape(port)

        # The truth: dead letters in JOBS_DLQ, calls at the mock.
        dlq = {}
        for m in self.nc.all_dlq_messages():
            svc = hval(m["headers"], "Jetfleet-Subject").split(".")[1]
            key = (svc, hval(m["headers"], "Jetfleet-Reason"))
            dlq[key] = dlq.get(key, 0) + 1
        self.assertEqual(dlq, {("api", "permanent"): 1, ("api", "max_deliveries"): 1,
                               ("api", "expired"): 1, ("api", "invalid"): 1,
                               ("down", "max_deliveries"): 2})
        for svc in ("api", "down"):
            for reason in ("invalid", "permanent", "max_deliveries", "expired"):
                self.assertEqual(s.get("jetfleet_dead_letters_total", service=svc, reason=reason),
                                 dlq.get((svc, reason), 0), (svc, reason))
                self.assertEqual(sum(s.jobs(svc, p, "dead_" + reason)
                                     for p in ("high", "normal", "low")),
                                 dlq.get((svc, reason), 0), (svc, reason))
        calls = self.calls_by_key(mock)
        api_calls = sum(len(v) for k, v in calls.items() if not k.startswith("down-"))
        down_calls = sum(len(v) for k, v in calls.items() if k.startswith("down-"))
        self.assertEqual((api_calls, down_calls), (12, 2))

        self.assertEqual(s.jobs("api", "normal", "succeeded"), 6)
        self.assertEqual(s.jobs("api", "high", "succeeded"), 1)
        self.assertEqual(s.jobs("api", "high", "retried"), 1)
        self.assertEqual(s.jobs("api", "normal", "retried"), 2)
        self.assertEqual(s.get("jetfleet_redeliveries_total", service="api", priority="high"), 1)
        self.assertEqual(s.get("jetfleet_redeliveries_total", service="api", priority="normal"), 2)
        self.assertEqual(s.sum_jobs("skipped") + s.sum_jobs("deferred"), 0)

        # Handler latency: one observation per call, none faster than the
        # mock's 20ms, buckets cumulative up to +Inf = _count.
        for svc, n in (("api", api_calls), ("down", down_calls)):
            b = s.buckets(svc)
            self.assertEqual([le for le, _ in b],
                             ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
                              "5", "10", "30", "60", "+Inf"])
            counts = [v for _, v in b]
            self.assertEqual(counts, sorted(counts), "buckets must be monotone: %r" % b)
            self.assertEqual(counts[-1], n)
            self.assertEqual(s.get("jetfleet_handler_duration_seconds_count", service=svc), n)
            self.assertEqual(dict(b)["0.01"], 0, "a 20ms call is not under 10ms: %r" % b)
            total = s.get("jetfleet_handler_duration_seconds_sum", service=svc)
            self.assertTrue(0.02 * n <= total < 5 * n, total)

        # The breaker: tripped once by the two 503s and open; the third job is
        # held until it half-opens (the fourth waits on the server:
        # fleet_in_flight = 1 is the durable's MaxAckPending).
        self.assertEqual(s.get("jetfleet_breaker_state", service="down"), 1)
        self.assertEqual(s.get("jetfleet_breaker_trips_total", service="down"), 1)
        self.assertEqual(s.get("jetfleet_breaker_state", service="api"), 0)
        self.assertEqual(s.get("jetfleet_breaker_trips_total", service="api"), 0)
        self.assertEqual(s.get("jetfleet_in_flight"), 1)
        # rate = 20/s: a dozen calls cannot all go at once.
        waits = s.get("jetfleet_rate_limit_waits_total", service="api")
        self.assertTrue(1 <= waits <= api_calls, waits)
        self.assertEqual(s.get("jetfleet_rate_limit_waits_total", service="down"), 0)

        # The process's own tally agrees.
        want = (s.sum_jobs("succeeded"), sum(dlq.values()), s.sum_jobs("retried"))
        wait_for(lambda: [l for l in log_msgs(proc, "stats")
                          if (l["acked"], l["dead"], l["retried"]) == want], 10,
                 "a stats line with acked, dead, retried = %r" % (want,), procs=[proc])
        self.stop_consumer(proc)

    def test_health_and_readiness_follow_nats(self):
        cfg = self.fleet_config({"work": {"kind": "noop"}}, metrics_listen="127.0.0.1:0",
                                pull_expires="1s")
        proc = self.progs.start_consumer(cfg)
        port = self.metrics_port(proc)
        self.assertEqual(http_get(port, "/healthz")[:1], (200,))

        def ready():
            st, _, body = http_get(port, "/readyz")
            return json.loads(body) if st == 200 else None
        self.assertEqual(wait_for(ready, 20, "/readyz 200", procs=[proc]), {"status": "ready"})

        self.nats.stop()

        def not_ready():
            st, _, body = http_get(port, "/readyz")
            return json.loads(body) if st == 503 else None
        body = wait_for(not_ready, 20, "/readyz 503 with NATS down", procs=[proc])
        self.assertEqual(body["status"], "not ready")
        self.assertIn("nats: not connected", body["failing"])
        st, _, text = http_get(port, "/healthz")
        self.assertEqual((st, json.loads(text)), (200, {"status": "alive"}),
                         "alive while NATS is away")

        self.nats.restart()
        wait_for(ready, 60, "/readyz 200 again once NATS is back", procs=[proc])

        # Other paths and methods.
        self.assertEqual(http_get(port, "/nope")[0], 404)
        st, h, _ = http_get(port, "/metrics", method="POST")
        self.assertEqual((st, h.get("allow")), (405, "GET, HEAD"))
        self.stop_consumer(proc)

    def test_readyz_503_until_nats_is_up(self):
        # The endpoint listens before the first connect, which retries until
        # [nats] connect_timeout: a consumer started while NATS is still
        # down is alive but not ready, and turns ready once NATS comes.
        cfg = self.fleet_config({"work": {"kind": "noop"}}, metrics_listen="127.0.0.1:0",
                                pull_expires="1s")
        self.nats.stop()
        proc = self.progs.start_consumer(cfg, wait_ready=False,
                                         env={"JETFLEET_NATS_CONNECT_TIMEOUT": "60s"})
        port = self.metrics_port(proc)
        st, _, body = http_get(port, "/readyz")
        self.assertEqual(st, 503, body)
        failing = json.loads(body)["failing"]
        self.assertIn("consumer: starting or stopping", failing)
        self.assertIn("nats: not connected", failing)
        self.assertIn("durable work-normal: no answer to its pulls", failing)
        self.assertEqual(http_get(port, "/healthz")[0], 200)
        self.assertEqual(self.scrape(port).get("jetfleet_in_flight"), 0)

        self.nats.restart()
        wait_for(lambda: log_msgs(proc, "consumer ready"), 60, "consumer ready", procs=[proc])
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 20, "/readyz 200", procs=[proc])
        self.stop_consumer(proc)

    def test_bad_metrics_listen(self):
        cfg = self.fleet_config({"work": {"kind": "noop"}}, metrics_listen="localhost:http")
        cp = self.progs.run_consumer_once(["--config", cfg])
        self.assertEqual(cp.returncode, 2, cp.stderr)
        self.assertIn(b"[consumer] metrics_listen", cp.stderr)
        # A port already taken: a runtime failure naming the address.
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            taken = s.getsockname()[1]
            cfg = self.fleet_config({"work": {"kind": "noop"}},
                                    metrics_listen="127.0.0.1:%d" % taken)
            cp = self.progs.run_consumer_once(["--config", cfg])
        self.assertEqual(cp.returncode, 1, cp.stderr)
        self.assertIn(b"127.0.0.1:%d" % taken, cp.stderr)


if __name__ == "__main__":
    unittest.main()
