"""Fault suite A: processes killed, paused, and the NATS server restarted while
jobs flow; every scenario ends with faultlib's invariant check and one
RESULT line (see faultlib.py for the line's keys).

  test_kill9_consumers        kill -9 a random consumer every ~2 s (restarted
                              at once) while 3 consumers work through 20,000 jobs
  test_sigstop_past_ack_wait  SIGSTOP a consumer holding jobs for longer than
                              ack_wait, SIGCONT it after others took them over
  test_nats_restart           nats-server killed (-9) and restarted on the same
                              port and store in the middle of publishing and
                              consuming
  test_sigterm_under_load     SIGTERM to every consumer under load: exit 0
                              within shutdown_grace, the jobs they held free at
                              once (not after ack_wait)

JETFLEET_FAULTS_QUICK=1 scales the sizes down for CI. Run from tests/faults:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_kill
or through scripts/faults.
"""

import collections
import os
import random
import signal
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultlib  # noqa: E402
from faultlib import FaultTestCase, Job, chaos_thread, size  # noqa: E402

jh = faultlib.jh


def mixed_jobs(run, n, service, prefix, dead_every=50, retry_every=20):
    """n jobs for a jetfleet-mock service: every dead_every-th answers 400
    (dead, reason permanent, 1 attempt), every retry_every-th fails its first
    call with 503 (succeeds on attempt 2), the rest succeed at once."""
    jobs = []
    for i in range(n):
        jid = "%s-%06d" % (prefix, i)
        prio = faultlib.PRIORITIES[i % 3]
        if dead_every and i % dead_every == 7:
            jobs.append(Job(jid, service, prio, payload={"n": i, "mock": {"status": 400}},
                            expect="dead", reason="permanent"))
        elif retry_every and i % retry_every == 3:
            jobs.append(Job(jid, service, prio, payload={"n": i, "mock": {"fail_first": 1}},
                            attempts=2))
        else:
            jobs.append(Job(jid, service, prio, payload={"n": i}))
    return jobs


class TestKill(FaultTestCase):

    def test_kill9_consumers(self):
        """kill -9 a random consumer every ~2 s during the run, restarting it
        each time: nothing lost, one row per job, no call for a settled job."""
        njobs = size(20000, 3000)
        run = self.fault_run("kill9")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock("--latency", size("5ms-40ms", "30ms-120ms"))
        # ack_wait 3s brings a killed process's jobs back soon; max_deliver
        # high enough that kills alone never use up a job's attempts.
        run.write_config(
            services={"svc": run.http_service(mock, max_deliver=15, ack_wait="3s",
                                              backoff="100ms")},
            consumer={"max_in_flight": size(64, 16)})
        run.start_consumers(3)
        jobs = mixed_jobs(run, njobs, "svc", "k9")
        run.publish(jobs)

        stop = threading.Event()
        kills = []

        def kill_one():
            # Only while jobs are unsettled: a kill after the end proves nothing.
            c = run.ledger_counts()
            if c["succeeded"] + c["dead"] >= njobs:
                stop.set()
                return
            victim = random.choice(run.consumers())
            run.kill9(victim)
            kills.append(victim.jf_name)
            run.start_consumer(name="restart-%d" % len(kills))

        chaos = chaos_thread(stop, 2.0, kill_one, name="kill9")
        run.wait_settled(timeout=size(600, 180))
        stop.set()
        chaos.join(timeout=90)
        problems = ["chaos: %s" % e for e in chaos.errors]
        if len(kills) < 3:
            problems.append("only %d kills came while jobs were unsettled: the run proves "
                            "nothing" % len(kills))
        if len(run.consumers()) != 3:
            problems.append("%d consumers running at the end, not 3" % len(run.consumers()))
        run.finish(extra={"kills": len(kills), "consumers": 3}, problems=problems)

    def test_sigstop_past_ack_wait(self):
        """SIGSTOP a consumer holding jobs for longer than ack_wait; the others
        take its jobs over and settle them; SIGCONT: its late answers, acks,
        dead letters and ledger writes must change nothing."""
        njobs = size(4000, 1500)
        ack_wait = 3.0
        run = self.fault_run("sigstop")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock("--latency", "100ms-400ms")
        run.write_config(
            # timeout 30s: the calls the victim had in flight are answered
            # while it is stopped, and it reads those answers (200, 400, 503)
            # after SIGCONT, rather than timing them out.
            services={"svc": run.http_service(mock, max_deliver=4, ack_wait="%ds" % ack_wait,
                                              backoff="100ms", timeout="30s")},
            consumer={"max_in_flight": 24, "stats_interval": "200ms"})
        procs = run.start_consumers(3)
        victim = procs[0]
        jobs = mixed_jobs(run, njobs, "svc", "st", dead_every=10, retry_every=20)
        # Jobs that use up max_deliver (4 calls, all 503): dead with reason
        # max_deliveries, so a late repeat of that decision would show too.
        # Few of them: 503s count for the breaker, which would stall the run.
        for j in jobs[5::97]:
            if j.expect == "succeeded":
                j.payload["mock"] = {"fail_first": 99}
                j.expect, j.attempts, j.reason = "dead", 4, "max_deliveries"
        run.publish(jobs)

        def held():
            st = jh.log_msgs(victim, "stats")
            return st and st[-1].get("in_flight", 0) >= 12 and st[-1]
        line = jh.wait_for(held, 60, "the victim to hold jobs", procs=procs)
        os.kill(victim.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        stopped_for = None
        try:
            before = run.ledger_counts()
            # The others must settle everything, the victim's jobs included:
            # only ack_wait gives those back.
            def all_settled():
                c = run.ledger_counts()
                return c["succeeded"] + c["dead"] >= njobs
            jh.wait_for(all_settled, size(300, 120), "the other consumers to settle every job",
                        interval=0.5)
            jh.wait_for(lambda: time.monotonic() - t_stop > 2 * ack_wait, 30,
                        "twice ack_wait to pass", interval=0.2)
        finally:
            stopped_for = time.monotonic() - t_stop
            nstats = len(jh.log_msgs(victim, "stats"))
            nlines = len(jh.read_log_lines(victim))
            acked_before = (jh.log_msgs(victim, "stats") or [{}])[-1].get("acked", 0)
            os.kill(victim.pid, signal.SIGCONT)
        problems = []
        if before["succeeded"] + before["dead"] >= njobs:
            problems.append("all jobs were settled when the victim stopped: proves nothing")
        # Its late work happens now; give it time to finish and settle.
        run.wait_settled(timeout=120, procs=procs)
        jh.wait_for(lambda: [l for l in jh.log_msgs(victim, "stats")[nstats:]
                             if l.get("in_flight") == 0], 60,
                    "the victim to finish its late work", procs=[victim])
        late = collections.Counter(l.get("msg") for l in jh.read_log_lines(victim)[nlines:])
        for p in run.consumers():
            rc = run.stop_consumer(p, timeout=30)
            if rc != 0:
                problems.append("%s exited %s after SIGTERM" % (p.jf_name, rc))
        # What the victim did after SIGCONT (counted from its log lines).
        vstop = jh.log_msgs(victim, "consumer stopped")
        vacked = (vstop[-1].get("acked", 0) if vstop else 0) - acked_before
        late_work = vacked + late["dead-lettered"] + late["job failed; retrying"] + \
            late["already settled in the ledger; acknowledging without a call"]
        if late_work == 0:
            problems.append("the victim did no late work after SIGCONT: proves nothing")
        run.finish(extra={"held_at_stop": line.get("in_flight"), "stopped_s": stopped_for,
                          "late_acked": vacked, "late_dead": late["dead-lettered"],
                          "late_retry": late["job failed; retrying"],
                          "late_skipped": late["already settled in the ledger; acknowledging "
                                               "without a call"]}, problems=problems)

    def test_sigstop_late_retry_keeps_dead_row(self):
        """Regression (found by test_sigstop_past_ack_wait): a paused process's
        late retryable outcome, arriving after another process dead-lettered
        the job, turned the ledger row back to `running` (the finish statement
        only protected succeeded rows). One job, step by step."""
        run = self.fault_run("sigstop_late_retry")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock()
        run.write_config(
            services={"svc": run.http_service(mock, max_deliver=2, ack_wait="3s",
                                              backoff="100ms", timeout="30s")},
            # The paused process's pulls expire (at the server) before
            # ack_wait: the redelivery goes to the second process, never
            # into a pull the paused one left open.
            consumer={"max_in_flight": 8, "pull_expires": "1s"})
        first = run.start_consumer(name="paused")
        job = Job("late-1", "svc", payload={"mock": {"fail_first": 99, "latency": "1500ms"}},
                  expect="dead", attempts=2, reason="max_deliveries")
        run.publish([job])
        jh.wait_for(lambda: mock.stats()["in_flight"] == 1, 30, "the first call in flight",
                    procs=[first])
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = run.start_consumer(name="second")
            # ack_wait gives the job to the second process: its call (attempt
            # 2 of 2) fails too and the job is dead-lettered.
            jh.wait_for(lambda: run.ledger_counts()["dead"] == 1, 60,
                        "the second process to dead-letter the job", procs=[second])
        finally:
            os.kill(first.pid, signal.SIGCONT)
        # The paused process now reads its 503 (attempt 1 of 2: a retry).
        jh.wait_for(lambda: jh.log_msgs(first, "job failed; retrying"), 30,
                    "the paused process's late retry", procs=[first])
        problems = []
        rows = run.ledger_rows()
        if rows.get("late-1", [(None,)])[0][0] != "dead":
            problems.append("ledger row after the late retry: %r" % rows.get("late-1"))
        run.wait_settled(timeout=30)
        run.finish(problems=problems)

    def test_sigstop_past_duplicate_window(self):
        """A paused process whose late answer is a permanent failure, woken
        after another process dead-lettered the job AND after the duplicate
        window: its late dead letter is no longer dropped by Nats-Msg-Id, so
        only the process itself can avoid a second dead letter. (The window
        is 3s here; the default 2m is the same mechanism, only slower.)"""
        run = self.fault_run("sigstop_dup_window")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock()
        run.write_config(
            services={"svc": run.http_service(mock, max_deliver=3, ack_wait="2s",
                                              backoff="100ms", timeout="60s")},
            consumer={"max_in_flight": 8, "pull_expires": "1s"},
            stream={"duplicate_window": "3s"})
        first = run.start_consumer(name="paused")
        job = Job("late-dl-1", "svc", payload={"mock": {"status": 400, "latency": "1500ms"}},
                  expect="dead", attempts=1, reason="permanent")
        run.publish([job])
        jh.wait_for(lambda: mock.stats()["in_flight"] == 1, 30, "the first call in flight",
                    procs=[first])
        os.kill(first.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            second = run.start_consumer(name="second")
            jh.wait_for(lambda: run.ledger_counts()["dead"] == 1, 60,
                        "the second process to dead-letter the job", procs=[second])
            t_dead = time.monotonic()
            jh.wait_for(lambda: time.monotonic() - t_dead > 4.0, 10,
                        "the duplicate window to pass", interval=0.2)
        finally:
            nstats = len(jh.log_msgs(first, "stats"))
            os.kill(first.pid, signal.SIGCONT)
        stopped_s = time.monotonic() - t_stop
        # The paused process now reads its 400: whatever it decides must be
        # done before the check.
        jh.wait_for(lambda: [l for l in jh.log_msgs(first, "stats")[nstats:]
                             if l.get("in_flight") == 0], 30,
                    "the paused process to finish its late work", procs=[first])
        run.wait_settled(timeout=30)
        # The job's second run (after the late hand-back, if any) is attempt 2.
        run.jobs["late-dl-1"].attempts = 2
        run.finish(extra={"stopped_s": stopped_s})

    def test_nats_restart(self):
        """nats-server killed (-9) and restarted on the same port and store
        while a publisher streams jobs and consumers work: the publisher's
        failures are exact (re-publishing the file keeps every job once),
        consumers reconnect and finish, nothing lost."""
        njobs = size(20000, 3000)
        rate = size(2000, 600)
        run = self.fault_run("nats_restart")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock("--latency", "5ms-30ms")
        run.write_config(
            services={"svc": run.http_service(mock, max_deliver=10, ack_wait="5s",
                                              backoff="100ms")},
            consumer={"max_in_flight": 32},
            nats={"reconnect_wait": "250ms"},
            publisher={"timeout": "3s"})
        procs = run.start_consumers(3)
        jobs = mixed_jobs(run, njobs, "svc", "nr")
        pub = run.publish_paced(jobs, rate)
        jh.wait_for(lambda: pub.written >= njobs // 3, 120, "a third of the jobs written")
        seen_before = run.client().stream_info("JOBS")["state"]["messages"]
        run.close_client()
        t_kill = time.monotonic()
        run.nats.kill9()
        time.sleep(2.0)  # the outage itself (not a wait for a condition)
        run.nats.restart()
        down_s = time.monotonic() - t_kill
        pub.join(timeout=300)
        problems = []
        if pub.result is None:
            self.fail("the publisher did not finish")
        cp, summary = pub.result
        if summary is None:
            self.fail("publisher printed no summary: exit %s\n%s" % (
                cp.returncode, cp.stderr.decode(errors="replace")[-3000:]))
        if summary["published"] + summary["duplicates"] + summary["failed"] != njobs:
            problems.append("publisher summary does not add up to %d: %r" % (njobs, summary))
        if (cp.returncode != 0) != (summary["failed"] > 0 or summary["invalid"] > 0):
            problems.append("publisher exit %d with summary %r" % (cp.returncode, summary))
        # Every id the publisher did not report failed must be stored.
        stored = run.stream_ids()
        missing = [j.id for j in jobs if stored.get(j.id, 0) == 0]
        if len(missing) > summary["failed"]:
            problems.append("%d jobs not stored but only %d reported failed (silent loss), "
                            "e.g. %s" % (len(missing), summary["failed"], missing[:5]))
        republished = 0
        if summary["failed"]:
            # The operator's fix: publish the file again; the duplicate window
            # keeps the jobs that did get stored once.
            again = run.publish(jobs, check=True)
            republished = again["published"]
            if again["published"] != len(missing):
                problems.append("re-publish stored %d, but %d were missing: %r" % (
                    again["published"], len(missing), again))
        ok = run.wait_settled(timeout=size(600, 240), procs=procs)
        reconnected = sum(1 for p in procs if jh.log_msgs(p, "nats reconnected"))
        if reconnected != len(procs):
            problems.append("only %d of %d consumers logged \"nats reconnected\"" % (
                reconnected, len(procs)))
        if seen_before >= njobs:
            problems.append("publishing was over at the restart")
        del ok
        run.finish(extra={"down_s": down_s, "stored_before": seen_before,
                          "pub_failed": summary["failed"], "pub_dups": summary["duplicates"],
                          "republished": republished}, problems=problems)

    def test_sigterm_under_load(self):
        """SIGTERM to every consumer while each holds jobs (some slower than
        shutdown_grace): each exits 0 within the grace (+ margin), and the
        jobs they held go to the next consumers at once, not after ack_wait."""
        njobs = size(3000, 800)
        grace, ack_wait, margin = 2.0, 60.0, 1.5
        run = self.fault_run("sigterm")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock("--latency", "50ms-500ms")
        run.write_config(
            services={"svc": run.http_service(mock, max_deliver=5, ack_wait="%ds" % ack_wait,
                                              backoff="100ms", timeout="20s")},
            consumer={"max_in_flight": 32, "shutdown_grace": "%ds" % grace,
                      "stats_interval": "200ms"})
        procs = run.start_consumers(3)
        jobs = mixed_jobs(run, njobs, "svc", "tm")
        # Every 25th job takes longer than the grace: whoever holds one at
        # SIGTERM must hand it back.
        for j in jobs[11::25]:
            if j.expect == "succeeded" and "mock" not in j.payload:
                j.payload["mock"] = {"latency": "4s"}
        run.publish(jobs)

        def loaded():
            return all((jh.log_msgs(p, "stats") or [{}])[-1].get("in_flight", 0) >= 16
                       for p in procs)
        jh.wait_for(loaded, 60, "every consumer to hold jobs", procs=procs)
        before = run.ledger_counts()
        t_term = time.monotonic()
        for p in procs:
            run.progs.send_signal(p, signal.SIGTERM)
        problems, exit_s = [], []
        for p in procs:
            rc = run.progs.wait_exit(p, timeout=grace + 30)
            exit_s.append(time.monotonic() - t_term)
            if rc != 0:
                problems.append("%s exit code %s after SIGTERM" % (p.jf_name, rc))
        slowest = max(exit_s)
        if slowest > grace + margin:
            problems.append("slowest exit %.2fs after SIGTERM > shutdown_grace %.1fs + %.1fs" % (
                slowest, grace, margin))
        stopped = []
        for p in procs:
            lines = jh.read_log_lines(p)
            if not lines or lines[-1].get("msg") != "consumer stopped":
                problems.append("%s: last log line %r" % (p.jf_name, lines[-1:]))
            else:
                stopped.append(lines[-1])
        handed_back = sum(l.get("nacked_on_stop", 0) for l in stopped)
        if handed_back == 0:
            problems.append("no job was handed back at the stop: the test proves nothing")
        t_exit = time.monotonic()
        # The jobs the stopped processes had begun and not finished.
        held = [r[0] for r in run.pg.query(
            "SELECT job_id FROM jetfleet_jobs WHERE status = 'running'")]
        left = njobs - (before["succeeded"] + before["dead"])
        run.start_consumers(3, prefix="next")

        def held_settled():
            if not held:
                return True
            ids = ",".join("'%s'" % h for h in held)
            return int(run.pg.scalar("SELECT count(*) FROM jetfleet_jobs WHERE job_id IN (%s) "
                                     "AND status IN ('succeeded', 'dead')" % ids)) == len(held)
        jh.wait_for(held_settled, ack_wait * 2, "the held jobs to be settled", interval=0.2)
        held_s = time.monotonic() - t_exit
        run.wait_settled(timeout=size(300, 120))
        remainder = time.monotonic() - t_exit
        # A job left for ack_wait comes back only ack_wait after its last
        # delivery, i.e. later than ack_wait - (grace + margin) after the exits.
        if held_s >= ack_wait / 2:
            problems.append("the jobs held at SIGTERM took %.1fs after the exits to settle "
                            "(ack_wait %.0fs): left waiting for ack_wait" % (held_s, ack_wait))
        if not held:
            problems.append("no job was running at the exits: the test proves nothing")
        run.finish(extra={"grace": grace, "slowest_exit": slowest, "handed_back": handed_back,
                          "held": len(held), "held_settled_s": held_s, "left_at_term": left,
                          "remainder_s": remainder, "ack_wait": ack_wait}, problems=problems)


if __name__ == "__main__":
    unittest.main()
