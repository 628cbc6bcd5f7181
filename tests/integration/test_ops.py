"""Operating the fleet (issue 4, items 1-3) against a real nats-server -js,
real jetfleet-consumer processes and, where the ledger is involved, a real
PostgreSQL (pgharness):

  jetfleet-publisher replay    a window of JOBS by sequence or time, --subject,
                               --until, --rate, --dry-run; the ledger's
                               replays / attempts reset
  jetfleet-publisher dlq       list / show / redrive / purge with filters;
                               re-drive deletes only after the PubAck
  jetfleet-publisher status    numbers equal to consumer info and the ledger;
                               status JOB_ID
  jetfleet-publisher batch --wait

Run from this directory:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_ops
"""

import base64
import itertools
import json
import os
import re
import signal
import time
import unittest

import pgharness
from jfharness import (JetfleetTestCase, ack_metadata, envelope, hval, make_config,
                       publisher_json, wait_for, write_config)

PRIORITIES = ("high", "normal", "low")
REPLAY_ID_RE = re.compile(r"^replay-(\d+)-(\d{13})$")


def durables_of(service):
    return tuple("%s-%s" % (service, p) for p in PRIORITIES)


def sql_literal(s):
    return "'" + s.replace("'", "''") + "'"


def json_lines(cp):
    return [json.loads(l) for l in cp.stdout.decode("utf-8").splitlines() if l.strip()]


# Services for the tests. The breaker would open on the deliberate failures
# and only slow things down (it has tests of its own).
NO_BREAKER = {"breaker_window": 1000, "breaker_min_calls": 1000}


def noop(**keys):
    s = {"kind": "noop", "backoff": "100ms", "max_deliver": 5}
    s.update(NO_BREAKER)
    s.update(keys)
    return s


class OpsTestCase(JetfleetTestCase):
    """A nats-server per test (JetfleetTestCase), PostgreSQL on demand."""

    pg = None
    _fakes = itertools.count(1)

    def start_pg(self):
        ok, why = pgharness.available()
        if not ok:
            self.skipTest("no PostgreSQL: " + why)
        self.pg = pgharness.PostgresServer()
        self.progs.logs.append(("postgresql", self.pg.log_path))
        self.pg.start()
        return self.pg

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            if self.pg is not None:
                self.pg.cleanup()

    # --- config and programs

    def write_cfg(self, services, ledger=False, name="jetfleet.ini", **consumer):
        c = {"max_in_flight": 64}
        c.update(consumer)
        extra = "[postgres]\ndsn = %s\n" % self.pg.dsn() if ledger else ""
        return write_config(self.tmp, make_config(self.nats.url, consumer=c, services=services,
                                                  extra=extra), name=name)

    def pub(self, cfg, *args, check=None, timeout=120):
        return self.progs.run_publisher(["--config", cfg] + list(args), check=check,
                                        timeout=timeout)

    def stop_consumer(self, proc):
        self.assertEqual(self.progs.stop(proc, signal.SIGTERM, timeout=60), 0,
                         "%s exit code after SIGTERM" % proc.jf_name)

    def publish_ok(self, cfg, jobs, name="jobs.ndjson"):
        cp, summary = self.publish_batch(cfg, jobs, name=name)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual((summary["published"], summary["failed"]), (len(jobs), 0), summary)

    # --- state

    def last_seq(self, stream="JOBS"):
        return self.nc.stream_info(stream)["state"]["last_seq"]

    def msg_count(self, stream):
        return self.nc.stream_info(stream)["state"]["messages"]

    def ledger(self, job_ids=None):
        """{job_id: {status, attempts, replays, replayed, stream_seq}}."""
        where = ""
        if job_ids is not None:
            where = " WHERE job_id IN (%s)" % ",".join(sql_literal(i) for i in job_ids)
        rows = self.pg.query("SELECT job_id, status, attempts, replays, replayed_at IS NOT NULL,"
                             " stream_seq FROM jetfleet_jobs" + where)
        return {r[0]: {"status": r[1], "attempts": int(r[2]), "replays": int(r[3]),
                       "replayed": r[4] == "t", "stream_seq": int(r[5])} for r in rows}

    def wait_ledger(self, job_ids, cond, timeout, what, procs=()):
        def check():
            rows = self.ledger(job_ids)
            if len(rows) == len(job_ids) and all(cond(r) for r in rows.values()):
                return rows
            return None
        return wait_for(check, timeout, what, interval=0.1, procs=procs)

    def fake_dead_letter(self, body, subject, reason="permanent", orig_seq=1,
                         orig_subject=None, error="boom"):
        """Stores a dead letter as a consumer would (DESIGN.md headers)."""
        orig_subject = orig_subject or "jobs." + subject.split(".", 1)[1]
        headers = {"Jetfleet-Reason": reason, "Jetfleet-Error": error,
                   "Jetfleet-Deliveries": "1", "Jetfleet-Stream": "JOBS",
                   "Jetfleet-Stream-Seq": str(orig_seq), "Jetfleet-Subject": orig_subject,
                   "Jetfleet-Failed-At": "2026-01-02T03:04:05.678Z",
                   # unique: the dead letters of a test's consumer use dlq-JOBS-<seq>
                   "Nats-Msg-Id": "dlq-JOBS-%d-fake-%d" % (orig_seq, next(self._fakes))}
        return self.nc.js_publish(subject, body, headers=headers)["seq"]


# ---------------------------------------------------------------------------

class TestCli(OpsTestCase):

    def test_help_for_every_subcommand(self):
        cfg = self.config(services={"work": noop()})
        for args, marker in [(["replay", "--help"], "--from-seq"),
                             (["dlq", "--help"], "redrive"),
                             (["dlq", "list", "--help"], "--limit"),
                             (["dlq", "show", "--help"], "dlq show SEQ"),
                             (["dlq", "redrive", "--help"], "redrive-<dlq seq>"),
                             (["dlq", "purge", "--help"], "--yes"),
                             (["status", "--help"], "--interval"),
                             (["batch", "--help"], "--wait")]:
            cp = self.pub(cfg, *args)
            self.assertEqual(cp.returncode, 0, (args, cp.stderr))
            out = cp.stdout.decode()
            self.assertTrue(out.startswith("Usage: jetfleet-publisher"), (args, out[:80]))
            self.assertIn(marker, out, args)

    def test_usage_errors_exit_2_with_a_reason(self):
        cfg = self.config(services={"work": noop()})
        for args, words in [
                (["replay"], "exactly one of --from-seq"),
                (["replay", "--from-seq", "1", "--since", "1h"], "exactly one of --from-seq"),
                (["replay", "--from-seq", "0"], "--from-seq"),
                (["replay", "--since", "yesterday"], "--since"),
                (["replay", "--from-seq", "5", "--until", "3"], "before --from-seq"),
                (["replay", "--from-seq", "1", "--subject", "dlq.>"], "--subject"),
                (["replay", "--from-seq", "1", "--subject", "jobs.>.x"], "--subject"),
                (["replay", "--from-seq", "1", "--rate", "fast"], "--rate"),
                (["dlq"], "missing command"),
                (["dlq", "nope"], "unknown command"),
                (["dlq", "list", "--reason", "other"], "--reason"),
                (["dlq", "list", "--subject", "jobs.>"], "--subject"),
                (["dlq", "list", "--rate", "1"], "does not apply"),
                (["dlq", "show"], "missing SEQ"),
                (["dlq", "show", "x"], "not a sequence"),
                (["dlq", "purge"], "--yes"),
                (["status", "--interval", "soon"], "--interval"),
                (["status", "--json", "job-1"], "--json"),
                (["batch", "--timeout", "5s", "x.ndjson"], "--wait")]:
            cp = self.pub(cfg, *args)
            err = cp.stderr.decode()
            self.assertEqual(cp.returncode, 2, (args, err))
            self.assertIn(words, err, args)
            self.assertEqual(cp.stdout, b"", args)


# ---------------------------------------------------------------------------

class TestReplay(OpsTestCase):

    def test_replay_by_seq_resets_the_ledger_once_per_replayed_message(self):
        self.start_pg()
        # First run: every job fails twice before it succeeds (attempts 3).
        cfg1 = self.write_cfg({"work": noop(fail_attempts=2)}, ledger=True, name="run1.ini")
        proc = self.progs.start_consumer(cfg1)
        ids = ["r-%d" % i for i in range(1, 7)]
        self.publish_ok(cfg1, [envelope(i, payload={"n": k}) for k, i in enumerate(ids)])
        self.wait_ledger(ids, lambda r: r["status"] == "succeeded", 60, "the first run",
                         procs=[proc])
        self.stop_consumer(proc)
        before = self.ledger(ids)
        self.assertEqual({r["attempts"] for r in before.values()}, {3})
        self.assertEqual({r["replays"] for r in before.values()}, {0})
        originals = {m["seq"]: m for m in self.nc.stream_messages("JOBS")}
        self.assertEqual(sorted(originals), [1, 2, 3, 4, 5, 6])

        # The "fixed" service fails only the first attempt: the replayed
        # message is redelivered once, which must count as an attempt of the
        # same replay, not as another replay.
        cfg2 = self.write_cfg({"work": noop(fail_attempts=1)}, ledger=True, name="run2.ini")
        proc = self.progs.start_consumer(cfg2)
        t0 = int(time.time() * 1000)
        cp = self.pub(cfg2, "replay", "--from-seq", "2", "--until", "4", check=0)
        t1 = int(time.time() * 1000)
        summary = publisher_json(cp)
        self.assertEqual(summary["replayed"], 3, summary)
        self.assertEqual((summary["skipped"], summary["failed"], summary["from_seq"],
                          summary["to_seq"]), (0, 0, 2, 4), summary)
        self.assertIsInstance(summary["seconds"], (int, float))

        # Exactly three new messages: the run never reads back its own.
        self.assertEqual(self.last_seq(), 9)
        run_ms = set()
        for new in self.nc.stream_messages("JOBS")[6:]:
            orig_seq = int(hval(new["headers"], "Jetfleet-Replay-Of-Seq"))
            orig = originals[orig_seq]
            self.assertEqual(new["subject"], orig["subject"])
            self.assertEqual(new["data"], orig["data"], "body unchanged")
            self.assertEqual(hval(new["headers"], "Jetfleet-Replay-Of-Id"),
                             json.loads(orig["data"])["id"])
            m = REPLAY_ID_RE.match(hval(new["headers"], "Nats-Msg-Id"))
            self.assertIsNotNone(m, new["headers"])
            self.assertEqual(int(m.group(1)), orig_seq)
            self.assertTrue(t0 <= int(m.group(2)) <= t1)
            run_ms.add(m.group(2))
        self.assertEqual(len(run_ms), 1, "one run, one timestamp")

        replayed = ["r-2", "r-3", "r-4"]
        rows = self.wait_ledger(replayed, lambda r: r["status"] == "succeeded"
                                and r["stream_seq"] > 6, 60, "the replayed jobs", procs=[proc])
        for job_id, r in rows.items():
            self.assertEqual((r["attempts"], r["replays"], r["replayed"]), (2, 1, True),
                             (job_id, r))
        for job_id in ("r-1", "r-5", "r-6"):
            self.assertEqual(self.ledger([job_id])[job_id], before[job_id])
        self.wait_drained(durables_of("work"), 30, procs=[proc])
        # The ack floor passed the replayed messages: none is still pending.
        self.assertEqual(self.ledger(replayed), rows)

        # The same window again is a second replay (a new Nats-Msg-Id).
        cp = self.pub(cfg2, "replay", "--from-seq", "2", "--until", "4", check=0)
        self.assertEqual(publisher_json(cp)["replayed"], 3)
        self.wait_ledger(replayed, lambda r: r["replays"] == 2 and r["status"] == "succeeded",
                         60, "the second replay", procs=[proc])

    def test_replay_by_time_with_subject_filter(self):
        self.start_pg()
        cfg = self.write_cfg({"work": noop(), "other": noop()}, ledger=True)
        proc = self.progs.start_consumer(cfg)
        early = [envelope("early-%d" % i) for i in range(3)]
        self.publish_ok(cfg, early, name="early.ndjson")
        # Stored times are the server's (ms are what --since keeps): wait
        # until its clock is past the early jobs' millisecond.
        last_early = self.nc.stream_msg_get("JOBS", self.last_seq())["time"]

        def clock_moved():
            self.nc.js_publish("jobs.clock.normal.t", b"x")
            return self.nc.stream_msg_get("JOBS", self.last_seq())["time"][:23] > last_early[:23]
        wait_for(clock_moved, 10, "the server clock to pass the early jobs")
        first_late = self.last_seq() + 1
        late = [envelope("late-w-%d" % i, priority=PRIORITIES[i % 3]) for i in range(4)]
        late += [envelope("late-o-%d" % i, service="other") for i in range(2)]
        self.publish_ok(cfg, late, name="late.ndjson")
        all_ids = [e["id"] for e in early + late]
        self.wait_ledger(all_ids, lambda r: r["status"] == "succeeded", 60, "all jobs",
                         procs=[proc])
        since = self.nc.stream_msg_get("JOBS", first_late)["time"]  # the first late job
        last = self.last_seq()

        cp = self.pub(cfg, "replay", "--since", since, "--subject", "jobs.work.>", check=0)
        summary = publisher_json(cp)
        self.assertEqual((summary["replayed"], summary["skipped"], summary["failed"]),
                         (4, 0, 0), summary)
        self.assertEqual(summary["from_seq"], first_late)
        new = self.nc.stream_messages("JOBS")[last:]
        self.assertEqual(sorted(hval(m["headers"], "Jetfleet-Replay-Of-Id") for m in new),
                         sorted(e["id"] for e in late[:4]))
        # The invalid message on jobs.clock.* is outside the filter: not even skipped.
        rows = self.wait_ledger([e["id"] for e in late[:4]], lambda r: r["replays"] == 1
                                and r["status"] == "succeeded", 60, "the replayed jobs",
                                procs=[proc])
        self.assertEqual({r["attempts"] for r in rows.values()}, {1})
        others = self.ledger([e["id"] for e in early + late[4:]])
        self.assertEqual({r["replays"] for r in others.values()}, {0})

        # --until TIME (inclusive, to the millisecond): the late work jobs
        # stored in the first late job's millisecond.
        stored = self.nc.stream_messages("JOBS")
        expect = [m["seq"] for m in stored if first_late <= m["seq"] <= last
                  and m["subject"].startswith("jobs.work.") and m["time"][:23] <= since[:23]]
        last = self.last_seq()
        cp = self.pub(cfg, "replay", "--since", since, "--until", since, "--subject",
                      "jobs.work.>", check=0)
        summary = publisher_json(cp)
        self.assertEqual((summary["replayed"], summary["from_seq"], summary["to_seq"]),
                         (len(expect), first_late, expect[-1]), summary)
        self.assertEqual(self.last_seq(), last + len(expect))
        self.assertEqual([int(hval(m["headers"], "Jetfleet-Replay-Of-Seq"))
                          for m in self.nc.stream_messages("JOBS")[last:]], expect)

    def test_dry_run_publishes_nothing_and_skips_invalid_jobs(self):
        cfg = self.config(services={"work": noop(), "other": noop()})
        jobs = [envelope("d-%d" % i) for i in range(4)] + [envelope("o-1", service="other")]
        self.publish_ok(cfg, jobs)
        self.nc.js_publish("jobs.work.normal.t", b"{not json")
        past = envelope("expired-1", deadline="2020-01-01T00:00:00Z")
        self.nc.js_publish("jobs.work.normal.t", json.dumps(past).encode())
        last = self.last_seq()

        cp = self.pub(cfg, "replay", "--from-seq", "1", "--dry-run", check=0)
        lines = json_lines(cp)
        listed, summary = lines[:-1], lines[-1]
        self.assertEqual(listed, [{"seq": i + 1, "subject": "jobs.%s.normal.t" % e["service"],
                                   "id": e["id"]} for i, e in enumerate(jobs)])
        self.assertEqual((summary["replayed"], summary["skipped"], summary["failed"],
                          summary["from_seq"], summary["to_seq"], summary["dry_run"]),
                         (5, 2, 0, 1, last, True), summary)
        self.assertEqual(self.last_seq(), last, "a dry run publishes nothing")

        cp = self.pub(cfg, "replay", "--from-seq", "2", "--subject", "jobs.other.>",
                      "--dry-run", check=0)
        self.assertEqual(json_lines(cp)[:-1],
                         [{"seq": 5, "subject": "jobs.other.normal.t", "id": "o-1"}])

        # The real run republishes the same set, skipping the same two.
        cp = self.pub(cfg, "replay", "--from-seq", "1", check=0)
        self.assertEqual((publisher_json(cp)["replayed"], publisher_json(cp)["skipped"]), (5, 2))
        self.assertEqual(self.last_seq(), last + 5)

    def test_empty_window_and_rate(self):
        cfg = self.config(services={"work": noop()})
        cp = self.pub(cfg, "replay", "--from-seq", "1", check=0)
        self.assertEqual(publisher_json(cp), {"replayed": 0, "skipped": 0, "failed": 0,
                                              "from_seq": None, "to_seq": None,
                                              "seconds": publisher_json(cp)["seconds"]})
        self.publish_ok(cfg, [envelope("p-%d" % i) for i in range(10)])
        cp = self.pub(cfg, "replay", "--from-seq", "11", check=0)
        self.assertEqual(publisher_json(cp)["replayed"], 0)
        t0 = time.monotonic()
        cp = self.pub(cfg, "replay", "--from-seq", "1", "--rate", "20/s", check=0)
        elapsed = time.monotonic() - t0
        summary = publisher_json(cp)
        self.assertEqual(summary["replayed"], 10)
        # 10 messages at 20/s: the last one goes 450 ms after the first.
        self.assertGreaterEqual(summary["seconds"], 0.44)
        self.assertGreaterEqual(elapsed, 0.44)
        # The window's consumer is gone.
        self.assertEqual(self.nc.consumer_names("JOBS"), [])


# ---------------------------------------------------------------------------

class TestDlq(OpsTestCase):

    def make_dead_letters(self):
        """Dead letters of three reasons on two services; returns the config."""
        cfg = self.config(services={"bad": noop(fail_attempts=5, max_deliver=1),
                                    "bad2": noop(fail_attempts=5, max_deliver=1)},
                          consumer={"max_in_flight": 64})
        proc = self.progs.start_consumer(cfg)
        jobs = [envelope("b-%d" % i, service="bad", priority=PRIORITIES[i % 3], payload={"i": i})
                for i in range(4)]
        jobs += [envelope("c-%d" % i, service="bad2") for i in range(2)]
        jobs.append(envelope("x-1", service="bad", deadline="2020-01-01T00:00:00Z"))
        self.publish_ok(cfg, jobs)
        self.nc.js_publish("jobs.bad.normal.t", b"[1,2")
        wait_for(lambda: self.msg_count("JOBS_DLQ") == 8, 60, "8 dead letters", procs=[proc])
        self.stop_consumer(proc)
        return cfg

    def test_list_show_and_filters(self):
        cfg = self.make_dead_letters()
        stored = {m["seq"]: m for m in self.nc.all_dlq_messages()}

        entries = json_lines(self.pub(cfg, "dlq", "list", check=0))
        self.assertEqual([e["seq"] for e in entries], sorted(stored))
        for e in entries:
            m = stored[e["seq"]]
            h = m["headers"]
            body = m["data"]
            try:
                job_id = json.loads(body)["id"]
            except ValueError:
                job_id = None
            self.assertEqual(e, {"seq": m["seq"], "subject": m["subject"],
                                 "reason": hval(h, "Jetfleet-Reason"),
                                 "error": hval(h, "Jetfleet-Error"),
                                 "deliveries": int(hval(h, "Jetfleet-Deliveries")),
                                 "failed_at": hval(h, "Jetfleet-Failed-At"),
                                 "stream_seq": int(hval(h, "Jetfleet-Stream-Seq")),
                                 "original_subject": hval(h, "Jetfleet-Subject"),
                                 "job_id": job_id})
        reasons = sorted(e["reason"] for e in entries)
        self.assertEqual(reasons, ["expired", "invalid"] + ["max_deliveries"] * 6)

        only = json_lines(self.pub(cfg, "dlq", "list", "--reason", "invalid", check=0))
        self.assertEqual([(e["reason"], e["job_id"]) for e in only], [("invalid", None)])
        only = json_lines(self.pub(cfg, "dlq", "list", "--subject", "dlq.bad2.>", check=0))
        self.assertEqual(sorted(e["job_id"] for e in only), ["c-0", "c-1"])
        only = json_lines(self.pub(cfg, "dlq", "list", "--subject", "dlq.bad.high.>",
                                   "--reason", "max_deliveries", check=0))
        self.assertEqual(sorted(e["job_id"] for e in only), ["b-0", "b-3"])
        only = json_lines(self.pub(cfg, "dlq", "list", "--limit", "2", check=0))
        self.assertEqual([e["seq"] for e in only], sorted(stored)[:2])

        seq = next(e["seq"] for e in entries if e["job_id"] == "b-1")
        shown = json.loads(self.pub(cfg, "dlq", "show", str(seq), check=0).stdout)
        m = stored[seq]
        self.assertEqual(shown["seq"], seq)
        self.assertEqual(shown["subject"], m["subject"])
        self.assertEqual(shown["body"].encode(), m["data"])
        self.assertEqual(shown["headers"], {k: v[0] for k, v in m["headers"].items()})
        self.assertRegex(shown["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

        bad = self.fake_dead_letter(b"\xff\xfe", "dlq.bad.low.t")
        shown = json.loads(self.pub(cfg, "dlq", "show", str(bad), check=0).stdout)
        self.assertEqual(base64.b64decode(shown["body_base64"]), b"\xff\xfe")

        cp = self.pub(cfg, "dlq", "show", "9999")
        self.assertEqual(cp.returncode, 1)
        self.assertIn("no dead letter with sequence 9999 in JOBS_DLQ", cp.stderr.decode())
        self.assertEqual(self.nc.consumer_names("JOBS_DLQ"), [])

    def test_purge_with_and_without_filters(self):
        cfg = self.make_dead_letters()
        cp = self.pub(cfg, "dlq", "purge")
        self.assertEqual(cp.returncode, 2)
        self.assertEqual(self.msg_count("JOBS_DLQ"), 8)

        cp = self.pub(cfg, "dlq", "purge", "--reason", "invalid", check=0)
        self.assertEqual(publisher_json(cp)["purged"], 1)
        cp = self.pub(cfg, "dlq", "purge", "--subject", "dlq.bad2.>", check=0)
        self.assertEqual(publisher_json(cp)["purged"], 2)
        left = [hval(m["headers"], "Jetfleet-Reason") for m in self.nc.all_dlq_messages()]
        self.assertEqual(sorted(left), ["expired"] + ["max_deliveries"] * 4)
        cp = self.pub(cfg, "dlq", "purge", "--reason", "expired", "--subject", "dlq.bad.high.>",
                      check=0)
        self.assertEqual(publisher_json(cp)["purged"], 0)
        cp = self.pub(cfg, "dlq", "purge", "--yes", check=0)
        self.assertEqual(publisher_json(cp)["purged"], 5)
        self.assertEqual(self.msg_count("JOBS_DLQ"), 0)
        self.assertEqual(json_lines(self.pub(cfg, "dlq", "list", check=0)), [])

    def test_redrive_with_ledger_runs_the_jobs_again(self):
        self.start_pg()
        services = {"bad": noop(fail_attempts=5, max_deliver=2),
                    "good": noop()}
        cfg1 = self.write_cfg(services, ledger=True, name="broken.ini")
        proc = self.progs.start_consumer(cfg1)
        ids = ["rd-%d" % i for i in range(5)]
        self.publish_ok(cfg1, [envelope(i, service="bad", payload={"i": k})
                               for k, i in enumerate(ids)])
        self.nc.js_publish("jobs.bad.normal.t", b"garbage")
        self.wait_ledger(ids, lambda r: r["status"] == "dead" and r["attempts"] == 2, 60,
                         "the dead jobs", procs=[proc])
        wait_for(lambda: self.msg_count("JOBS_DLQ") == 6, 30, "6 dead letters", procs=[proc])
        self.stop_consumer(proc)
        jobs_last = self.last_seq()

        cp = self.pub(cfg1, "dlq", "redrive", "--reason", "max_deliveries", "--dry-run", check=0)
        lines = json_lines(cp)
        self.assertEqual(sorted(l["job_id"] for l in lines[:-1]), ids)
        self.assertEqual({l["subject"] for l in lines[:-1]}, {"jobs.bad.normal.t"})
        self.assertEqual((lines[-1]["redriven"], lines[-1]["dry_run"]), (5, True))
        self.assertEqual((self.msg_count("JOBS_DLQ"), self.last_seq()), (6, jobs_last))

        # The service is fixed; re-drive what died of max_deliveries.
        services["bad"] = noop()
        cfg2 = self.write_cfg(services, ledger=True, name="fixed.ini")
        proc = self.progs.start_consumer(cfg2)
        dlq_before = {m["seq"]: m for m in self.nc.all_dlq_messages()}
        cp = self.pub(cfg2, "dlq", "redrive", "--reason", "max_deliveries", "--rate", "100",
                      check=0)
        self.assertEqual(publisher_json(cp), {"redriven": 5, "duplicates": 0, "skipped": 0,
                                              "failed": 0,
                                              "seconds": publisher_json(cp)["seconds"]})
        left = self.nc.all_dlq_messages()
        self.assertEqual([hval(m["headers"], "Jetfleet-Reason") for m in left], ["invalid"])
        new = self.nc.stream_messages("JOBS")[jobs_last:]
        self.assertEqual(len(new), 5)
        for m in new:
            dseq = int(hval(m["headers"], "Jetfleet-Redrive-Of"))
            self.assertEqual(hval(m["headers"], "Nats-Msg-Id"), "redrive-%d" % dseq)
            self.assertEqual(m["data"], dlq_before[dseq]["data"])
            self.assertEqual(m["subject"], hval(dlq_before[dseq]["headers"], "Jetfleet-Subject"))
        rows = self.wait_ledger(ids, lambda r: r["status"] == "succeeded", 60,
                                "the re-driven jobs", procs=[proc])
        for job_id, r in rows.items():
            self.assertEqual((r["attempts"], r["replays"], r["replayed"]), (1, 1, True),
                             (job_id, r))

        # Nothing left to re-drive for that reason; the invalid one stays.
        cp = self.pub(cfg2, "dlq", "redrive", "--reason", "max_deliveries", check=0)
        self.assertEqual(publisher_json(cp)["redriven"], 0)
        self.assertEqual(self.msg_count("JOBS_DLQ"), 1)

    def test_redrive_deletes_only_after_the_puback(self):
        cfg = self.config(services={"work": noop()})
        self.pub(cfg, "status", "--interval", "0", check=0)  # creates the streams
        seqs = [self.fake_dead_letter(json.dumps(envelope("f-%d" % i)).encode(),
                                      "dlq.work.normal.t", orig_seq=100 + i) for i in range(4)]
        # JOBS is full and refuses new messages: no PubAck, no delete.
        info = self.nc.stream_info("JOBS")["config"]
        self.nc.js_publish("jobs.work.normal.t", json.dumps(envelope("filler")).encode(),
                           headers={"Nats-Msg-Id": "filler"})
        self.nc.js_api("STREAM.UPDATE.JOBS", dict(info, max_msgs=1, discard="new"))
        cp = self.pub(cfg, "dlq", "redrive")
        self.assertEqual(cp.returncode, 1, cp.stderr)
        s = publisher_json(cp)
        self.assertEqual((s["redriven"], s["failed"]), (0, 4), s)
        self.assertEqual([m["seq"] for m in self.nc.all_dlq_messages()], seqs)
        self.assertEqual(self.msg_count("JOBS"), 1)

        # One of them was re-driven before (a crash came before its delete).
        self.nc.js_api("STREAM.UPDATE.JOBS", info)
        self.nc.js_publish("jobs.work.normal.t", json.dumps(envelope("f-0")).encode(),
                           headers={"Nats-Msg-Id": "redrive-%d" % seqs[0]})
        cp = self.pub(cfg, "dlq", "redrive", check=0)
        s = publisher_json(cp)
        self.assertEqual((s["redriven"], s["duplicates"], s["failed"]), (3, 1, 0), s)
        self.assertEqual(self.msg_count("JOBS_DLQ"), 0)
        self.assertEqual(self.msg_count("JOBS"), 1 + 4)
        ids = sorted(hval(m["headers"], "Nats-Msg-Id") for m in self.nc.stream_messages("JOBS"))
        self.assertEqual(ids, sorted(["filler"] + ["redrive-%d" % q for q in seqs]))

    def test_redrive_skips_entries_without_an_original_subject(self):
        cfg = self.config(services={"work": noop()})
        self.pub(cfg, "status", "--interval", "0", check=0)
        ok = self.fake_dead_letter(b'{"id":"s-1"}', "dlq.work.normal.t")
        bad = self.fake_dead_letter(b'{"id":"s-2"}', "dlq.work.normal.t",
                                    orig_subject="jobs.work.>", orig_seq=2)
        cp = self.pub(cfg, "dlq", "redrive", check=0)
        s = publisher_json(cp)
        self.assertEqual((s["redriven"], s["skipped"], s["failed"]), (1, 1, 0), s)
        self.assertEqual([m["seq"] for m in self.nc.all_dlq_messages()], [bad])
        self.assertNotEqual(ok, bad)


# ---------------------------------------------------------------------------

class TestStatus(OpsTestCase):

    def test_status_numbers_match_consumer_info(self):
        cfg = self.config(services={"work": noop(), "bad": noop()},
                          consumer={"max_in_flight": 64})
        # The consumer creates the durables; then it stops, so nothing moves.
        self.stop_consumer(self.progs.start_consumer(cfg))
        self.publish_ok(cfg, [envelope("s-%d" % i) for i in range(10)] +
                        [envelope("h-%d" % i, priority="high") for i in range(3)])
        held = self.nc.pull("JOBS", "work-normal", 4)
        self.assertEqual(len(held), 4)
        # Two of them handed back and delivered again: redelivered.
        for m in held[:2]:
            self.nc.ack(m, b"-NAK")
        again = self.nc.pull("JOBS", "work-normal", 2)
        self.assertEqual([(ack_metadata(m.reply)["stream_seq"], ack_metadata(m.reply)["delivered"])
                          for m in again],
                         [(ack_metadata(m.reply)["stream_seq"], 2) for m in held[:2]])
        self.nc.ack(self.nc.pull("JOBS", "work-high", 1)[0])
        self.fake_dead_letter(b"{}", "dlq.work.high.t", orig_seq=1)
        self.fake_dead_letter(b"{}", "dlq.work.high.u", orig_seq=2)
        self.fake_dead_letter(b"{}", "dlq.bad.low.t", orig_seq=3)

        cp = self.pub(cfg, "status", "--json", "--interval", "0", check=0)
        st = publisher_json(cp)
        infos = {d: self.nc.consumer_info("JOBS", d) for d in durables_of("work") +
                 durables_of("bad")}
        dead = {"work-high": 2, "bad-low": 1}
        self.assertEqual(len(st["consumers"]), 6)
        for c in st["consumers"]:
            i = infos[c["durable"]]
            self.assertEqual(c["durable"], "%s-%s" % (c["service"], c["priority"]))
            self.assertEqual((c["pending"], c["in_flight"], c["redelivered"], c["waiting"],
                              c["ack_floor"], c["dead"]),
                             (i["num_pending"], i["num_ack_pending"], i["num_redelivered"],
                              i["num_waiting"], i["ack_floor"]["stream_seq"],
                              dead.get(c["durable"], 0)), c)
            self.assertIsNone(c["acked_per_sec"])
        wn = next(c for c in st["consumers"] if c["durable"] == "work-normal")
        self.assertEqual((wn["pending"], wn["in_flight"], wn["redelivered"]), (6, 4, 2))
        self.assertEqual(st["stream"]["messages"], 13)
        self.assertEqual(st["dlq"]["messages"], 3)
        self.assertIsNone(st["ledger"])

        table = self.pub(cfg, "status", "--interval", "0", check=0).stdout.decode()
        self.assertIn("JOBS: 13 messages, last seq 13", table)
        rows = {tuple(l.split()[:2]): l.split()[2:] for l in table.splitlines()
                if l.split()[:1] in (["work"], ["bad"])}
        self.assertEqual(rows[("work", "normal")], ["6", "4", "2", "0", "0", "-"])
        self.assertEqual(rows[("work", "high")], ["2", "0", "0", "0", "2", "-"])
        self.assertEqual(rows[("bad", "low")], ["0", "0", "0", "0", "1", "-"])
        self.assertNotIn("LEDGER", table)

    def test_rates_while_jobs_run(self):
        cfg = self.config(services={"work": noop(delay="20ms", fleet_in_flight=4)},
                          consumer={"max_in_flight": 16})
        self.publish_ok(cfg, [envelope("rate-%d" % i) for i in range(600)])
        proc = self.progs.start_consumer(cfg)
        wait_for(lambda: self.nc.consumer_info("JOBS", "work-normal")["ack_floor"]
                 ["consumer_seq"] > 10, 30, "the first acks", procs=[proc])
        cp = self.pub(cfg, "status", "--json", "--interval", "1s", check=0)
        st = publisher_json(cp)
        wn = next(c for c in st["consumers"] if c["durable"] == "work-normal")
        # 4 at a time, 20 ms each: at most ~200/s; well above zero.
        self.assertGreater(wn["acked_per_sec"], 20, wn)
        self.assertLess(wn["acked_per_sec"], 400, wn)
        self.assertGreaterEqual(st["interval"], 1.0)
        self.assertEqual(next(c for c in st["consumers"]
                              if c["durable"] == "work-low")["acked_per_sec"], 0)

    def test_status_with_ledger_and_status_job_id(self):
        self.start_pg()
        cfg = self.write_cfg({"work": noop(), "bad": noop(fail_attempts=5, max_deliver=1)},
                             ledger=True)
        proc = self.progs.start_consumer(cfg)
        ok = ["ok-%d" % i for i in range(5)]
        bad = ["dead-%d" % i for i in range(2)]
        self.publish_ok(cfg, [envelope(i, tenant="acme") for i in ok] +
                        [envelope(i, service="bad", priority="low") for i in bad])
        self.wait_ledger(ok + bad, lambda r: r["status"] in ("succeeded", "dead"), 60,
                         "all jobs", procs=[proc])
        self.wait_drained(durables_of("work") + durables_of("bad"), 30, procs=[proc])

        st = publisher_json(self.pub(cfg, "status", "--json", "--interval", "0", check=0))
        self.assertEqual(st["ledger"], {
            "work": {"running": 0, "succeeded": 5, "dead": 0, "replayed": 0},
            "bad": {"running": 0, "succeeded": 0, "dead": 2, "replayed": 0}})
        table = self.pub(cfg, "status", "--interval", "0", check=0).stdout.decode()
        ledger_rows = table.split("LEDGER", 1)[1].splitlines()
        self.assertIn("work", ledger_rows[1])
        self.assertEqual(ledger_rows[1].split(), ["work", "0", "5", "0", "0"])
        self.assertEqual(ledger_rows[2].split(), ["bad", "0", "0", "2", "0"])

        row = json.loads(self.pub(cfg, "status", "ok-3", check=0).stdout)
        db = self.ledger(["ok-3"])["ok-3"]
        self.assertEqual((row["job_id"], row["service"], row["priority"], row["tenant"],
                          row["status"], row["attempts"], row["replays"], row["stream_seq"]),
                         ("ok-3", "work", "normal", "acme", "succeeded", 1, 0,
                          db["stream_seq"]))
        self.assertIsNotNone(row["finished_at"])
        row = json.loads(self.pub(cfg, "status", "dead-1", check=0).stdout)
        self.assertEqual((row["status"], row["service"], row["priority"]),
                         ("dead", "bad", "low"))
        self.assertIn("simulated failure", row["error"])

        cp = self.pub(cfg, "status", "no-such-job")
        self.assertEqual(cp.returncode, 1)
        self.assertIn('no job "no-such-job" in the ledger', cp.stderr.decode())
        self.assertEqual(cp.stdout, b"")

    def test_status_job_id_without_ledger(self):
        cfg = self.config(services={"work": noop()})
        cp = self.pub(cfg, "status", "job-1")
        self.assertEqual(cp.returncode, 1)
        self.assertIn("no ledger configured", cp.stderr.decode())


# ---------------------------------------------------------------------------

class TestBatchWait(OpsTestCase):

    def jobs(self):
        return ([envelope("w-%d" % i, priority=PRIORITIES[i % 3]) for i in range(30)] +
                [envelope("wd-%d" % i, service="bad") for i in range(3)])

    def services(self):
        return {"work": noop(delay="10ms"), "bad": noop(fail_attempts=5, max_deliver=1)}

    def test_wait_with_ledger(self):
        self.start_pg()
        cfg = self.write_cfg(self.services(), ledger=True)
        proc = self.progs.start_consumer(cfg)
        jobs = self.jobs()
        path = os.path.join(self.tmp, "wait.ndjson")
        with open(path, "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in jobs))
        cp = self.pub(cfg, "batch", "--wait", "--timeout", "60s", path, check=0)
        lines = json_lines(cp)
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual((lines[0]["published"], lines[0]["failed"]), (33, 0))
        done = lines[1]
        self.assertEqual((done["succeeded"], done["dead"], done["unfinished"]), (30, 3, 0), done)
        self.assertGreater(done["seconds"], 0)
        self.assertAlmostEqual(done["rate"], 33 / done["seconds"], delta=0.2 + 33 / done["seconds"] * 0.05)
        # What it reported is what the ledger holds right after.
        rows = self.ledger([e["id"] for e in jobs])
        self.assertEqual(sorted(r["status"] for r in rows.values()),
                         ["dead"] * 3 + ["succeeded"] * 30)
        self.assertTrue(proc.poll() is None)

    def test_wait_without_ledger(self):
        cfg = self.config(services=self.services(), consumer={"max_in_flight": 64})
        proc = self.progs.start_consumer(cfg)
        cp, summary = self.publish_batch(cfg, self.jobs())  # earlier jobs, already done
        self.wait_drained(durables_of("work") + durables_of("bad"), 30, procs=[proc])
        dlq_before = self.msg_count("JOBS_DLQ")
        jobs = [envelope("v-%d" % i, priority=PRIORITIES[i % 3]) for i in range(40)] + \
               [envelope("vd-%d" % i, service="bad", priority="high") for i in range(2)]
        path = os.path.join(self.tmp, "wait.ndjson")
        with open(path, "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in jobs))
        cp = self.pub(cfg, "batch", "--wait", path, check=0)
        lines = json_lines(cp)
        self.assertEqual((lines[1]["succeeded"], lines[1]["dead"], lines[1]["unfinished"]),
                         (40, 2, 0), lines)
        # Finished means acknowledged: nothing of the batch is left.
        for d in durables_of("work") + durables_of("bad"):
            i = self.nc.consumer_info("JOBS", d)
            self.assertEqual((i["num_pending"], i["num_ack_pending"]), (0, 0), d)
        self.assertEqual(self.msg_count("JOBS_DLQ"), dlq_before + 2)

    def test_wait_timeout_without_consumers(self):
        cfg = self.config(services=self.services())
        path = os.path.join(self.tmp, "wait.ndjson")
        with open(path, "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in self.jobs()[:5]))
        t0 = time.monotonic()
        cp = self.pub(cfg, "batch", "--wait", "--timeout", "1500ms", path)
        elapsed = time.monotonic() - t0
        self.assertEqual(cp.returncode, 1)
        lines = json_lines(cp)
        self.assertEqual(lines[0]["published"], 5)
        self.assertEqual((lines[1]["succeeded"], lines[1]["dead"], lines[1]["unfinished"]),
                         (0, 0, 5))
        self.assertIn("timed out waiting for the batch", cp.stderr.decode())
        self.assertGreaterEqual(elapsed, 1.5)
        self.assertLess(elapsed, 20)


if __name__ == "__main__":
    unittest.main()
