"""The consumer fleet against a real nats-server -js: throughput and bounds
with several processes, dead-lettering, retries, duplicates, crash and
graceful shutdown, config errors.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_fleet
"""

import json
import os
import signal
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

from jfharness import (RFC3339_RE, JetfleetTestCase, ack_metadata, envelope, hval,
                       job_subject, log_msgs, publisher_json, read_log_lines, wait_for)

PRIORITIES = ("high", "normal", "low")
WORK_DURABLES = tuple("work-%s" % p for p in PRIORITIES)


def enc(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


class FleetTestCase(JetfleetTestCase):
    def fleet_config(self, services, max_in_flight=64, **consumer):
        c = {"max_in_flight": max_in_flight, "stats_interval": "200ms"}
        c.update(consumer)
        return self.config(consumer=c, services=services)

    def stop_consumer(self, proc, timeout=60):
        rc = self.progs.stop(proc, signal.SIGTERM, timeout=timeout)
        self.assertEqual(rc, 0, "%s exit code after SIGTERM" % proc.jf_name)
        return self.stopped_line(proc)

    def stop_consumers(self, procs, timeout=60):
        """SIGTERM to all at once (each may wait for its open pulls to
        expire), then every exit code must be 0; their "consumer stopped" lines."""
        for p in procs:
            self.progs.send_signal(p, signal.SIGTERM)
        return [self.stop_consumer(p, timeout=timeout) for p in procs]

    def stopped_line(self, proc):
        lines = read_log_lines(proc)
        self.assertTrue(lines, "%s logged no JSON line" % proc.jf_name)
        self.assertEqual(lines[-1].get("msg"), "consumer stopped",
                         "last log line of %s: %r" % (proc.jf_name, lines[-1]))
        return lines[-1]

    def dlq_by_seq(self):
        """{original stream seq: [dead-letter messages]}."""
        out = {}
        for m in self.nc.all_dlq_messages("JOBS_DLQ"):
            seq = hval(m["headers"], "Jetfleet-Stream-Seq")
            out.setdefault(int(seq) if seq and seq.isdigit() else seq, []).append(m)
        return out

    def dlq_count(self):
        try:
            return self.nc.stream_info("JOBS_DLQ")["state"]["messages"]
        except Exception:
            return 0

    def assert_dead_letter(self, m, reason, seq, subject, body, deliveries="1"):
        h = m["headers"]
        tokens = subject.split(".")
        self.assertEqual(m["subject"], "dlq." + ".".join(tokens[1:]), "dead-letter subject")
        self.assertEqual(m["data"], body, "dead-letter body must be the original bytes")
        self.assertEqual(hval(h, "Jetfleet-Reason"), reason, "Jetfleet-Reason of %r" % body[:80])
        err = hval(h, "Jetfleet-Error")
        self.assertTrue(err, "Jetfleet-Error empty for %r" % body[:80])
        self.assertNotIn("\n", err)
        self.assertNotIn("\r", err)
        for k in ("Jetfleet-Reason", "Jetfleet-Error", "Jetfleet-Deliveries", "Jetfleet-Stream",
                  "Jetfleet-Stream-Seq", "Jetfleet-Subject", "Jetfleet-Failed-At", "Nats-Msg-Id"):
            n = sum(len(v) for key, v in h.items() if key.lower() == k.lower())
            self.assertEqual(n, 1, "header %s present %d times: %r" % (k, n, h))
        self.assertEqual(hval(h, "Jetfleet-Deliveries"), deliveries)
        self.assertEqual(hval(h, "Jetfleet-Stream"), "JOBS")
        self.assertEqual(hval(h, "Jetfleet-Stream-Seq"), str(seq))
        self.assertEqual(hval(h, "Jetfleet-Subject"), subject)
        self.assertRegex(hval(h, "Jetfleet-Failed-At"), RFC3339_RE)
        self.assertEqual(hval(h, "Nats-Msg-Id"), "dlq-JOBS-%d" % seq)

    def assert_all_acked(self, infos, subjects_by_durable):
        """Nothing pending, nothing awaiting an ack, and the ack floor at the
        last message of the durable's subject: every message was acked."""
        for durable, info in infos.items():
            last = self.last_seq_of(subjects_by_durable[durable])
            self.assertEqual(info["num_pending"], 0, durable)
            self.assertEqual(info["num_ack_pending"], 0, durable)
            # The floor of a filtered durable may run past its own last
            # message (up to the stream's last), never stop short of it.
            self.assertGreaterEqual(info["ack_floor"]["stream_seq"], last,
                                    "%s: ack floor below the last message" % durable)


class TestFleet(FleetTestCase):

    def test_10k_jobs_three_priorities_three_consumers(self):
        njobs, limit, nproc = 10000, 64, 3
        cfg = self.fleet_config({"work": {"kind": "noop", "delay": "2ms"}}, max_in_flight=limit)
        jobs = [envelope("job-%d" % i, priority=PRIORITIES[i % 3], payload={"n": i})
                for i in range(njobs)]
        cp, summary = self.publish_batch(cfg, jobs)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual(summary["published"], njobs, summary)
        self.assertEqual((summary["duplicates"], summary["invalid"], summary["failed"]),
                         (0, 0, 0), summary)
        per_prio = {p: sum(1 for j in jobs if j["priority"] == p) for p in PRIORITIES}
        counts = self.subject_counts("jobs.work.>")
        self.assertEqual(counts, {job_subject("work", p, "t"): n for p, n in per_prio.items()})

        # Sample num_ack_pending of the three durables, all from one
        # monitoring snapshot, while the fleet works.
        peak = {"ack_pending": 0, "samples": 0, "errors": 0}
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    cs = self.nats.jsz_consumers()
                    total = sum(cs[d]["num_ack_pending"] for d in WORK_DURABLES if d in cs)
                    peak["ack_pending"] = max(peak["ack_pending"], total)
                    peak["samples"] += 1
                except Exception:
                    peak["errors"] += 1
                stop.wait(0.02)

        t = threading.Thread(target=sampler, daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            procs = [self.progs.start_consumer(cfg, wait_ready=False) for _ in range(nproc)]
            for p in procs:
                wait_for(lambda p=p: log_msgs(p, "consumer ready"), 60,
                         "%s ready" % p.jf_name, procs=procs)
            infos = self.wait_drained(WORK_DURABLES, 180, procs=procs)
            wall = time.monotonic() - t0
        finally:
            stop.set()
            t.join(10)

        self.assert_all_acked(infos, {"work-%s" % p: job_subject("work", p, "t")
                                      for p in PRIORITIES})
        for p in PRIORITIES:
            info = infos["work-%s" % p]
            self.assertGreaterEqual(info["delivered"]["consumer_seq"], per_prio[p])
        self.assertEqual(self.dlq_count(), 0, "dead letters in a run of good jobs")

        stopped = self.stop_consumers(procs)
        acked = [s.get("acked", 0) for s in stopped]
        self.assertGreaterEqual(sum(acked), njobs, "acked per consumer: %r" % acked)
        self.assertEqual(sum(s.get("dead", 0) for s in stopped), 0)

        highest_in_flight = 0
        for p, s in zip(procs, stopped):
            stats = log_msgs(p, "stats")
            self.assertTrue(stats, "%s logged no stats line at stats_interval=200ms" % p.jf_name)
            for line in stats:
                self.assertLessEqual(line["in_flight"], limit, line)
                self.assertLessEqual(line["peak_in_flight"], limit, line)
                # Jobs held plus jobs asked for in open pulls: what the
                # server may hand this process at once.
                if "requested" in line:
                    self.assertLessEqual(line["in_flight"] + line["requested"], limit, line)
                highest_in_flight = max(highest_in_flight, line["in_flight"],
                                        line["peak_in_flight"])
            self.assertLessEqual(s["peak_in_flight"], limit, s)
            highest_in_flight = max(highest_in_flight, s["peak_in_flight"])
        self.assertGreater(peak["samples"], 0, "no num_ack_pending sample was taken")
        # The server's num_ack_pending runs ahead of what the processes hold:
        # nats-server 2.9 applies acks on another goroutine than the one
        # serving pull requests, so a slot freed by a fire-and-forget +ACK
        # and filled by the next pull is counted twice for a moment (a
        # client that acks 64 and pulls 64 sees 128). Up to one window per
        # process in transit is tolerated; hoarding beyond it is not.
        self.assertLessEqual(peak["ack_pending"], 2 * nproc * limit,
                             "fleet held far more unacked jobs than %d x max_in_flight" % nproc)
        print("\n%d jobs, %d consumers: wall %.2fs, highest in-flight observed %d (limit %d), "
              "highest num_ack_pending %d (server view, unapplied acks included); acked per consumer %s"
              % (njobs, nproc, wall, highest_in_flight, limit, peak["ack_pending"], acked))

    def test_invalid_messages_dead_lettered(self):
        cfg = self.fleet_config({"work": {"kind": "noop"}})
        proc = self.progs.start_consumer(cfg)
        s_norm = "jobs.work.normal.x"
        base = {"id": "v", "service": "work", "type": "x", "payload": {}}
        cases = [
            ("not JSON", s_norm, b"this is not json"),
            ("truncated", s_norm, b'{"id":"trunc","service":"work","type":"x","payload":{"a":'),
            ("array", s_norm, b'[{"id":"arr","service":"work","type":"x","payload":{}}]'),
            ("id missing", s_norm, b'{"service":"work","type":"x","priority":"normal","payload":{}}'),
            ("type differs from subject", s_norm,
             b'{"id":"mism","service":"work","type":"y","payload":{}}'),
            ("priority differs from subject", "jobs.work.high.x",
             b'{"id":"prio","service":"work","type":"x","priority":"low","payload":{}}'),
            ("duplicate keys", s_norm,
             b'{"id":"dup","id":"dup2","service":"work","type":"x","payload":{}}'),
            ("invalid UTF-8", s_norm, b'{"id":"bad-\xff\xfe","service":"work","type":"x","payload":{}}'),
            ("nesting 100 deep", s_norm,
             b'{"id":"deep","service":"work","type":"x","payload":' + b"[" * 100 + b"]" * 100 + b"}"),
            ("trailing bytes", s_norm, enc(dict(base, id="trail")) + b' {"x":1}'),
            ("NaN", s_norm, b'{"id":"nan","service":"work","type":"x","payload":NaN}'),
            ("empty body", s_norm, b""),
            ("id 201 bytes", s_norm, enc(dict(base, id="i" * 201))),
            ("control character in id", s_norm, b'{"id":"a\\u0001b","service":"work","type":"x","payload":{}}'),
            ("lone surrogate in id", s_norm, b'{"id":"a\\ud800b","service":"work","type":"x","payload":{}}'),
            ("created_at not RFC 3339", s_norm, enc(dict(base, id="ts", created_at="yesterday"))),
            ("payload missing", s_norm, b'{"id":"nopay","service":"work","type":"x"}'),
        ]
        valid = [(s_norm, enc(envelope("valid-1", type_="x"))),
                 ("jobs.work.high.x", enc(envelope("valid-2", type_="x", priority="high")))]

        invalid_seq = {}
        valid_seq = {}
        for i, (name, subject, body) in enumerate(cases):
            ack = self.nc.js_publish(subject, body)
            self.assertEqual(ack["stream"], "JOBS")
            invalid_seq[ack["seq"]] = (name, subject, body)
            if i == 3:
                ack = self.nc.js_publish(*valid[0], headers={"Nats-Msg-Id": "valid-1"})
                valid_seq[ack["seq"]] = valid[0]
        ack = self.nc.js_publish(*valid[1], headers={"Nats-Msg-Id": "valid-2"})
        valid_seq[ack["seq"]] = valid[1]

        wait_for(lambda: self.dlq_count() >= len(cases), 60,
                 "%d dead letters" % len(cases), procs=[proc])
        infos = self.wait_drained(("work-normal", "work-high"), 60, procs=[proc])
        subject_of = {seq: c[1] for seq, c in invalid_seq.items()}
        subject_of.update({seq: v[0] for seq, v in valid_seq.items()})
        for prio in ("normal", "high"):
            durable = "work-" + prio
            info = infos[durable]
            self.assertEqual((info["num_pending"], info["num_ack_pending"]), (0, 0), durable)
            last = max(seq for seq, subj in subject_of.items() if subj.startswith("jobs.work.%s." % prio))
            self.assertGreaterEqual(info["ack_floor"]["stream_seq"], last,
                                    "%s ack floor" % durable)

        by_seq = self.dlq_by_seq()
        self.assertEqual(sorted(by_seq), sorted(invalid_seq),
                         "dead letters by original seq (valid jobs are %s)" % sorted(valid_seq))
        for seq, (name, subject, body) in invalid_seq.items():
            with self.subTest(case=name):
                self.assertEqual(len(by_seq[seq]), 1, "%s dead-lettered more than once" % name)
                self.assert_dead_letter(by_seq[seq][0], "invalid", seq, subject, body)
        self.assertEqual(self.dlq_count(), len(cases))

        logged = [l for l in log_msgs(proc, "dead-lettered")]
        self.assertEqual(sorted(int(l["seq"]) for l in logged), sorted(invalid_seq))
        for l in logged:
            self.assertEqual(l.get("reason"), "invalid", l)
            self.assertTrue(l.get("error"), l)

        self.assertIsNone(proc.poll(), "the consumer must survive invalid messages")
        stopped = self.stop_consumer(proc)
        self.assertEqual(stopped.get("dead"), len(cases), stopped)
        self.assertGreaterEqual(stopped.get("acked"), len(valid_seq), stopped)

    def test_expired_job_dead_lettered(self):
        cfg = self.fleet_config({"work": {"kind": "noop"}})
        proc = self.progs.start_consumer(cfg)
        subject = "jobs.work.normal.t"
        past_offset = (datetime.now(timezone(timedelta(hours=2))) - timedelta(seconds=30))
        expired = [
            enc(envelope("late-1", deadline="2001-01-01T00:00:00Z")),
            enc(envelope("late-2", deadline=past_offset.isoformat(timespec="seconds"))),
        ]
        on_time = enc(envelope("on-time", deadline="2999-01-01T00:00:00Z"))
        seqs = {}
        for body in expired:
            jid = json.loads(body)["id"]
            seqs[self.nc.js_publish(subject, body, headers={"Nats-Msg-Id": jid})["seq"]] = body
        ok_seq = self.nc.js_publish(subject, on_time, headers={"Nats-Msg-Id": "on-time"})["seq"]

        wait_for(lambda: self.dlq_count() >= len(expired), 60, "expired jobs dead-lettered",
                 procs=[proc])
        infos = self.wait_drained(("work-normal",), 60, procs=[proc])
        self.assertGreaterEqual(infos["work-normal"]["ack_floor"]["stream_seq"], ok_seq)
        by_seq = self.dlq_by_seq()
        self.assertEqual(sorted(by_seq), sorted(seqs), "the on-time job must not be dead")
        for seq, body in seqs.items():
            self.assertEqual(len(by_seq[seq]), 1)
            self.assert_dead_letter(by_seq[seq][0], "expired", seq, subject, body)
        reasons = {l.get("job_id"): l.get("reason") for l in log_msgs(proc, "dead-lettered")}
        self.assertEqual(reasons, {"late-1": "expired", "late-2": "expired"})
        self.stop_consumer(proc)

    def test_retry_then_max_deliveries(self):
        cfg = self.fleet_config({
            "flaky": {"kind": "noop", "fail_attempts": 2, "max_deliver": 5, "backoff": "100ms"},
            "doomed": {"kind": "noop", "fail_attempts": 10, "max_deliver": 3, "backoff": "100ms"},
        })
        proc = self.progs.start_consumer(cfg)
        flaky_subject, doomed_subject = "jobs.flaky.normal.t", "jobs.doomed.normal.t"
        flaky_body = enc(envelope("flaky-1", service="flaky"))
        doomed_body = enc(envelope("doomed-1", service="doomed"))
        t0 = time.monotonic()
        flaky_seq = self.nc.js_publish(flaky_subject, flaky_body,
                                       headers={"Nats-Msg-Id": "flaky-1"})["seq"]
        doomed_seq = self.nc.js_publish(doomed_subject, doomed_body,
                                        headers={"Nats-Msg-Id": "doomed-1"})["seq"]

        # Backoff is 100ms: three attempts take well under the 30s default
        # ack_wait, so a consumer that waits for redelivery by ack_wait fails here.
        infos = self.wait_drained(("flaky-normal", "doomed-normal"), 25, procs=[proc])
        elapsed = time.monotonic() - t0
        wait_for(lambda: self.dlq_count() >= 1, 10, "doomed-1 dead-lettered", procs=[proc])

        self.assertGreaterEqual(infos["flaky-normal"]["ack_floor"]["stream_seq"], flaky_seq)
        self.assertGreaterEqual(infos["doomed-normal"]["ack_floor"]["stream_seq"], doomed_seq)
        by_seq = self.dlq_by_seq()
        self.assertEqual(sorted(by_seq), [doomed_seq], "only doomed-1 may be dead-lettered")
        self.assertEqual(len(by_seq[doomed_seq]), 1)
        self.assert_dead_letter(by_seq[doomed_seq][0], "max_deliveries", doomed_seq,
                                doomed_subject, doomed_body, deliveries="3")

        stopped = self.stop_consumer(proc)
        deliveries = infos["flaky-normal"]["delivered"]["consumer_seq"]
        self.assertTrue(deliveries >= 3 or stopped.get("retried", 0) >= 2,
                        "flaky-1 must have been attempted 3 times: %d deliveries, %r"
                        % (deliveries, stopped))
        self.assertEqual(stopped.get("dead"), 1, stopped)
        dead_lines = log_msgs(proc, "dead-lettered")
        self.assertEqual([(l.get("job_id"), l.get("reason")) for l in dead_lines],
                         [("doomed-1", "max_deliveries")])
        print("\nflaky-1 succeeded on attempt 3, doomed-1 dead after 3: %.2fs" % elapsed)

    def test_duplicate_publish_stored_once(self):
        cfg = self.config()
        args = ["--config", cfg, "publish", "--service", "work", "--type", "t", "--id", "x"]
        first = publisher_json(self.progs.run_publisher(args, check=0))
        second = publisher_json(self.progs.run_publisher(args, check=0))
        self.assertEqual((first["id"], first["duplicate"]), ("x", False), first)
        self.assertEqual((second["id"], second["duplicate"]), ("x", True), second)
        self.assertEqual(second["seq"], first["seq"])
        self.assertEqual(self.nc.stream_info("JOBS")["state"]["messages"], 1)

        lines = [envelope("b-1"), envelope("b-2"), envelope("b-1", payload={"again": True})]
        cp, summary = self.publish_batch(cfg, lines)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual(summary["duplicates"], 1, summary)
        self.assertEqual((summary["invalid"], summary["failed"]), (0, 0), summary)
        self.assertEqual(self.nc.stream_info("JOBS")["state"]["messages"], 3)
        stored = [json.loads(m["data"]) for m in self.nc.stream_messages("JOBS")]
        self.assertEqual([m["id"] for m in stored], ["x", "b-1", "b-2"])
        self.assertEqual(stored[1]["payload"], {}, "the first b-1 is the one kept")

    def test_kill9_loses_nothing(self):
        njobs, limit = 3000, 32
        # 100ms of work per job keeps the run a few seconds long, so the
        # kill lands while both processes hold jobs.
        cfg = self.fleet_config({"work": {"kind": "noop", "delay": "100ms", "ack_wait": "2s"}},
                                max_in_flight=limit)
        jobs = [envelope("k-%d" % i, priority=PRIORITIES[i % 3]) for i in range(njobs)]
        cp, summary = self.publish_batch(cfg, jobs)
        self.assertEqual((cp.returncode, summary["published"]), (0, njobs), summary)

        victim = self.progs.start_consumer(cfg, name="victim", wait_ready=False)
        survivor = self.progs.start_consumer(cfg, name="survivor", wait_ready=False)
        for p in (victim, survivor):
            wait_for(lambda p=p: log_msgs(p, "consumer ready"), 60, "%s ready" % p.jf_name,
                     procs=[victim, survivor])

        def under_way():
            stats = log_msgs(victim, "stats")
            return stats and stats[-1]["acked"] >= 50 and stats[-1]["in_flight"] > 0 and stats[-1]
        last_stats = wait_for(under_way, 60, "the victim to ack jobs with more in flight",
                              interval=0.02, procs=[victim, survivor])
        before = self.durable_state("JOBS", WORK_DURABLES)
        self.progs.kill9(victim)
        pending_at_kill = sum(i["num_pending"] for i in before.values())
        self.assertGreater(pending_at_kill, 0, "the fleet finished before the kill: test proves nothing")

        infos = self.wait_drained(WORK_DURABLES, 180, procs=[survivor])
        self.assert_all_acked(infos, {"work-%s" % p: job_subject("work", p, "t")
                                      for p in PRIORITIES})
        self.assertEqual(self.dlq_count(), 0)
        deliveries = sum(i["delivered"]["consumer_seq"] for i in infos.values())
        self.assertGreater(deliveries, njobs,
                           "jobs the victim held must have been redelivered")
        stopped = self.stop_consumer(survivor)
        print("\nkill -9 with %d in flight (%d acked): %d redeliveries, survivor acked %d"
              % (last_stats["in_flight"], last_stats["acked"], deliveries - njobs,
                 stopped.get("acked", 0)))

    def test_sigterm_drains_within_grace(self):
        grace, delay, limit, njobs = 10, 3, 8, 20
        # ack_wait far beyond the test's deadlines: a job left unacked and
        # not NAKed by the stopping process would not come back in time.
        cfg = self.fleet_config({"work": {"kind": "noop", "delay": "%ds" % delay,
                                          "ack_wait": "120s"}},
                                max_in_flight=limit, shutdown_grace="%ds" % grace)
        proc = self.progs.start_consumer(cfg)
        # Jobs on all three priorities: with work on one durable only, the
        # slots that the other durables' open pulls hold stay unused.
        for i in range(njobs):
            self.nc.js_publish(job_subject("work", PRIORITIES[i % 3], "t"),
                               enc(envelope("g-%d" % i, priority=PRIORITIES[i % 3])),
                               headers={"Nats-Msg-Id": "g-%d" % i})
        wait_for(lambda: any(l["in_flight"] == limit for l in log_msgs(proc, "stats")), 30,
                 "a stats line with in_flight=%d" % limit, procs=[proc])
        t0 = time.monotonic()
        self.progs.send_signal(proc, signal.SIGTERM)
        rc = self.progs.wait_exit(proc, timeout=grace + 5)
        elapsed = time.monotonic() - t0
        self.assertIsNotNone(rc, "no exit within shutdown_grace + 5s")
        self.assertEqual(rc, 0)
        stopped = self.stopped_line(proc)
        acked = stopped.get("acked")
        self.assertGreaterEqual(acked, limit, "jobs in flight at SIGTERM must finish: %r" % stopped)
        self.assertLess(acked, njobs, "SIGTERM must stop pulling new jobs: %r" % stopped)
        self.assertEqual(stopped.get("dead"), 0, stopped)

        # Whatever was not acked must be available again at once (never
        # delivered, or NAKed): fresh pulls get exactly the rest.
        rest = njobs - acked
        got = []
        deadline = time.monotonic() + 15
        while len(got) < rest and time.monotonic() < deadline:
            for d in WORK_DURABLES:
                got += self.nc.pull("JOBS", d, rest, expires=0.5)
        self.assertEqual(len(got), rest, "jobs not acked by the stopped consumer and not "
                         "redeliverable now: %d of %d" % (len(got), rest))
        for m in got:
            self.nc.ack(m)
        infos = self.durable_state("JOBS", WORK_DURABLES)
        for d, info in infos.items():
            self.assertEqual((info["num_pending"], info["num_ack_pending"]), (0, 0), d)
        print("\nSIGTERM with %d in flight: exit 0 after %.2fs, %d acked, %d handed back"
              % (limit, elapsed, acked, rest))

    def test_sigterm_naks_jobs_past_grace(self):
        grace, limit, njobs = 1, 8, 12
        cfg = self.fleet_config({"work": {"kind": "noop", "delay": "30s", "ack_wait": "120s"}},
                                max_in_flight=limit, shutdown_grace="%ds" % grace)
        proc = self.progs.start_consumer(cfg)
        for i in range(njobs):
            self.nc.js_publish(job_subject("work", PRIORITIES[i % 3], "t"),
                               enc(envelope("n-%d" % i, priority=PRIORITIES[i % 3])),
                               headers={"Nats-Msg-Id": "n-%d" % i})
        wait_for(lambda: any(l["in_flight"] == limit for l in log_msgs(proc, "stats")), 30,
                 "a stats line with in_flight=%d" % limit, procs=[proc])
        t0 = time.monotonic()
        self.progs.send_signal(proc, signal.SIGTERM)
        rc = self.progs.wait_exit(proc, timeout=grace + 10)
        elapsed = time.monotonic() - t0
        self.assertIsNotNone(rc, "no exit within shutdown_grace + 10s")
        self.assertEqual(rc, 0)
        self.assertGreaterEqual(elapsed, grace - 0.1, "jobs in flight get shutdown_grace to finish")
        stopped = self.stopped_line(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("dead")), (0, 0), stopped)

        # The 30s jobs cut off by the grace period were NAKed: every job can
        # be pulled again now, long before ack_wait (120s).
        got = []
        deadline = time.monotonic() + 15
        while len(got) < njobs and time.monotonic() < deadline:
            for d in WORK_DURABLES:
                got += self.nc.pull("JOBS", d, njobs, expires=0.5)
        self.assertEqual(sorted(json.loads(m.data)["id"] for m in got),
                         sorted("n-%d" % i for i in range(njobs)))
        redelivered = [m for m in got if ack_metadata(m.reply)["delivered"] > 1]
        self.assertGreaterEqual(len(redelivered), limit, "the jobs in flight at SIGTERM "
                                "come back as redeliveries")
        print("\nSIGTERM with %d jobs of 30s in flight, grace %ds: exit 0 after %.2fs"
              % (limit, grace, elapsed))

    def test_bad_config_is_refused(self):
        path = self.config(consumer={"max_in_flite": 5}, services={"work": {"kind": "noop"}})
        with open(path) as f:
            line = next(i for i, l in enumerate(f, 1) if l.startswith("max_in_flite"))
        for run in (lambda: self.progs.run_consumer_once(["--config", path]),
                    lambda: self.progs.run_publisher(["--config", path, "publish", "--service",
                                                      "work", "--type", "t"])):
            cp = run()
            err = cp.stderr.decode(errors="replace")
            self.assertEqual(cp.returncode, 2, err)
            self.assertIn("%s:%d" % (path, line), err)
            self.assertIn("max_in_flite", err)

        good = self.config(services={"work": {"kind": "noop"}})
        cp = self.progs.run_consumer_once(["--config", good],
                                          env={"JETFLEET_CONSUMER_MAX_IN_FLIGHT": "lots"})
        err = cp.stderr.decode(errors="replace")
        self.assertEqual(cp.returncode, 2, err)
        self.assertIn("JETFLEET_CONSUMER_MAX_IN_FLIGHT", err)

        missing = os.path.join(self.tmp, "nope.ini")
        cp = self.progs.run_consumer_once(["--config", missing])
        self.assertEqual(cp.returncode, 2)
        self.assertIn(missing, cp.stderr.decode(errors="replace"))

        cp = self.progs.run_consumer_once(["--no-such-option"])
        self.assertEqual(cp.returncode, 2)

        cp = self.progs.run_consumer_once(["--help"])
        self.assertEqual(cp.returncode, 0, cp.stderr)
        out = (cp.stdout + cp.stderr).decode(errors="replace")
        self.assertIn("usage", out.lower())
        self.assertIn("--config", out)
        self.assertFalse(self.nc.stream_exists("JOBS"), "a refused start must not provision")


if __name__ == "__main__":
    unittest.main()
