"""faultlib — the shared machinery of the fault-injection suite (tests/faults/).

Every scenario runs the real programs against real servers, hurts them while
work flows, waits (with deadlines) until every job is settled, then checks the
invariants of DESIGN.md and prints ONE result line:

  RESULT <scenario> jobs=N lost=N duplicate_rows=N dead=N redelivered=N wall=S.S
         [key=value …] ok|FAIL                                  (one line, wrapped here)

Built on tests/integration/jfharness.py and pgharness.py (imported through
sys.path, never copied) and on test_downstream.Mock (jetfleet-mock).

Quick start (one scenario = one unittest test method):

    import faultlib
    from faultlib import FaultTestCase, Job, size

    class TestX(FaultTestCase):
        def test_something(self):
            run = self.fault_run("something")       # a FaultRun bound to this test
            run.start_nats()                        # or run.use_nats(url) for your own servers
            run.start_postgres()                    # the ledger (required by check())
            mock = run.start_mock("--latency", "1ms-5ms")   # optional jetfleet-mock
            run.write_config(services={"svc": run.http_service(mock, max_deliver=5)},
                             consumer={"max_in_flight": 64})
            procs = run.start_consumers(3)
            jobs = run.make_jobs(size(20000, 2000), service="svc", prefix="x")
            run.publish(jobs)                       # jetfleet-publisher batch, must be clean
            ...hurt something...
            run.wait_settled(timeout=300)           # False (not an exception) on timeout
            run.finish(extra={"kills": 12})         # checks, prints RESULT, fails the test if FAIL

Sizes: size(full, quick) is `quick` when JETFLEET_FAULTS_QUICK=1 (CI), else `full`.

FaultTestCase (unittest.TestCase): per test a temporary directory (self.tmp),
a jfharness.Programs tracker (self.progs); tearDown stops every process and
server the run started, prints the logs' tails when the test failed (or with
JETFLEET_IT_VERBOSE=1) and keeps the directory then (or with JETFLEET_IT_KEEP=1);
a sanitizer report in any program log fails the test.

FaultRun (run = self.fault_run(name)):
  servers
    start_nats()                nats-server -js (jfharness.NatsServer) -> run.nats
    use_nats(url)               servers you manage yourself (a cluster: comma-separated
                                urls); run.client() then connects to the first that answers
    start_postgres()            pgharness.PostgresServer -> run.pg (the ledger's DSN is
                                put into every config written afterwards)
    start_mock(*args)           test_downstream.Mock, its calls counted by check()
    add_call_counter(fn)        fn() -> {job id: calls} of another downstream (added up)
    client()                    a jfharness.NatsClient, reconnected when the old one died
                                (after a server restart)
  config and consumers
    http_service(mock_or_url, **keys) / noop_service(**keys)   [service.X] dicts
    write_config(services, consumer=None, nats=None, stream=None, publisher=None,
                 postgres=None, name="jetfleet.ini") -> path (also run.config_path);
                 [nats] url and [postgres] dsn are filled in
    start_consumer(name=None, wait_ready=True, env=None) -> Popen (.jf_name, .jf_log_path)
    start_consumers(n, prefix="consumer") -> [Popen], started together, all ready
    kill9(proc)                 SIGKILL and reap; marked as killed on purpose
    stop_consumer(proc, timeout) SIGTERM and wait -> exit code (None: still running)
    consumers()                 the processes still running
    durables()                  every durable of the JOBS stream (consumer names)
  jobs
    Job(id, service, priority="normal", type="t", payload=None, expect="succeeded",
        attempts=1, reason=None)
        expect: "succeeded", "dead" or None (either is fine); attempts: the real
        attempts the job makes when nothing goes wrong (counts "redelivered");
        reason: the Jetfleet-Reason its dead letter must carry (None: not checked)
    make_jobs(n, service, prefix, priorities=("high","normal","low"), type_="t",
              payload=None, start=0, **job_keys) -> [Job], ids "<prefix>-<000123>"
    publish(jobs, name=None, check=True, timeout=600) -> summary dict of the batch;
              records the jobs (every published id is checked by finish()); check:
              the batch must exit 0 with published+duplicates == len(jobs)
    publish_background(jobs, name=None) -> thread (.result = (CompletedProcess,
              summary or None) once joined); the jobs are recorded at once
    publish_paced(jobs, per_second, name=None) -> thread: `batch -` fed through a pipe
              at a steady pace, so a fault can hit the publisher mid-run (.result =
              (CompletedProcess, summary or None) once joined; .written; .proc)
    record(jobs)                records jobs published by other means (raw client)
    publish_raw(jobs)           one js_publish per job (Nats-Msg-Id = id), recorded
    stream_ids(stream="JOBS") -> collections.Counter of envelope ids stored in a stream
  waiting and checking
    ledger_counts() -> {"succeeded": n, "dead": n, "running": n, "rows": n}
    ledger_rows() -> {job_id: [(status, attempts), …]}
    pending() -> (num_pending, num_ack_pending) summed over the JOBS durables
    durable_infos() -> {durable: consumer info} of the JOBS durables
    calls_by_key() -> Counter {job id: calls} over the mocks and call counters
    close_client()              drops run.client()'s connection (before a server restart)
    wait_settled(timeout, procs=None) -> bool: every recorded job's row is succeeded
              or dead AND nothing pending or awaiting an ack; sets run.wall (seconds
              from the first publish to then). False at the deadline, or at once when
              one of `procs` exits without run.kill9/stop_consumer (a crash)
    mark_start()                restarts the wall clock (called by the first publish)
    check() -> Result           the invariants (below), no printing
    finish(extra=None, problems=None) -> Result: check(), print the RESULT line
              (stdout, and appended to $JETFLEET_FAULTS_RESULTS when set), then fail
              the test when any invariant broke or `problems` (scenario-specific
              failures, a list of strings) is not empty.

Module level: size(full, quick); QUICK (bool); PRIORITIES; STREAM, DLQ (names);
chaos_thread(stop_event, interval, action) -> thread calling action() every
~interval s (±25 %, from the start of the previous call) until stop_event is
set, exceptions kept in thread.errors; jh (jfharness), pgharness, Mock.

Invariants checked by check() (each broken one makes the line FAIL):
  lost            recorded ids with no ledger row, or a row still `running`
  duplicate_rows  ids with more than one jetfleet_jobs row (job_id is its primary
                  key, so this also proves the key holds) PLUS ids whose downstream
                  saw more calls than the ledger counts attempts: every real call is
                  preceded by a committed attempt (jf_ledger_begin), so a call made
                  for a job already settled (or a call never counted) shows as
                  calls > attempts. Also reported alone as extra_calls=N (ids).
  wrong           settled with another status than the job's `expect`
  unexpected      ledger rows whose id was never published by the run
  dlq_missing / dlq_dup / dlq_extra / dlq_reason
                  JOBS_DLQ must hold exactly one dead letter per job that is dead
                  (in the ledger or by expectation) and none for any other job;
                  dlq_reason: Jetfleet-Reason differs from the job's `reason`
  stored_twice / not_stored
                  JOBS holds each recorded id exactly once (the duplicate window
                  must keep a re-published job once)
  pending         sum of num_pending + num_ack_pending over the JOBS durables
  crashed         consumers that exited without being killed or stopped by the run,
                  or that exited non-zero after SIGTERM
  unsettled       (timeout) wait_settled gave up; the line is FAIL
Reported (not failing):
  dead            jobs dead in the ledger
  redelivered     jobs whose ledger `attempts` exceed the job's expected attempts,
                  i.e. real attempts repeated by a fault (a delivery cut short by a
                  kill, a late ack...). Taken from the LEDGER, so redeliveries that
                  found the job already settled (acked without a call) are not in it;
                  those show in deliveries=
  deliveries      sum of delivered.consumer_seq of the JOBS durables: the server's
                  count of every delivery, first ones and redeliveries (NAK-retries
                  by design included)
  dlq             dead letters in JOBS_DLQ
  wall            seconds from the first publish to settled (or to the timeout)
"""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.join(HERE, "..", "integration")
if INTEGRATION not in sys.path:
    sys.path.insert(0, INTEGRATION)

import jfharness as jh  # noqa: E402
import pgharness  # noqa: E402
from test_downstream import MOCK, Mock  # noqa: E402

QUICK = os.environ.get("JETFLEET_FAULTS_QUICK", "") not in ("", "0")
PRIORITIES = ("high", "normal", "low")
STREAM = "JOBS"
DLQ = "JOBS_DLQ"


def size(full, quick):
    """`quick` under JETFLEET_FAULTS_QUICK=1 (CI), else `full`."""
    return quick if QUICK else full


def enc(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def ini_text(sections):
    """INI text from {section: {key: value}} (sections with no keys skipped)."""
    out = []
    for name, keys in sections.items():
        if not keys:
            continue
        out.append("[%s]" % name)
        out += ["%s = %s" % (k, v) for k, v in keys.items()]
        out.append("")
    return "\n".join(out) + "\n"


class Job:
    __slots__ = ("id", "service", "priority", "type", "payload", "expect", "attempts", "reason")

    def __init__(self, id, service, priority="normal", type="t", payload=None,
                 expect="succeeded", attempts=1, reason=None):
        if expect not in ("succeeded", "dead", None):
            raise ValueError("expect must be succeeded, dead or None")
        self.id = id
        self.service = service
        self.priority = priority
        self.type = type
        self.payload = {} if payload is None else payload
        self.expect = expect
        self.attempts = attempts
        self.reason = reason

    def envelope(self):
        return jh.envelope(self.id, service=self.service, type_=self.type,
                           priority=self.priority, payload=self.payload)

    def line(self):
        return enc(self.envelope())

    def subject(self):
        return jh.job_subject(self.service, self.priority, self.type)


class Result:
    """What check() found; .ok, .counts (ordered dict of the line's keys),
    .problems (readable details), .line() the RESULT line."""

    def __init__(self, scenario):
        self.scenario = scenario
        self.counts = collections.OrderedDict()
        self.problems = []
        self.ok = True

    def line(self):
        kv = " ".join("%s=%s" % (k, v) for k, v in self.counts.items())
        return "RESULT %s %s %s" % (self.scenario, kv, "ok" if self.ok else "FAIL")


class FaultRun:
    """See the module docstring."""

    def __init__(self, tc, scenario):
        self.tc = tc
        self.scenario = scenario
        self.tmp = tc.tmp
        self.progs = tc.progs
        self.nats = None
        self.nats_urls = None
        self.pg = None
        self.mocks = []
        self.call_counters = []
        self.config_path = None
        self.jobs = collections.OrderedDict()
        self.t0 = None
        self.wall = None
        self.timed_out = False
        self.killed = set()
        self._nc = None
        self._nc_lock = threading.Lock()
        self._names = collections.Counter()
        self._consumers = []

    # ---- servers

    def start_nats(self):
        self.nats = jh.NatsServer(self.tmp)
        self.tc._cleanups_last.append(self.nats.stop)
        self.progs.logs.append(("nats-server", self.nats.log_path))
        self.nats.start()
        self.nats_urls = self.nats.url
        return self.nats

    def use_nats(self, url):
        self.nats_urls = url

    def start_postgres(self):
        ok, why = pgharness.available()
        if not ok:
            self.tc.skipTest("no PostgreSQL: " + why)
        self.pg = pgharness.PostgresServer()
        self.tc._cleanups_last.append(self.pg.cleanup)
        self.progs.logs.append(("postgresql", self.pg.log_path))
        self.pg.start()
        return self.pg

    def start_mock(self, *args, name=None):
        if not os.access(MOCK, os.X_OK):
            self.tc.fail("%s is missing: build jetfleet-mock first" % MOCK)
        m = Mock(self.tmp, name or "mock-%d" % (len(self.mocks) + 1), list(args))
        self.tc._cleanups_first.append(m.stop)
        self.progs.logs.append((m.name, m.out_path))
        m.start()
        self.mocks.append(m)
        return m

    def add_call_counter(self, fn):
        self.call_counters.append(fn)

    def client(self):
        with self._nc_lock:
            if self._nc is not None and not self._nc._closed and self._nc.error is None:
                return self._nc
            if self._nc is not None:
                self._nc.close()
                self._nc = None
            last = None
            for url in self.nats_urls.split(","):
                try:
                    self._nc = jh.NatsClient(url.strip(), name="faultlib")
                    return self._nc
                except (OSError, ConnectionError, jh.NatsTimeout) as e:
                    last = e
            raise ConnectionError("no NATS server answers at %s: %s" % (self.nats_urls, last))

    def close_client(self):
        with self._nc_lock:
            if self._nc is not None:
                self._nc.close()
                self._nc = None

    # ---- config and consumers

    def http_service(self, mock_or_url, **keys):
        url = mock_or_url if isinstance(mock_or_url, str) else mock_or_url.url()
        s = {"kind": "http", "url": url, "timeout": "5s", "max_deliver": 5, "backoff": "200ms"}
        s.update(keys)
        return s

    def noop_service(self, **keys):
        s = {"kind": "noop", "max_deliver": 5, "backoff": "200ms"}
        s.update(keys)
        return s

    def write_config(self, services, consumer=None, nats=None, stream=None, publisher=None,
                     postgres=None, name="jetfleet.ini"):
        sections = collections.OrderedDict()
        sections["nats"] = dict({"url": self.nats_urls}, **(nats or {}))
        sections["stream"] = dict(stream or {})
        pgkeys = dict(postgres or {})
        if self.pg is not None:
            pgkeys.setdefault("dsn", self.pg.dsn())
        sections["postgres"] = pgkeys
        sections["consumer"] = dict({"stats_interval": "1s"}, **(consumer or {}))
        sections["publisher"] = dict(publisher or {})
        for sname, keys in services.items():
            sections["service.%s" % sname] = keys
        self.config_path = jh.write_config(self.tmp, ini_text(sections), name=name)
        return self.config_path

    def _name(self, prefix):
        self._names[prefix] += 1
        return "%s-%d" % (prefix, self._names[prefix])

    def start_consumer(self, name=None, wait_ready=True, env=None, ready_timeout=60):
        p = self.progs.start_consumer(self.config_path, name=name or self._name("consumer"),
                                      env=env, wait_ready=wait_ready, ready_timeout=ready_timeout)
        self._consumers.append(p)
        return p

    def start_consumers(self, n, prefix="consumer"):
        procs = [self.start_consumer(name=self._name(prefix), wait_ready=False) for _ in range(n)]
        for p in procs:
            jh.wait_for(lambda p=p: jh.log_msgs(p, "consumer ready"), 60,
                        "%s to log \"consumer ready\"" % p.jf_name, procs=procs)
        return procs

    def kill9(self, proc):
        self.killed.add(proc.pid)
        self.progs.kill9(proc)

    def stop_consumer(self, proc, timeout=60):
        return self.progs.stop(proc, signal.SIGTERM, timeout=timeout)

    def consumers(self):
        return [p for p in self._consumers if p.poll() is None]

    def durables(self):
        return self.client().consumer_names(STREAM)

    # ---- jobs

    def make_jobs(self, n, service, prefix, priorities=PRIORITIES, type_="t", payload=None,
                  start=0, **job_keys):
        out = []
        for i in range(start, start + n):
            pl = dict(payload) if payload else {"n": i}
            out.append(Job("%s-%06d" % (prefix, i), service,
                           priority=priorities[i % len(priorities)], type=type_, payload=pl,
                           **job_keys))
        return out

    def record(self, jobs):
        for j in jobs:
            if j.id in self.jobs and self.jobs[j.id] is not j:
                raise ValueError("job id %s recorded twice with different specs" % j.id)
            self.jobs[j.id] = j

    def mark_start(self):
        self.t0 = time.monotonic()

    def _write_ndjson(self, jobs, name):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            for j in jobs:
                f.write(j.line() + b"\n")
        return path

    def _batch(self, path, timeout):
        cp = self.progs.run_publisher(["--config", self.config_path, "batch", path],
                                      timeout=timeout)
        try:
            summary = jh.publisher_json(cp)
        except AssertionError:
            summary = None
        return cp, summary

    def publish(self, jobs, name=None, check=True, timeout=600):
        self.record(jobs)
        if self.t0 is None:
            self.mark_start()
        path = self._write_ndjson(jobs, name or self._name("jobs") + ".ndjson")
        cp, summary = self._batch(path, timeout)
        if check:
            if cp.returncode != 0 or summary is None or \
                    summary["published"] + summary["duplicates"] != len(jobs) or summary["failed"]:
                self.tc.fail("publisher batch of %d jobs: exit %d, %r\n%s" % (
                    len(jobs), cp.returncode, summary, cp.stderr.decode(errors="replace")[-2000:]))
        return summary

    def publish_background(self, jobs, name=None, timeout=600):
        self.record(jobs)
        if self.t0 is None:
            self.mark_start()
        path = self._write_ndjson(jobs, name or self._name("jobs") + ".ndjson")
        t = threading.Thread(target=lambda: setattr(t, "result", self._batch(path, timeout)),
                             name="publisher", daemon=True)
        t.result = None
        t.path = path
        t.start()
        return t

    def publish_paced(self, jobs, per_second, name=None, timeout=600):
        """`jetfleet-publisher batch -` fed through a pipe at per_second lines a
        second (a publisher streaming jobs, so a fault can hit it mid-run);
        returns the thread (.result = (CompletedProcess-like, summary or None)
        once joined, .written = lines written so far)."""
        self.record(jobs)
        if self.t0 is None:
            self.mark_start()
        name = name or self._name("publisher-paced")
        log_path = os.path.join(self.tmp, "%s.log" % name)
        self.progs.logs.append((name, log_path))
        cmd = [jh.PUBLISHER, "--config", self.config_path, "batch", "-"]
        log = open(log_path, "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                bufsize=0,
                                cwd=self.tmp, env=self.progs.env)
        log.close()
        proc.jf_name = name
        proc.jf_log_path = log_path
        self.progs.procs.append(proc)  # stopped by the test's cleanup

        def feed():
            t0 = time.monotonic()
            try:
                for i, j in enumerate(jobs):
                    due = t0 + i / float(per_second)
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    proc.stdin.write(j.line() + b"\n")
                    t.written = i + 1
            except (BrokenPipeError, OSError):
                pass
            try:
                proc.stdin.close()
            except OSError:
                pass
            killer = threading.Timer(timeout, proc.kill)
            killer.start()
            try:
                out = proc.stdout.read()
                proc.wait()
            finally:
                killer.cancel()
                proc.stdout.close()
            cp = subprocess.CompletedProcess(cmd, proc.returncode, out, b"")
            try:
                with open(log_path, "rb") as f:
                    cp.stderr = f.read()
            except OSError:
                pass
            summary = None
            try:
                summary = jh.publisher_json(cp)
            except AssertionError:
                pass
            t.result = (cp, summary)

        t = threading.Thread(target=feed, name=name, daemon=True)
        t.result = None
        t.written = 0
        t.proc = proc
        t.start()
        return t

    def publish_raw(self, jobs):
        self.record(jobs)
        if self.t0 is None:
            self.mark_start()
        nc = self.client()
        for j in jobs:
            nc.js_publish(j.subject(), j.line(), headers={"Nats-Msg-Id": j.id})

    # ---- reading the servers

    def _read_stream(self, stream):
        """Every message of a stream through an ephemeral pull consumer
        (AckNone): much faster than one STREAM.MSG.GET per message."""
        nc = self.client()
        total = nc.stream_info(stream)["state"].get("messages", 0)
        if total == 0:
            return []
        info = nc.js_api("CONSUMER.CREATE.%s" % stream, {
            "stream_name": stream,
            "config": {"ack_policy": "none", "deliver_policy": "all",
                       "inactive_threshold": 60 * 10**9}})
        name = info["name"]
        out = []
        try:
            idle = 0
            while len(out) < total and idle < 3:
                got = nc.pull(stream, name, min(1000, total - len(out)), expires=2.0)
                idle = 0 if got else idle + 1
                out += got
        finally:
            try:
                nc.js_api("CONSUMER.DELETE.%s.%s" % (stream, name))
            except (jh.JsApiError, jh.NatsTimeout, ConnectionError):
                pass
        return out

    def stream_ids(self, stream=STREAM):
        c = collections.Counter()
        for m in self._read_stream(stream):
            try:
                c[json.loads(m.data.decode("utf-8"))["id"]] += 1
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                c[None] += 1
        return c

    def ledger_counts(self):
        rows = self.pg.query("SELECT status, count(*) FROM jetfleet_jobs GROUP BY status")
        out = {"succeeded": 0, "dead": 0, "running": 0}
        for status, n in rows:
            out[status] = int(n)
        out["rows"] = sum(out.values())
        return out

    def ledger_rows(self):
        """{job_id: [(status, attempts), …]} (a list: more than one row is a bug)."""
        out = {}
        for job_id, status, attempts in self.pg.query(
                "SELECT job_id, status, attempts FROM jetfleet_jobs"):
            out.setdefault(job_id, []).append((status, int(attempts)))
        return out

    def durable_infos(self):
        nc = self.client()
        return {d: nc.consumer_info(STREAM, d) for d in nc.consumer_names(STREAM)}

    def pending(self):
        infos = self.durable_infos()
        return (sum(i["num_pending"] for i in infos.values()),
                sum(i["num_ack_pending"] for i in infos.values()))

    def calls_by_key(self):
        total = collections.Counter()
        for m in self.mocks:
            total.update(m.stats().get("by_key") or {})
        for fn in self.call_counters:
            total.update(fn())
        return total

    # ---- waiting

    def wait_settled(self, timeout, procs=None, interval=0.5):
        """True once every recorded job is settled in the ledger and the JOBS
        durables hold nothing; False at the deadline (finish() reports it)."""
        n = len(self.jobs)
        deadline = time.monotonic() + timeout
        while True:
            try:
                c = self.ledger_counts()
                if c["succeeded"] + c["dead"] >= n:
                    p, ap = self.pending()
                    if p == 0 and ap == 0:
                        self.wall = time.monotonic() - (self.t0 or time.monotonic())
                        return True
            except (pgharness.PostgresError, jh.JsApiError, jh.NatsTimeout, ConnectionError,
                    OSError):
                pass  # a server being hurt right now
            gone = [p for p in procs or () if p.poll() is not None and p.pid not in self.killed
                    and signal.SIGTERM not in getattr(p, "jf_signalled", set())]
            if gone or time.monotonic() >= deadline:
                # A consumer that died on its own fails the run at once
                # (check() names it under crashed=).
                self.timed_out = True
                self.wall = time.monotonic() - (self.t0 or time.monotonic())
                return False
            time.sleep(interval)

    # ---- the invariants

    def check(self):
        r = Result(self.scenario)
        jobs = self.jobs
        rows = self.ledger_rows()
        calls = self.calls_by_key() if (self.mocks or self.call_counters) else None
        lost, dup_rows, extra_calls, wrong, redelivered, dead = [], [], [], [], [], []
        for jid, job in jobs.items():
            rr = rows.get(jid)
            if not rr:
                lost.append(jid)
                continue
            if len(rr) > 1:
                dup_rows.append(jid)
            status, attempts = rr[0]
            if status not in ("succeeded", "dead"):
                lost.append(jid)
                continue
            if status == "dead":
                dead.append(jid)
            if job.expect is not None and status != job.expect:
                wrong.append(jid)
            if attempts > job.attempts:
                redelivered.append(jid)
            if calls is not None and calls.get(jid, 0) > max(a for _, a in rr):
                extra_calls.append(jid)
        unexpected = [jid for jid in rows if jid not in jobs]

        dl = collections.defaultdict(list)
        dlq_unknown = 0
        for m in self._read_stream(DLQ):
            try:
                jid = json.loads(m.data.decode("utf-8"))["id"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                dlq_unknown += 1
                continue
            dl[jid].append(m.header("Jetfleet-Reason"))
        should_dl = set(dead) | {jid for jid, j in jobs.items() if j.expect == "dead"}
        dlq_missing = sorted(jid for jid in should_dl if jid not in dl)
        dlq_dup = sorted(jid for jid, v in dl.items() if len(v) > 1)
        dlq_extra = sorted(jid for jid in dl if jid not in should_dl)
        dlq_reason = sorted(jid for jid, v in dl.items()
                            if jid in jobs and jobs[jid].reason is not None and
                            any(x != jobs[jid].reason for x in v))

        stored = self.stream_ids(STREAM)
        stored_twice = sorted(jid for jid in jobs if stored.get(jid, 0) > 1)
        not_stored = sorted(jid for jid in jobs if stored.get(jid, 0) == 0)

        infos = self.durable_infos()
        pending = sum(i["num_pending"] + i["num_ack_pending"] for i in infos.values())
        deliveries = sum((i.get("delivered") or {}).get("consumer_seq", 0) for i in infos.values())

        crashed = []
        for p in self._consumers:
            rc = p.poll()
            if rc is None or p.pid in self.killed:
                continue
            if signal.SIGTERM in getattr(p, "jf_signalled", set()) and rc == 0:
                continue
            crashed.append("%s (exit %s)" % (p.jf_name, rc))

        dup_ids = sorted(set(dup_rows) | set(extra_calls))
        c = r.counts
        c["jobs"] = len(jobs)
        c["lost"] = len(lost)
        c["duplicate_rows"] = len(dup_ids)
        c["dead"] = len(dead)
        c["redelivered"] = len(redelivered)
        c["wall"] = "%.1f" % (self.wall if self.wall is not None else 0.0)
        c["dlq"] = sum(len(v) for v in dl.values()) + dlq_unknown
        c["deliveries"] = deliveries
        c["pending"] = pending
        failing = [("extra_calls", extra_calls), ("wrong", wrong), ("unexpected", unexpected),
                   ("dlq_missing", dlq_missing), ("dlq_dup", dlq_dup), ("dlq_extra", dlq_extra),
                   ("dlq_reason", dlq_reason), ("stored_twice", stored_twice),
                   ("not_stored", not_stored), ("crashed", crashed)]
        for key, ids in failing:
            if ids:
                c[key] = len(ids)
        if dlq_unknown:
            c["dlq_unknown"] = dlq_unknown
        if self.timed_out:
            c["unsettled"] = 1

        def show(key, ids, detail=None):
            if ids:
                sample = ids[:5]
                more = detail(sample) if detail else ""
                r.problems.append("%s: %d, e.g. %s%s" % (key, len(ids), sample, more))

        show("lost", lost, lambda s: " rows %r" % {j: rows.get(j) for j in s})
        show("duplicate ledger rows", dup_rows, lambda s: " rows %r" % {j: rows.get(j) for j in s})
        show("calls > attempts (a call not counted, e.g. after settlement)", extra_calls,
             lambda s: " calls/rows %r" % {j: (calls.get(j), rows.get(j)) for j in s})
        show("settled with the wrong status", wrong,
             lambda s: " rows %r expected %r" % ({j: rows.get(j) for j in s},
                                                 {j: jobs[j].expect for j in s}))
        show("ledger rows of ids never published", unexpected)
        show("dead jobs without a dead letter", dlq_missing)
        show("jobs dead-lettered more than once", dlq_dup, lambda s: " %r" % {j: dl[j] for j in s})
        show("dead letters of jobs not dead", dlq_extra, lambda s: " %r" % {
            j: (dl[j], rows.get(j)) for j in s})
        show("dead letters with the wrong reason", dlq_reason, lambda s: " %r" % {
            j: (dl[j], jobs[j].reason) for j in s})
        show("jobs stored twice in JOBS", stored_twice)
        show("jobs not stored in JOBS", not_stored)
        show("consumers that crashed", crashed)
        if dlq_unknown:
            r.problems.append("%d dead letters whose body has no id" % dlq_unknown)
        if pending:
            r.problems.append("still pending at the end: %r" % {
                d: (i["num_pending"], i["num_ack_pending"]) for d, i in infos.items()
                if i["num_pending"] or i["num_ack_pending"]})
        if self.timed_out:
            r.problems.append("not settled before the deadline (%.0fs); ledger %r" % (
                self.wall or 0, self.ledger_counts()))
        r.ok = not r.problems
        return r

    def finish(self, extra=None, problems=None):
        r = self.check()
        for k, v in (extra or {}).items():
            r.counts[k] = ("%.1f" % v) if isinstance(v, float) else v
        if problems:
            r.problems += list(problems)
            r.ok = False
        line = r.line()
        sys.stdout.write("\n" + line + "\n")
        sys.stdout.flush()
        out = os.environ.get("JETFLEET_FAULTS_RESULTS")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        self.result = r
        if not r.ok:
            self.tc.fail("%s\n  " % line + "\n  ".join(r.problems))
        return r


class FaultTestCase(unittest.TestCase):
    """A temporary directory and a Programs tracker per test; cleanup of
    everything a FaultRun started; logs on failure (see the module doc)."""

    maxDiff = None

    def setUp(self):
        for path in (jh.CONSUMER, jh.PUBLISHER):
            if not os.access(path, os.X_OK):
                self.fail("%s is missing: build first (JETFLEET_BIN=%s)" % (path, jh.BIN_DIR))
        self.tmp = tempfile.mkdtemp(prefix="jf-fault-%s-" % self._testMethodName[:40])
        # Only the config file decides what runs (a developer's JETFLEET_*
        # variables are dropped by Programs).
        self.progs = jh.Programs(self.tmp)
        self._cleanups_first = []   # downstream mocks: after the consumers
        self._cleanups_last = []    # servers: last
        self._runs = []

    def fault_run(self, scenario):
        run = FaultRun(self, scenario)
        self._runs.append(run)
        return run

    _has_failed = jh.JetfleetTestCase._has_failed

    tearDown = jh.JetfleetTestCase.tearDown

    def _stop_servers(self):
        for run in self._runs:
            run.close_client()
        for fn in self._cleanups_first + self._cleanups_last:
            try:
                fn()
            except Exception as e:  # cleanup must go on
                sys.stderr.write("cleanup %r: %s\n" % (fn, e))

    def dump_logs(self, lines=40):
        out = ["", "=" * 70, "logs of %s (%s)" % (self.id(), self.tmp)]
        for name, path in self.progs.logs:
            out += ["--- %s: %s (last %d lines)" % (name, path, lines), jh.tail(path, lines)]
        out.append("=" * 70)
        sys.stderr.write("\n".join(out) + "\n")
        sys.stderr.flush()


def chaos_thread(stop_event, interval, action, name="chaos", jitter=0.25):
    """Calls action() every `interval` seconds (± jitter share), counted from
    the start of the previous call (a slow action, e.g. a restart waiting for
    "consumer ready", does not stretch the cadence), until stop_event is set;
    exceptions are kept in thread.errors (a scenario must check them: a fault
    that could not be injected proves nothing)."""
    rng = random.Random()

    def loop():
        due = time.monotonic()
        while True:
            due += interval * (1 + rng.uniform(-jitter, jitter))
            if stop_event.wait(max(0.0, due - time.monotonic())):
                return
            due = max(due, time.monotonic())  # late after a long action: no burst
            try:
                action()
            except Exception as e:  # reported by the scenario
                t.errors.append("%s: %r" % (time.strftime("%H:%M:%S"), e))
                if len(t.errors) > 20:
                    return

    t = threading.Thread(target=loop, name=name, daemon=True)
    t.errors = []
    t.start()
    return t
