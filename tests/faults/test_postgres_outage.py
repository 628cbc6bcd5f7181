"""Fault suite B: the ledger's PostgreSQL stops in immediate mode (pg_ctl stop
-m immediate: every server process killed, recovery from the WAL at the next
start) for 20 s (10 s with JETFLEET_FAULTS_QUICK=1) in the middle of a run, and
starts again on the same port and data directory.

  test_postgres_stopped_immediate_mid_run
      two consumers work through jobs on a jetfleet-mock HTTP service (some
      fail once with 503, some are refused with 400 and must be dead-lettered
      "permanent"); PostgreSQL goes away mid-run. While it is down:
        - nothing is acknowledged (the consumers' "acked", "dead" and
          "skipped" counters stay flat: an ack waits for its committed row),
        - the consumers keep running and notice (ledger warnings),
        - nothing is dead-lettered because of the outage;
      after it is back every job finishes: faultlib's invariants (one row per
      job, succeeded or dead as expected, exactly the 400 jobs in JOBS_DLQ,
      nothing pending, no call the ledger did not count).

Run from tests/faults:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_postgres_outage
"""

import calendar
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultlib  # noqa: E402
from faultlib import FaultTestCase, Job, size  # noqa: E402

jh = faultlib.jh


def log_epoch(line):
    """Unix time (float) of a consumer log line's "ts" (RFC 3339, UTC)."""
    ts = line.get("ts", "")
    base, _, frac = ts.rstrip("Z").partition(".")
    t = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return t + (float("0." + frac) if frac else 0.0)


def counters_at(proc, when, keys=("acked", "dead", "skipped")):
    """The counters of proc's last "stats" line at or before unix time
    `when` (None when there is none)."""
    last = None
    for l in jh.log_msgs(proc, "stats"):
        if log_epoch(l) <= when:
            last = l
        else:
            break
    return None if last is None else tuple(last.get(k, 0) for k in keys)


def outage_jobs(n, prefix, dead_every=40, retry_every=25):
    jobs = []
    for i in range(n):
        jid = "%s-%06d" % (prefix, i)
        prio = faultlib.PRIORITIES[i % 3]
        if i % dead_every == 11:
            jobs.append(Job(jid, "llm", prio, payload={"n": i, "mock": {"status": 400}},
                            expect="dead", reason="permanent"))
        elif i % retry_every == 3:
            jobs.append(Job(jid, "llm", prio, payload={"n": i, "mock": {"fail_first": 1}},
                            attempts=2))
        else:
            jobs.append(Job(jid, "llm", prio, payload={"n": i}))
    return jobs


class TestPostgresOutage(FaultTestCase):

    def test_postgres_stopped_immediate_mid_run(self):
        njobs = size(4000, 1000)
        outage_s = size(20.0, 10.0)
        run = self.fault_run("postgres-outage")
        run.start_nats()
        pg = run.start_postgres()
        mock = run.start_mock("--latency", "20ms-60ms")
        # ack_wait 6s, shorter than the outage: jobs held while their row
        # cannot be written must be kept by heartbeats, not redelivered.
        run.write_config(
            services={"llm": run.http_service(mock, max_deliver=5, ack_wait="6s",
                                              backoff="200ms")},
            consumer={"max_in_flight": 16, "stats_interval": "500ms"})
        procs = run.start_consumers(2)
        jobs = outage_jobs(njobs, "pg")
        run.publish(jobs)
        problems = []

        jh.wait_for(lambda: run.ledger_counts()["succeeded"] >= njobs // 4, 300,
                    "a quarter of the jobs to succeed", procs=procs)
        before = run.ledger_counts()
        t_down_wall = time.time()
        t_down = time.monotonic()
        pg.stop("immediate")
        stop_s = time.monotonic() - t_down
        if pg.running():
            self.fail("PostgreSQL still runs after pg_ctl stop -m immediate")
        # The outage itself: a fixed length is the fault; the consumers are
        # watched all along. Every call needs its attempt committed first,
        # so a second after the stop the service gets no more calls.
        deadline = t_down + outage_s
        calls_at_stop = None
        while time.monotonic() < deadline:
            if calls_at_stop is None and time.monotonic() >= t_down + stop_s + 1.0:
                calls_at_stop = mock.stats()["requests"]
            gone = [p.jf_name for p in procs if p.poll() is not None]
            if gone:
                problems.append("consumers exited while PostgreSQL was down: %s" % gone)
                break
            time.sleep(0.2)
        calls_in_outage = mock.stats()["requests"] - calls_at_stop
        if calls_in_outage:
            problems.append("%d calls while no attempt could be committed" % calls_in_outage)
        t_up_wall = time.time()
        t_up = time.monotonic()
        pg.restart("immediate")  # already down: starts it, same port and directory
        start_s = time.monotonic() - t_up

        settled = run.wait_settled(size(300, 180), procs=procs)
        recovered_s = time.monotonic() - t_up

        # Nothing acknowledged while no row could be committed. The first
        # stats line >= 1.5 s after the stop (a write committed just before
        # may still be acked) against the last one before the restart.
        acked_in_outage = 0
        for p in procs:
            a = counters_at(p, t_down_wall + 1.5)
            b = counters_at(p, t_up_wall)
            if a is None or b is None:
                problems.append("%s logged no stats around the outage" % p.jf_name)
                continue
            if b != a:
                acked_in_outage += sum(y - x for x, y in zip(a, b))
                problems.append("%s settled jobs while PostgreSQL was down: (acked, dead, skipped)"
                                " %r -> %r" % (p.jf_name, a, b))
        noticed = sum(1 for p in procs for l in jh.read_log_lines(p)
                      if l.get("level") in ("warn", "error") and "ledger" in str(l.get("msg")))
        if not noticed:
            problems.append("no consumer logged a ledger warning: the outage proves nothing")
        if before["succeeded"] + before["dead"] >= njobs:
            problems.append("the run was over before PostgreSQL stopped")
        stopped = [s for p in procs if p.poll() is None
                   for s in [self.stop_and_last_stats(run, p)] if s]
        deferred = sum(s.get("deferred", 0) for s in stopped)
        run.finish(extra={
            "outage_s": outage_s, "stop_s": stop_s, "start_s": start_s,
            "settled_before": before["succeeded"] + before["dead"],
            "calls_in_outage": calls_in_outage, "acked_in_outage": acked_in_outage,
            "ledger_warnings": noticed,
            "deferred": deferred, "recovered_s": recovered_s if settled else -1.0},
            problems=problems)

    def stop_and_last_stats(self, run, proc):
        rc = run.stop_consumer(proc, timeout=60)
        if rc != 0:
            return None  # check() reports it under crashed=
        lines = jh.log_msgs(proc, "consumer stopped")
        return lines[-1] if lines else None


if __name__ == "__main__":
    unittest.main()
