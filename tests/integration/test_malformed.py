"""Malformed input against a real nats-server -js: a corpus of bad job
messages published raw (malformed_corpus.py) must each be dead-lettered
exactly once, with the right reason and an error naming the problem, while
good jobs around them are processed, the consumer keeps running and its
memory stays flat; bad config files and bad command lines must be refused
with exit code 2 and one clear line on stderr, before anything is published.

Run from this directory:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_malformed
JETFLEET_MALFORMED_ROUNDS (default 20) sets how often the corpus is sent.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import time
import unittest

import jfharness
import malformed_corpus as corpus
import pgharness
from jfharness import (CONSUMER, PUBLISHER, JetfleetTestCase, NatsClient, NatsServer, hval,
                       log_msgs, make_config, wait_for, write_config)
from test_fleet import FleetTestCase

ROUNDS = int(os.environ.get("JETFLEET_MALFORMED_ROUNDS", "20"))
WARMUP_ROUNDS = 1  # not measured: the consumer's first allocations
WINDOW = 3  # rounds whose median VmRSS is compared
RSS_GROWTH_MAX_KIB = 1024  # observed: +24..+112 KiB
GOOD_EVERY = 6  # one good job after every this many bad ones
DURABLES = ("work-high", "work-normal", "work-low")
OMITTED_RE = re.compile(r"\[body of (\d+) bytes left out: with the dead-letter headers it "
                        r"exceeds max_payload; the original is JOBS seq (\d+)\]$")


def instrumented(path):
    """Why the program's memory cannot be judged by its RSS (ASan's
    quarantine, valgrind's wrapper scripts), or None for a plain build."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x7fELF"):
        return "a wrapper script (valgrind?)"
    if b"__asan_init" in data:
        return "an AddressSanitizer build"
    return None


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


class CorpusMixin:
    """Publishes the corpus raw and checks what became of every message."""

    def corpus_config(self, extra=""):
        return write_config(self.tmp, make_config(
            self.nats.url,
            consumer={"max_in_flight": 64, "pull_expires": "1s", "shutdown_grace": "10s"},
            services={"work": {"kind": "noop", "max_deliver": 3, "backoff": "100ms"}},
            extra=extra))

    def publish_raw(self, subject, body, fresh_id, headers=None, again=False):
        """Publishes one rendered body; with again, a second time with the
        same Nats-Msg-Id, which JOBS must drop (so it is dead-lettered once)."""
        body, msg_id = corpus.render(body, fresh_id)
        headers = dict(headers or {})
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        ack = self.nc.js_publish(subject, body, headers=headers or None)
        self.assertEqual(ack.get("stream"), "JOBS", ack)
        self.assertFalse(ack.get("duplicate"), "JOBS dropped %s as a duplicate" % fresh_id)
        if again and msg_id:
            dup = self.nc.js_publish(subject, body, headers=headers)
            self.assertEqual((dup.get("seq"), dup.get("duplicate")), (ack["seq"], True), dup)
        return ack["seq"], body

    def publish_round(self, rnd, bad_cases, good_cases, bad, good):
        """One pass over the bad corpus with good jobs in between; bad and
        good are filled {JOBS seq: record}."""
        g = 0
        for i, (kind, subject, body, reason, error) in enumerate(bad_cases):
            seq, sent = self.publish_raw(subject, body, "bad-r%d-%d" % (rnd, i),
                                         headers=corpus.HEADERS.get(kind), again=True)
            bad[seq] = {"kind": kind, "subject": subject, "body": sent, "reason": reason,
                        "error": error,
                        "id": json.loads(sent)["id"] if reason == "expired" else None}
            if i % GOOD_EVERY == GOOD_EVERY - 1:
                gkind, gsubject, gbody = good_cases[g % len(good_cases)]
                seq, sent = self.publish_raw(gsubject, gbody, "good-r%d-%d" % (rnd, g))
                good[seq] = {"kind": gkind, "subject": gsubject, "id": json.loads(sent)["id"]}
                g += 1

    def wait_settled(self, proc, n_bad, timeout=90):
        wait_for(lambda: self.dlq_count() >= n_bad, timeout, "%d dead letters" % n_bad,
                 interval=0.1, procs=[proc])
        return self.wait_drained(DURABLES, timeout, procs=[proc])

    def check_dead_letters(self, bad, good):
        """Exactly one dead letter per bad message, none for a good one;
        returns the problems found (empty when all is well)."""
        problems = []
        by_seq = self.dlq_by_seq()
        for seq in sorted(set(by_seq) - set(bad)):
            what = good[seq]["kind"] if seq in good else "unknown"
            problems.append("seq %s (%s, a good job) was dead-lettered: %s" % (
                seq, what, hval(by_seq[seq][0]["headers"], "Jetfleet-Error")))
        for seq, rec in sorted(bad.items()):
            dls = by_seq.get(seq, [])
            if len(dls) != 1:
                problems.append("%s (seq %d): %d dead letters" % (rec["kind"], seq, len(dls)))
                continue
            m = dls[0]
            err = hval(m["headers"], "Jetfleet-Error") or ""
            body = rec["body"]
            omitted = OMITTED_RE.search(err)
            if omitted:
                # Too big to carry along: the dead letter points at the
                # original, which must still be in JOBS, unchanged.
                self.assertEqual((int(omitted.group(1)), int(omitted.group(2))), (len(body), seq))
                self.assertEqual(hval(m["headers"], "Jetfleet-Body-Omitted"), str(len(body)))
                self.assertGreater(len(body) + 4096, self.nc.server_info["max_payload"],
                                   "%s: a body that fits was left out" % rec["kind"])
                self.assertEqual(self.nc.stream_msg_get("JOBS", seq)["data"], body,
                                 "%s: the original is gone from JOBS" % rec["kind"])
                body = b""
            try:
                self.assert_dead_letter(m, rec["reason"], seq, rec["subject"], body)
            except AssertionError as e:
                problems.append("%s (seq %d): %s" % (rec["kind"], seq, str(e)[:300]))
                continue
            if not re.search(rec["error"], err):
                problems.append("%s (seq %d): Jetfleet-Error %r does not match %r" % (
                    rec["kind"], seq, err[:200], rec["error"]))
        return problems


class TestMalformedMessages(CorpusMixin, FleetTestCase):

    def test_corpus_dead_lettered_once_good_jobs_done_memory_flat(self):
        cfg = self.corpus_config()
        # glibc would keep freed 1 MiB message buffers around (its mmap
        # threshold rises to the largest block freed), so RSS would step by
        # a MiB now and then: fixed thresholds make it follow live memory.
        proc = self.progs.start_consumer(cfg, env={
            "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:"
                              "glibc.malloc.trim_threshold=131072"})
        max_payload = self.nc.server_info["max_payload"]
        bad_cases, good_cases = corpus.bad_cases(max_payload), corpus.good_cases()
        self.assertGreaterEqual(len(bad_cases), 30)
        bad, good = {}, {}
        t0 = time.monotonic()

        # VmRSS once each round is settled; the medians of the first and of
        # the last rounds are compared, so that a buffer still held at the
        # moment of one reading does not count, and a leak, which grows with
        # the rounds, does.
        rss = []
        for rnd in range(ROUNDS):
            self.publish_round(rnd, bad_cases, good_cases, bad, good)
            infos = self.wait_settled(proc, len(bad))
            rss.append(vm_rss_kib(proc.pid))
        elapsed = time.monotonic() - t0
        rss_warm = statistics.median(rss[WARMUP_ROUNDS:WARMUP_ROUNDS + WINDOW])
        rss_end = statistics.median(rss[-WINDOW:])

        self.assertIsNone(proc.poll(), "the consumer must survive the corpus")
        problems = self.check_dead_letters(bad, good)
        self.assertEqual(problems, [], "%d problems, first ones:\n%s" % (
            len(problems), "\n".join(problems[:25])))
        self.assertEqual(self.dlq_count(), len(bad), "dead letters in JOBS_DLQ")

        # Every durable acknowledged everything: nothing pending, nothing
        # awaiting an ack, the ack floor at its last message.
        for durable, info in infos.items():
            prio = durable.split("-")[1]
            seqs = [s for s, r in list(bad.items()) + list(good.items())
                    if r["subject"].startswith("jobs.work.%s." % prio)]
            self.assertEqual((info["num_pending"], info["num_ack_pending"]), (0, 0), durable)
            if seqs:
                self.assertGreaterEqual(info["ack_floor"]["stream_seq"], max(seqs), durable)

        logged = log_msgs(proc, "dead-lettered")
        self.assertEqual(sorted(int(l["seq"]) for l in logged), sorted(bad),
                         "one \"dead-lettered\" line per bad message")
        for line in logged:
            self.assertEqual(line.get("reason"), bad[int(line["seq"])]["reason"], line)

        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("dead"), stopped.get("acked"), stopped.get("retried")),
                         (len(bad), len(good), 0), stopped)

        growth = rss_end - rss_warm
        print("\n[malformed] %d kinds x %d rounds: %d bad messages dead-lettered once each "
              "(%d expired), %d good jobs acked, %.1fs; consumer VmRSS (median of %d rounds) %d "
              "KiB after a warm-up round, %d KiB at the end (%+d KiB, bound +%d KiB; per round "
              "%d..%d KiB)" % (
                  len(bad_cases), ROUNDS, len(bad),
                  sum(1 for r in bad.values() if r["reason"] == "expired"), len(good), elapsed,
                  WINDOW, rss_warm, rss_end, growth, RSS_GROWTH_MAX_KIB, min(rss),
                  max(rss)))
        print("[malformed] VmRSS per round (KiB): %s" % " ".join(map(str, rss)))
        why = instrumented(CONSUMER)
        if why:
            print("[malformed] memory bound not checked: %s is %s" % (CONSUMER, why))
            return
        self.assertLessEqual(growth, RSS_GROWTH_MAX_KIB,
                             "consumer memory grew by %d KiB over %d rounds" % (
                                 growth, ROUNDS - WARMUP_ROUNDS - WINDOW))

    def test_corpus_through_batch(self):
        """The same bodies as NDJSON lines for `jetfleet-publisher batch`:
        each bad line reported with the consumer's own words and skipped,
        every other line stored byte for byte."""
        cfg = self.corpus_config()
        max_payload = self.nc.server_info["max_payload"]
        lines, expect_bad, expect_good = [], {}, []
        good_cases = corpus.good_cases()
        for i, (kind, subject, body, reason, error) in enumerate(corpus.bad_cases(max_payload)):
            # batch takes the subject from the envelope, skips blank lines and
            # strips a line's "\r": those cases say nothing here.
            if (b"\n" in body or not body.strip(b" \t\r") or body.endswith(b"\r") or
                    "subject" in error or "does not match" in error):
                continue
            line, _ = corpus.render(body, "batch-bad-%d" % i)
            lines.append(line)
            if reason == "expired":
                expect_good.append(line)
            else:
                expect_bad[len(lines)] = (kind, error.replace(corpus.BODY_LEFT_OUT, ""))
            gkind, _, gbody = good_cases[i % len(good_cases)]
            if b"\n" not in gbody:
                lines.append(corpus.render(gbody, "batch-good-%d" % i)[0])
                expect_good.append(lines[-1])
        self.assertGreaterEqual(len(expect_bad), 30)
        lines.append(b"x" * (max_payload + 1))
        expect_bad[len(lines)] = ("line over max_payload", r"^longer than max_payload")
        crlf = corpus.render(corpus.OK_ENV, "batch-crlf")[0]
        lines.append(crlf + b"\r")
        expect_good.append(crlf)

        cp, summary = self.publish_batch(cfg, lines)
        self.assertEqual(cp.returncode, 1, cp.stderr[-2000:])
        self.assertEqual((summary["published"], summary["invalid"], summary["failed"],
                          summary["duplicates"]), (len(expect_good), len(expect_bad), 0, 0),
                         summary)
        reported = {}
        for raw in cp.stderr.decode("utf-8").splitlines():
            m = re.match(r"^line (\d+): (?:invalid envelope: )?(.*)$", raw)
            if m:
                reported[int(m.group(1))] = m.group(2)
        self.assertEqual(sorted(reported), sorted(expect_bad))
        for n, (kind, error) in expect_bad.items():
            with self.subTest(kind=kind, line=n):
                self.assertRegex(reported[n], error)
        stored = sorted(m["data"] for m in self.nc.stream_messages("JOBS"))
        self.assertEqual(stored, sorted(expect_good), "JOBS must hold the valid lines verbatim")

    def test_message_over_max_payload_after_server_restart(self):
        """A job stored while the server allowed 1 MiB, delivered after it
        was restarted with max_payload 256 KiB: over the consumer's limit, so
        invalid; and its dead letter cannot carry the body."""
        cfg = self.corpus_config()
        self.progs.run_publisher(["--config", cfg, "publish", "--service", "work", "--type",
                                  "t", "--id", "small"], check=0)
        big = json.dumps({"id": "big", "service": "work", "type": "t",
                          "payload": "p" * (300 * 1024)}).encode()
        big_seq = self.nc.js_publish("jobs.work.normal.t", big,
                                     headers={"Nats-Msg-Id": "big"})["seq"]
        after_seq = self.nc.js_publish("jobs.work.normal.t", corpus.render(corpus.OK_ENV,
                                                                           "after")[0],
                                       headers={"Nats-Msg-Id": "after"})["seq"]

        self.nc.close()
        self.nats = LimitedNatsServer.replacing(self.nats, max_payload=256 * 1024)
        self.nc = NatsClient(self.nats.url)
        self.assertEqual(self.nc.server_info["max_payload"], 256 * 1024)

        proc = self.progs.start_consumer(cfg)
        infos = self.wait_settled(proc, 1)
        self.assertGreaterEqual(infos["work-normal"]["ack_floor"]["stream_seq"], after_seq)
        by_seq = self.dlq_by_seq()
        self.assertEqual(sorted(by_seq), [big_seq])
        m = by_seq[big_seq][0]
        self.assert_dead_letter(m, "invalid", big_seq, "jobs.work.normal.t", b"")
        err = hval(m["headers"], "Jetfleet-Error")
        self.assertRegex(err, r"^message of %d bytes exceeds max_payload of 262144 bytes " %
                         len(big))
        self.assertRegex(err, OMITTED_RE)
        self.assertEqual(hval(m["headers"], "Jetfleet-Body-Omitted"), str(len(big)))
        self.assertEqual(self.nc.stream_msg_get("JOBS", big_seq)["data"], big)
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("dead"), stopped.get("acked")), (1, 2), stopped)

        # Re-driving it would publish an empty job and delete the pointer to
        # the real one: redrive leaves it (replay is the way).
        jobs_before = self.nc.stream_info("JOBS")["state"]["messages"]
        cp = self.progs.run_publisher(["--config", self.corpus_config(), "dlq", "redrive"])
        self.assertEqual(cp.returncode, 0, cp.stderr)
        self.assertEqual(json.loads(cp.stdout.decode().splitlines()[-1])["skipped"], 1)
        self.assertIn(b"does not hold the job", cp.stderr)
        self.assertEqual(self.nc.stream_info("JOBS")["state"]["messages"], jobs_before)
        self.assertEqual(sorted(self.dlq_by_seq()), [big_seq])


class LimitedNatsServer(NatsServer):
    """The harness's nats-server with a config file on top (max_payload),
    taking over the ports and store of a running one."""

    def __init__(self, tmpdir, max_payload):
        super().__init__(tmpdir)
        self.max_payload = max_payload

    @classmethod
    def replacing(cls, server, max_payload):
        srv = cls(server.tmpdir, max_payload)
        srv.own_tmp = server.own_tmp
        srv.port, srv.mon_port = server.port, server.mon_port
        server.stop()
        srv.restart()
        return srv

    def _spawn_and_wait(self, timeout):
        conf = os.path.join(self.tmpdir, "limits.conf")
        with open(conf, "w") as f:
            f.write("max_payload: %d\n" % self.max_payload)
        wrapper = os.path.join(self.tmpdir, "nats-server-limited")
        with open(wrapper, "w") as f:
            f.write('#!/bin/sh\nexec %s -c %s "$@"\n' % (jfharness.NATS_SERVER, conf))
        os.chmod(wrapper, 0o755)
        # NatsServer runs the module's NATS_SERVER with its own flags; the
        # wrapper adds the config file (command-line flags win over it).
        saved, jfharness.NATS_SERVER = jfharness.NATS_SERVER, wrapper
        try:
            return super()._spawn_and_wait(timeout)
        finally:
            jfharness.NATS_SERVER = saved


class TestMalformedLedger(CorpusMixin, pgharness.PostgresMixin, FleetTestCase):

    def test_bad_messages_make_no_succeeded_row(self):
        cfg = self.corpus_config(extra="[postgres]\ndsn = %s\n" % self.pg.dsn())
        proc = self.progs.start_consumer(cfg)
        bad_cases = corpus.bad_cases(self.nc.server_info["max_payload"])
        bad, good = {}, {}
        self.publish_round(0, bad_cases, corpus.good_cases(), bad, good)
        self.wait_settled(proc, len(bad))
        problems = self.check_dead_letters(bad, good)
        self.assertEqual(problems, [], "\n".join(problems[:25]))

        rows = {r[0]: r[1] for r in self.pg.query("SELECT job_id, status FROM jetfleet_jobs")}
        good_ids = {r["id"] for r in good.values()}
        expired_ids = {r["id"] for r in bad.values() if r["reason"] == "expired"}
        self.assertEqual({i for i, st in rows.items() if st == "succeeded"}, good_ids)
        self.assertEqual({i: rows.get(i) for i in expired_ids}, {i: "dead" for i in expired_ids})
        # An invalid message has no trustworthy id: it makes no row at all.
        self.assertEqual(set(rows) - good_ids - expired_ids, set())
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("dead"), stopped.get("acked")), (len(bad), len(good)),
                         stopped)


# ---------------------------------------------------------------------------
# Bad config files and command lines

H = "[nats]\nurl = {url}\n"
W = "[service.work]\nkind = noop\n"

# (name, ini text, line the error must name, words the message must hold)
BAD_CONFIGS = [
    ("unknown key in a service", H + W + "retries = 3\n", 5,
     ["[service.work] retries: unknown key"]),
    ("unknown section", H + "[consumers]\nmax_in_flight = 5\n" + W, 3,
     ["unknown section [consumers]"]),
    ("bad duration", H + W + "timeout = 10 parsecs\n", 5,
     ["[service.work] timeout", "10 parsecs"]),
    ("negative number", H + "[consumer]\nmax_in_flight = -5\n" + W, 4,
     ["[consumer] max_in_flight", "-5"]),
    ("integer beyond int64", H + "[consumer]\npulls = 99999999999999999999999\n" + W, 4,
     ["[consumer] pulls", "99999999999999999999999"]),
    ("missing kind", H + "[service.work]\ntimeout = 5s\n", 3, ["[service.work] kind: missing"]),
    ("unknown kind", H + "[service.work]\nkind = grpc\n", 4, ["[service.work] kind", "grpc"]),
    ("line too long", H + W + "; " + "x" * 5000 + "\n", 5, ["line longer than"]),
    ("key given twice", H + W + "kind = noop\n", 5, ["[service.work] kind: given twice"]),
    ("section given twice", H + W + W, 5, ["[service.work] appears twice"]),
    ("key before any section", "max_in_flight = 5\n" + H + W, 1,
     ["max_in_flight", "before any [section]"]),
    ("section header without ]", H + "[service.work\nkind = noop\n", 3, ["closing ']'"]),
    ("line that is no key = value", H + W + "just some words\n", 5, ["key = value"]),
    ("NUL byte in a line", H + W + "delay = 1s\x00\n", 5, ["NUL byte"]),
    ("service name not a token", H + "[service.a.b]\nkind = noop\n", 3, ["[service.a.b]"]),
    ("empty backoff item", H + W + "backoff = 1s,,5s\n", 5, ["[service.work] backoff", "1s,,5s"]),
    ("bad rate unit", H + W + "rate = 30/fortnight\n", 5, ["[service.work] rate", "30/fortnight"]),
    ("http without url", H + "[service.work]\nkind = http\n", 4, ["kind = http needs url"]),
    ("bad boolean", H + W + "tls_verify = maybe\n", 5, ["[service.work] tls_verify", "maybe"]),
    ("max_in_flight below 3 per service", H + "[consumer]\nmax_in_flight = 4\n[service.a]\n"
     "kind = noop\n[service.b]\nkind = noop\n", 4, ["[consumer] max_in_flight = 4"]),
    ("indented continuation line", H + W + "  timeout = 5s\n", 5, ["indented line"]),
    ("log level unknown", H + "[log]\nlevel = loud\n" + W, 4, ["[log] level", "loud"]),
    ("two priority weights", H + "[consumer]\npriority_weights = 6,3\n" + W, 4,
     ["[consumer] priority_weights", "6,3"]),
    ("dlq stream named like the job stream", H + "[stream]\ndlq = JOBS\n" + W, 4,
     ["[stream] dlq must differ"]),
    ("empty nats url", "[nats]\nurl =\n" + W, 2, ["[nats] url: must not be empty"]),
    # Regressions: bytes that are not UTF-8 were copied into the message (and
    # so into the publisher's JSON log line) as they were.
    ("value that is not UTF-8", H + "[service.work]\nkind = n\xffop\n", 4,
     ["[service.work] kind", '"n\\xffop"']),
    ("key that is not UTF-8", H + W + "k\u00e9y\xff = 1\n", 5, ["k\u00e9y\\xff: unknown key"]),
]

# (name, program, args, stdin, env, words the message must hold). {cfg} is
# a valid config file, {tmp} the test's directory.
BAD_COMMANDS = [
    ("env override with a bad duration", "both", [], None,
     {"JETFLEET_SERVICE_WORK_TIMEOUT": "soon"}, ["JETFLEET_SERVICE_WORK_TIMEOUT", "soon"]),
    ("env override with a newline", "both", [], None, {"JETFLEET_CONSUMER_PULLS": "4\n5"},
     ["JETFLEET_CONSUMER_PULLS", "4\\x0a5"]),
    ("env override of a stream name", "both", [], None, {"JETFLEET_STREAM_NAME": "JOBS.X"},
     ["JETFLEET_STREAM_NAME", "JOBS.X"]),
    ("config is a directory", "both", ["--config", "{tmp}"], None, None,
     ["{tmp}", "Is a directory"]),
    ("config missing", "publisher", ["--config", "{tmp}/absent.ini"], None, None,
     ["{tmp}/absent.ini", "No such file"]),
    ("consumer: --config without a value", "consumer", ["--config"], None, None, ["--config"]),
    ("consumer: --service without a value", "consumer", ["--service"], None, None,
     ["--service"]),
    ("consumer: unknown option", "consumer", ["--frobnicate"], None, None, ["--frobnicate"]),
    ("consumer: bad --log-level", "consumer", ["--log-level", "loud"], None, None,
     ["--log-level loud"]),
    ("consumer: unexpected argument", "consumer", ["extra"], None, None, ["'extra'"]),
    ("publisher: bad --log-level", "publisher", ["--log-level", "loud"], None, None,
     ["--log-level", "loud"]),
    ("publisher: --config without a value", "raw-publisher", ["--config"], None, None,
     ["--config needs a value"]),
    # Regression: a letter inside a cluster was reported as argv[0] or as the
    # command's name ("unknown option publish").
    ("publisher: unknown letter in a cluster", "raw-publisher", ["-zV"], None, None,
     ["unknown option -z"]),
    ("publish: unknown letter in a cluster", "publish", ["-xh"], None, None,
     ["publish: unknown option -x"]),
    ("batch: unknown letter in a cluster", "publisher-cmd", ["batch", "-qh", "f"], None, None,
     ["batch: unknown option -q"]),
    ("publish: --priority without a value", "publish", ["--priority"], None, None,
     ["--priority needs a value"]),
    ("publish: negative --deadline", "publish", ["--deadline", "-5m"], None, None,
     ["--deadline", "-5m"]),
    ("publish: --deadline on Feb 30", "publish", ["--deadline", "2026-02-30T00:00:00Z"], None,
     None, ["--deadline", "2026-02-30T00:00:00Z"]),
    ("publish: two payloads", "publish", ["{}", "{}"], None, None, ["one payload at most"]),
    ("publish: truncated payload on stdin", "publish", ["-"], b'{"a":"x', None,
     ["payload: not valid JSON"]),
    # Regressions: jansson's own words were "end of file expected near end of
    # file" for a NUL and an invisible quoted character for a BOM.
    ("publish: NUL in the payload", "publish", ["-"], b'{"a":1}\x00', None,
     ["payload: not valid JSON: NUL byte at byte 7"]),
    ("publish: BOM before the payload", "publish", ["-"], b'\xef\xbb\xbf{"a":1}', None,
     ["payload: not valid JSON: starts with a UTF-8 byte order mark"]),
    ("publish: payload with 1e400", "publish", ["[1e400]"], None, None,
     ["payload: not valid JSON: real number overflow"]),
    ("publish: duplicate key in the payload", "publish", ['{"a":1,"a":2}'], None, None,
     ["payload: not valid JSON: duplicate object key"]),
    ("publish: control character in --id", "publish", ["--id", "a\x01b"], None, None,
     ["invalid envelope: id: control character U+0001"]),
    ("publish: empty --tenant", "publish", ["--tenant", ""], None, None,
     ["invalid envelope: tenant: empty"]),
    # Regression: a directory was opened, then failed to read after connecting (exit 1).
    ("batch: FILE is a directory", "publisher-cmd", ["batch", "{tmp}"], None, None,
     ["batch: cannot read {tmp}: Is a directory"]),
    ("batch: FILE missing", "publisher-cmd", ["batch", "{tmp}/absent.ndjson"], None, None,
     ["cannot open {tmp}/absent.ndjson"]),
    ("batch: two FILEs", "publisher-cmd", ["batch", "a", "b"], None, None, ["one FILE at most"]),
    ("batch: --timeout without --wait", "publisher-cmd", ["batch", "--timeout", "5s", "-"], None,
     None, ["--timeout applies to --wait only"]),
    ("replay: no window", "publisher-cmd", ["replay"], None, None, ["--from-seq", "--since"]),
    ("replay: --from-seq 0", "publisher-cmd", ["replay", "--from-seq", "0"], None, None,
     ["--from-seq: '0'"]),
    ("replay: --until before --from-seq", "publisher-cmd",
     ["replay", "--from-seq", "5", "--until", "2"], None, None, ["--until 2 is before"]),
    ("replay: --since garbage", "publisher-cmd", ["replay", "--since", "yesterday"], None, None,
     ["--since: 'yesterday'"]),
    ("replay: --subject outside jobs.>", "publisher-cmd",
     ["replay", "--from-seq", "1", "--subject", "dlq.>"], None, None, ["--subject: 'dlq.>'"]),
    ("replay: bad --rate", "publisher-cmd", ["replay", "--from-seq", "1", "--rate", "fast"], None,
     None, ["--rate: 'fast'"]),
    ("dlq: no subcommand", "publisher-cmd", ["dlq"], None, None, ["dlq: missing command"]),
    ("dlq: unknown subcommand", "publisher-cmd", ["dlq", "frob"], None, None,
     ["unknown command 'frob'"]),
    ("dlq show: not a sequence", "publisher-cmd", ["dlq", "show", "abc"], None, None,
     ["'abc' is not a sequence"]),
    ("dlq list: unknown --reason", "publisher-cmd", ["dlq", "list", "--reason", "bored"], None,
     None, ["--reason: 'bored'"]),
    ("dlq purge: everything without --yes", "publisher-cmd", ["dlq", "purge"], None, None,
     ["add --yes"]),
    ("serve: bad --listen", "publisher-cmd", ["serve", "--listen", "nowhere"], None, None,
     ["--listen: 'nowhere'"]),
    ("serve: unexpected argument", "publisher-cmd", ["serve", "extra"], None, None,
     ["unexpected argument 'extra'"]),
    ("status: unknown option", "publisher-cmd", ["status", "--frob"], None, None,
     ["status: unknown option --frob"]),
]

HINT_RE = re.compile(r"^Try '.*--help'\.$")


class TestBadConfigAndCommandLine(JetfleetTestCase):

    def run_prog(self, prog, args, stdin=None, env=None, as_user=None):
        """Runs a program to completion with the harness's environment;
        CompletedProcess (bytes), logged for the failure dump."""
        e = dict(self.progs.env)
        e.update(env or {})
        cmd = [prog] + list(args)
        if as_user is not None:
            cmd = ["setpriv", "--reuid=%d" % as_user, "--regid=%d" % as_user,
                   "--clear-groups", "--"] + cmd
        cp = subprocess.run(cmd, input=stdin if stdin is not None else b"",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.tmp, env=e,
                            timeout=30)
        path = os.path.join(self.tmp, "cli-%d.log" % len(self.progs.logs))
        with open(path, "wb") as f:
            f.write(b"$ %r\n--- exit %d\n--- stdout\n%s\n--- stderr\n%s" % (
                cmd, cp.returncode, cp.stdout, cp.stderr))
        self.progs.logs.append((os.path.basename(path), path))
        return cp

    def assert_refused(self, cp, words):
        """Exit 2, nothing on stdout, and on stderr one line (a JSON log line
        or plain text; a "Try '… --help'." hint may follow) holding words."""
        err = cp.stderr.decode("utf-8")  # strict: the message must be UTF-8
        self.assertEqual(cp.returncode, 2, err)
        self.assertEqual(cp.stdout, b"")
        lines = [l for l in err.splitlines() if l.strip() and not HINT_RE.match(l)]
        self.assertEqual(len(lines), 1, "expected one line on stderr: %r" % err)
        line = lines[0]
        if line.startswith("{"):
            obj = json.loads(line)
            self.assertEqual(obj.get("level"), "error", line)
            line = obj.get("error") or obj.get("msg")
        for w in words:
            self.assertIn(w, line)
        return line

    def runs_for(self, program, cfg, args):
        pub = ["publish", "--service", "work", "--type", "t"]
        return {
            "both": [(CONSUMER, ["--config", cfg] + args),
                     (PUBLISHER, ["--config", cfg] + args + pub)],
            "consumer": [(CONSUMER, ["--config", cfg] + args)],
            "publisher": [(PUBLISHER, ["--config", cfg] + args + pub)],
            "raw-publisher": [(PUBLISHER, args)],
            "publish": [(PUBLISHER, ["--config", cfg] + pub + args)],
            "publisher-cmd": [(PUBLISHER, ["--config", cfg] + args)],
        }[program]

    def test_bad_config_files(self):
        for name, text, line, words in BAD_CONFIGS:
            path = os.path.join(self.tmp, "bad-%s.ini" % corpus.slug(name))
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text.replace("{url}", self.nats.url).replace("\xff", "\udcff"))
            for prog, args in ((CONSUMER, ["--config", path]),
                               (PUBLISHER, ["--config", path, "publish", "--service", "work",
                                            "--type", "t"])):
                with self.subTest(config=name, program=os.path.basename(prog)):
                    msg = self.assert_refused(self.run_prog(prog, args),
                                              ["%s:%d: " % (path, line)] + words)
                    # A key list cut inside a name showed a key that does not exist.
                    known = re.search(r"\(known: ([^)]*)\)", msg)
                    if known:
                        for k in known.group(1).split(", "):
                            self.assertRegex(k, r"^([a-z_]*[a-z]|service\.NAME|\.\.\.)$", msg)
        self.assert_nothing_published()

    def test_unreadable_config_file(self):
        path = os.path.join(self.tmp, "unreadable.ini")
        write_config(self.tmp, make_config(self.nats.url, services={"work": {"kind": "noop"}}),
                     name="unreadable.ini")
        os.chmod(path, 0)
        as_user = None
        if os.geteuid() == 0:
            # root reads any file: run the programs as nobody instead.
            if shutil.which("setpriv") is None:
                self.skipTest("running as root without setpriv")
            with open(CONSUMER, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    # valgrind's wrappers write logs where nobody may not.
                    self.skipTest("running as root, and %s is a wrapper script" % CONSUMER)
            as_user = 65534
            os.chmod(self.tmp, 0o711)
        for prog, args in ((CONSUMER, ["--config", path]),
                           (PUBLISHER, ["--config", path, "status"])):
            with self.subTest(program=os.path.basename(prog)):
                self.assert_refused(self.run_prog(prog, args, as_user=as_user),
                                    ["cannot open %s: Permission denied" % path])
        self.assert_nothing_published()

    def test_bad_command_lines(self):
        cfg = self.config(services={"work": {"kind": "noop"}})
        for name, program, args, stdin, env, words in BAD_COMMANDS:
            args = [a.replace("{tmp}", self.tmp) for a in args]
            words = [w.replace("{tmp}", self.tmp) for w in words]
            for prog, full in self.runs_for(program, cfg, args):
                with self.subTest(case=name, program=os.path.basename(prog)):
                    self.assert_refused(self.run_prog(prog, full, stdin=stdin, env=env), words)
        self.assert_nothing_published()

    def assert_nothing_published(self):
        if self.nc.stream_exists("JOBS"):
            self.assertEqual(self.nc.stream_info("JOBS")["state"]["messages"], 0)
        self.assertFalse(self.nc.stream_exists("JOBS"), "a refused start must not provision")


if __name__ == "__main__":
    unittest.main()
