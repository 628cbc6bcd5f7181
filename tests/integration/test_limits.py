"""Fleet-wide limits (consumer/limits.c) through the real consumer, a real
nats-server -js and jetfleet-mock: the KV bucket jetfleet_limits and its keys,
noop services kept off it, a burst on top of a strict rate across processes,
in-flight slots of a process killed with SIGKILL reclaimed after three missed
heartbeats (and not before), slots handed back at once on SIGTERM, and limits
that fail closed while the bucket cannot be written, then recover.

(The plain fleet_in_flight cap and rate = N/s across processes are in
test_downstream.)

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_limits
"""

import json
import os
import signal
import time
import unittest

from jfharness import JsApiError, envelope, log_msgs, wait_for
from test_downstream import DownstreamTestCase, durables_of, max_in_window
from test_fleet import PRIORITIES

BUCKET_STREAM = "KV_jetfleet_limits"
HEARTBEAT_S = 2.0
STALE_S = 3 * HEARTBEAT_S


class LimitsTestCase(DownstreamTestCase):

    def kv_get(self, key):
        """The bucket's current value of key (bytes), or None (no key, no
        bucket)."""
        try:
            m = self.nc.stream_msg_get(BUCKET_STREAM, last_by_subj="$KV.jetfleet_limits." + key)
        except JsApiError as e:
            if e.code == 404:
                return None
            raise
        if m is None:
            return None
        op = (m["headers"].get("KV-Operation") or [None])[0]
        return None if op in ("DEL", "PURGE") else m["data"]

    def inflight_entries(self, service):
        """{process id: {"n", "w", "t"}} from inflight.<service>."""
        v = self.kv_get("inflight." + service)
        return {} if not v else json.loads(v)

    @staticmethod
    def entry_of(entries, proc):
        """The entry of a consumer process: its id is host-<pid>-<random>."""
        for pid, e in entries.items():
            if ("-%d-" % proc.pid) in pid:
                return e
        return None

    def jobs(self, service, n, prefix, payload=None):
        return [envelope("%s-%d" % (prefix, i), service=service, priority=PRIORITIES[i % 3],
                         payload=dict(payload or {}, n=i)) for i in range(n)]


class TestBucket(LimitsTestCase):

    def test_noop_only_fleet_never_creates_the_bucket(self):
        # noop services are bounded by MaxAckPending alone: a benchmark of
        # the fleet itself pays no KV round trip.
        cfg = self.fleet_config({"work": {"kind": "noop"}})
        procs = self.start_consumers(cfg, 1)
        self.publish_jobs(cfg, self.jobs("work", 50, "w"))
        self.wait_drained(durables_of("work"), 60, procs=procs)
        self.assertFalse(self.nc.stream_exists(BUCKET_STREAM),
                         "a fleet of noop services created %s" % BUCKET_STREAM)
        self.stop_consumers(procs)

    def test_bucket_config_and_keys(self):
        mock = self.start_mock()
        cfg = self.ds_config({"api": self.http_service(mock, rate="50/s", fleet_in_flight=5),
                              "quiet": {"kind": "noop"}})
        procs = self.start_consumers(cfg, 1)
        self.publish_jobs(cfg, self.jobs("api", 30, "a") + self.jobs("quiet", 30, "q"))
        self.wait_drained(durables_of("api") + durables_of("quiet"), 60, procs=procs)
        self.assertEqual(mock.stats()["by_status"].get("200"), 30)
        self.assertLessEqual(mock.stats()["peak_in_flight"], 5)

        c = self.nc.stream_info(BUCKET_STREAM)["config"]
        self.assertEqual(c["max_msgs_per_subject"], 1, "history 1")
        self.assertEqual(c["storage"], "file")
        self.assertEqual(c.get("num_replicas", 1), 1, "replicas = [stream] replicas")
        self.assertEqual(c["subjects"], ["$KV.jetfleet_limits.>"])

        # rate.api: the GCRA's theoretical arrival time, decimal µs, near now.
        tat = self.kv_get("rate.api")
        self.assertIsNotNone(tat, "no rate.api key")
        self.assertRegex(tat.decode(), r"^[0-9]+$")
        self.assertLess(abs(int(tat) / 1e6 - time.time()), 120, "TAT %s is not near now" % tat)
        # Every slot was given back: no entry still holds any.
        held = {p: e for p, e in self.inflight_entries("api").items() if e.get("n", 0) > 0}
        self.assertEqual(held, {}, "slots still held after the jobs finished")
        # The noop service has no keys at all.
        self.assertIsNone(self.kv_get("rate.quiet"))
        self.assertIsNone(self.kv_get("inflight.quiet"))
        self.stop_consumers(procs)
        # A graceful stop removes the process's entry altogether.
        self.assertEqual(self.inflight_entries("api"), {})


class TestRate(LimitsTestCase):

    def test_burst_on_top_of_strict_rate_across_processes(self):
        njobs, rate, burst, nproc = 120, 10, 5, 3
        mock = self.start_mock()
        cfg = self.ds_config({"rb": self.http_service(mock, rate="%d/s" % rate, burst=burst)})
        procs = self.start_consumers(cfg, nproc)
        self.publish_jobs(cfg, self.jobs("rb", njobs, "rb"))
        self.wait_drained(durables_of("rb"), 120, procs=procs)
        self.assert_no_dead_letters(procs)
        mock.stop()
        ts = sorted(c["ts_ms"] for c in mock.calls())
        self.assertEqual(len(ts), njobs)
        highest, at = max_in_window(ts)
        first = sum(1 for t in ts if t < ts[0] + 1000)
        span = (ts[-1] - ts[0]) / 1000
        stopped = self.stop_consumers(procs)
        # Strict: no window of one second holds more than rate + burst - 1.
        self.assertLessEqual(highest, rate + burst - 1,
                             "a 1-second window starting at ts_ms %s holds %d calls" % (at, highest))
        # The burst is really granted: the idle fleet starts with it.
        self.assertGreaterEqual(first, rate + 2, "first second: %d calls" % first)
        # And the rest is paced: (njobs - burst) spacings of 1/rate at least.
        self.assertGreaterEqual(span, (njobs - (rate + burst - 1)) / rate)
        self.assertLess(span, 2 * njobs / rate, "the fleet fell far behind its rate")
        print("\n[rate+burst] %d/s burst %d, %d consumers, %d jobs: most in any 1s window %d "
              "(bound %d), first second %d, calls span %.2fs, acked per consumer %s"
              % (rate, burst, nproc, njobs, highest, rate + burst - 1, first, span,
                 [s.get("acked", 0) for s in stopped]))


class TestInFlight(LimitsTestCase):

    def _two_consumers_sharing(self, cap, latency, njobs, grace="500ms", ack_wait="30s"):
        """Consumer A alone saturates the cap, then B starts and waits."""
        mock = self.start_mock("--latency", latency)
        svc = self.http_service(mock, fleet_in_flight=cap, timeout="60s", ack_wait=ack_wait)
        cfg = self.ds_config({"slow": svc}, max_in_flight=8, shutdown_grace=grace)
        a = self.start_consumers(cfg, 1, name_prefix="a")[0]
        self.publish_jobs(cfg, self.jobs("slow", njobs, "s"))
        wait_for(lambda: mock.stats()["in_flight"] == cap, 30, "A to fill the cap", procs=[a])
        b = self.start_consumers(cfg, 1, name_prefix="b")[0]
        # B has jobs and asks for slots: its entry says it waits.
        wait_for(lambda: (self.entry_of(self.inflight_entries("slow"), b) or {}).get("w") == 1
                 or (self.entry_of(self.inflight_entries("slow"), b) or {}).get("n", 0) > 0,
                 30, "B to wait for a slot", procs=[a, b])
        return mock, cfg, a, b

    def test_sigkill_slots_reclaimed_after_three_heartbeats(self):
        cap = 4
        mock, cfg, a, b = self._two_consumers_sharing(cap, "1500ms", 60, ack_wait="3s")
        # While A lives its slots count: B never gets the whole cap.
        wait_for(lambda: (self.entry_of(self.inflight_entries("slow"), a) or {}).get("n", 0) > 0
                 and (self.entry_of(self.inflight_entries("slow"), b) or {}).get("n", 0) > 0,
                 30, "A and B to share the cap", procs=[a, b])
        a_held = self.entry_of(self.inflight_entries("slow"), a)["n"]
        self.progs.kill9(a)
        killed = time.monotonic()
        # Until A's entry goes stale its slots still count: the entries
        # never add up to more than the cap, nor the calls at the mock.
        most = 0
        while True:
            entries = self.inflight_entries("slow")
            total = sum(e.get("n", 0) for e in entries.values())
            most = max(most, total)
            self.assertLessEqual(total, cap, "entries after the kill: %r" % entries)
            self.assertLessEqual(mock.stats()["in_flight"], cap)
            if self.entry_of(entries, a) is None:
                break
            self.assertLess(time.monotonic() - killed, STALE_S + 5,
                            "A's entry outlived three heartbeats by far: %r" % entries)
            self.assertIsNone(b.poll(), "B exited")
            time.sleep(0.05)
        reclaimed = time.monotonic() - killed
        wait_for(lambda: mock.stats()["in_flight"] == cap, 15, "B to use the whole cap",
                 procs=[b])
        full = time.monotonic() - killed
        # Not before: A wrote its entry at most one heartbeat before dying.
        self.assertGreaterEqual(reclaimed, STALE_S - HEARTBEAT_S - 0.5)
        self.wait_drained(durables_of("slow"), 120, procs=[b])
        st = mock.stats()
        self.assertLessEqual(st["peak_in_flight"], cap, "fleet_in_flight exceeded at the mock")
        self.assert_no_dead_letters([b])
        self.stop_consumers([b])
        print("\n[fleet_in_flight kill -9] cap %d: A held %d when killed; A's entry dropped "
              "%.2fs later, B using all %d slots %.2fs after the kill; peak at mock %d"
              % (cap, a_held, reclaimed, cap, full, st["peak_in_flight"]))

    def test_sigterm_hands_slots_back_at_once(self):
        cap = 4
        # Calls that outlast the test: A never gives a slot back by itself.
        mock, cfg, a, b = self._two_consumers_sharing(cap, "30s", 12)
        time.sleep(HEARTBEAT_S + 0.5)
        self.assertEqual((self.entry_of(self.inflight_entries("slow"), b) or {}).get("n", 0), 0,
                         "B got a slot while A held the whole cap")
        self.assertEqual(mock.stats()["in_flight"], cap)
        self.progs.send_signal(a, signal.SIGTERM)
        t = time.monotonic()
        wait_for(lambda: (self.entry_of(self.inflight_entries("slow"), b) or {}).get("n", 0)
                 == cap, 10, "B to hold the whole cap", procs=[b])
        handed = time.monotonic() - t
        # Well inside the staleness period: A removed its entry on the way out.
        self.assertLess(handed, STALE_S - 2, "slots came back only after %.2fs" % handed)
        self.assertEqual(self.progs.wait_exit(a, 30), 0)
        wait_for(lambda: mock.stats()["in_flight"] == cap, 10, "B's calls at the mock",
                 procs=[b])
        self.assertLessEqual(mock.stats()["peak_in_flight"], cap)
        self.assertIsNone(self.entry_of(self.inflight_entries("slow"), a))
        print("\n[fleet_in_flight SIGTERM] cap %d: B held all slots %.2fs after A's SIGTERM "
              "(shutdown_grace 500ms)" % (cap, handed))


class TestFailClosed(LimitsTestCase):

    def _set_max_msg_size(self, size):
        c = self.nc.stream_info(BUCKET_STREAM)["config"]
        c["max_msg_size"] = size
        self.nc.js_api("STREAM.UPDATE." + BUCKET_STREAM, c)

    def test_unwritable_bucket_holds_calls_then_recovers(self):
        mock = self.start_mock()
        cfg = self.ds_config({"api": self.http_service(mock, rate="20/s")})
        procs = self.start_consumers(cfg, 1)
        self.publish_jobs(cfg, self.jobs("api", 5, "before"), name="before.ndjson")
        self.wait_drained(durables_of("api"), 60, procs=procs)
        self.assertEqual(mock.stats()["requests"], 5)

        # Every compare-and-set now fails: no call may start.
        self._set_max_msg_size(1)
        self.publish_jobs(cfg, self.jobs("api", 10, "during"), name="during.ndjson")
        wait_for(lambda: log_msgs(procs[0], "fleet-wide limits unavailable; calls wait (fail closed)"),
                 20, "the consumer to report the bucket unavailable", procs=procs)
        time.sleep(2)
        self.assertEqual(mock.stats()["requests"], 5, "calls started while the limits were down")

        self._set_max_msg_size(-1)
        self.wait_drained(durables_of("api"), 60, procs=procs)
        self.assertEqual(mock.stats()["requests"], 15)
        self.assert_no_dead_letters(procs)
        self.assertTrue(log_msgs(procs[0], "fleet-wide limits available again"))
        # Logged once, not once per retry (every 500 ms).
        self.assertEqual(len(log_msgs(procs[0],
                                      "fleet-wide limits unavailable; calls wait (fail closed)")), 1)
        self.stop_consumers(procs)

    def test_deleted_bucket_is_recreated(self):
        mock = self.start_mock()
        cfg = self.ds_config({"api": self.http_service(mock, rate="20/s", fleet_in_flight=3)})
        procs = self.start_consumers(cfg, 1)
        self.publish_jobs(cfg, self.jobs("api", 5, "before"), name="before.ndjson")
        self.wait_drained(durables_of("api"), 60, procs=procs)
        self.nc.js_api("STREAM.DELETE." + BUCKET_STREAM)
        self.assertFalse(self.nc.stream_exists(BUCKET_STREAM))
        self.publish_jobs(cfg, self.jobs("api", 20, "after"), name="after.ndjson")
        self.wait_drained(durables_of("api"), 60, procs=procs)
        self.assertEqual(mock.stats()["by_status"].get("200"), 25)
        self.assertLessEqual(mock.stats()["peak_in_flight"], 3)
        self.assertTrue(self.nc.stream_exists(BUCKET_STREAM))
        self.assertIsNotNone(self.kv_get("rate.api"))
        self.stop_consumers(procs)


if __name__ == "__main__":
    unittest.main()
