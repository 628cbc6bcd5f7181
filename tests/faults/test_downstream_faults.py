"""Fault suite B: downstream HTTP services misbehaving (kind = http), with the
PostgreSQL ledger on, each scenario ending with faultlib's invariants (one
row per job, the right jobs dead-lettered once, nothing pending, no call the
ledger did not count as an attempt).

  test_503_storm             every call answers 503 (jetfleet-mock error_rate
                             1): the breaker opens and keeps the calls down to
                             probes, no job is dead-lettered, all finish once
                             the storm ends
  test_slower_than_timeout   answers slower than the service timeout: jobs
                             always too slow are dead after exactly max_deliver
                             timed-out calls; jobs slow only during a slow
                             phase succeed on the first call after it; each
                             job's outcome and attempts are checked against
                             the mock's call log
  test_connection_resets     a small Python HTTP service here resets (RST,
                             SO_LINGER 0) after reading the request, closes
                             without answering, answers half a response then
                             resets, or resets connections at accept: each is
                             retried; jobs reset every time die after
                             max_deliver; no attempt reaches the service twice
  test_429_odd_retry_after   429 with Retry-After as seconds, the three HTTP
                             date forms, past, negative, huge, garbage, empty
                             and over-long: the gap measured between the 429
                             and the next call is the value, retry_after_max
                             for huge ones, or the backoff (fallback) for the
                             ones common/retry_after.c refuses

Run from tests/faults:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_downstream_faults
"""

import collections
import email.utils
import json
import os
import socket
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultlib  # noqa: E402
from faultlib import FaultTestCase, Job, size  # noqa: E402

jh = faultlib.jh
PRIORITIES = faultlib.PRIORITIES


def wall_ms():
    return int(time.time() * 1000)


def calls_by_key(mock):
    """{key: [call, …] in arrival order} from a jetfleet-mock's call log."""
    out = collections.defaultdict(list)
    for c in mock.calls():
        out[c.get("key")].append(c)
    for v in out.values():
        v.sort(key=lambda c: c["ts_ms"])
    return out


def breaker_opens(procs, service):
    return [l for p in procs for l in jh.log_msgs(p, "breaker state")
            if l.get("service") == service and l.get("state") == "open"]


# ---------------------------------------------------------------------------
# A downstream that breaks connections

class FaultServer:
    """HTTP/1.1 over raw sockets (keep-alive), so connections can be broken
    exactly: each POST's payload.fault = {"mode": M, "first": K} makes the
    first K calls with that Idempotency-Key misbehave, then it answers 200.
    Modes:
      reset    read the request, then RST (SO_LINGER 0) without a byte back
      close    read the request, then FIN without a byte back (empty reply)
      partial  send a status line, headers and half the body, then RST
      429      answer 429 with the header line "Retry-After:<raw>" (raw may be
               empty or anything printable)
    reset_at_accept(n) resets the next n connections as soon as they are
    accepted, before any byte is read (the service's key is then unknown).
    Every request read is recorded: (ts_ms, key, attempt, action)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.per_key = collections.Counter()
        self.accept_resets_left = 0
        self.accept_resets = 0
        self.connections = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._accept_loop, name="faultserver",
                                       daemon=True)
        self.thread.start()

    def url(self, path="/call"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def reset_at_accept(self, n):
        with self.lock:
            self.accept_resets_left = n

    def stop(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def by_key(self):
        with self.lock:
            return collections.Counter(c[1] for c in self.calls if c[1] is not None)

    def calls_of(self, key):
        with self.lock:
            return [c for c in self.calls if c[1] == key]

    @staticmethod
    def _rst(conn):
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        conn.close()

    def _accept_loop(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                reset = self.accept_resets_left > 0
                if reset:
                    self.accept_resets_left -= 1
                    self.accept_resets += 1
            if reset:
                self._rst(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn, buf):
        """(headers dict lower-case, body, rest of buf) or None at EOF."""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        while len(buf) < n:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        return headers, buf[:n], buf[n:]

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                got = self._read_request(conn, buf)
                if got is None:
                    conn.close()
                    return
                headers, body, buf = got
                key = headers.get("idempotency-key")
                attempt = headers.get("jetfleet-attempt")
                fault = {}
                try:
                    env = json.loads(body.decode("utf-8"))
                    fault = (env.get("payload") or {}).get("fault") or {}
                except (ValueError, AttributeError, UnicodeDecodeError):
                    pass
                with self.lock:
                    self.per_key[key] += 1
                    nth = self.per_key[key]
                    action = "ok"
                    if fault and nth <= int(fault.get("first", 0)):
                        action = fault.get("mode", "reset")
                    self.calls.append((wall_ms(), key, attempt, action))
                if action == "reset":
                    self._rst(conn)
                    return
                if action == "close":
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                    return
                if action == "partial":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 200\r\n\r\n{\"ok\":true,\"half")
                    time.sleep(0.05)  # let the bytes leave before the reset
                    self._rst(conn)
                    return
                if action == "429":
                    raw = fault.get("retry_after", "")
                    msg = b'{"error":"slow down"}'
                    conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: "
                                 b"application/json\r\nRetry-After:" + raw.encode("latin-1") +
                                 b"\r\nContent-Length: %d\r\n\r\n" % len(msg) + msg)
                    continue
                out = json.dumps({"ok": True, "id": key, "attempt": attempt}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(out) + out)
        except OSError:
            try:
                conn.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------

class TestDownstreamFaults(FaultTestCase):

    def fault_server(self, run):
        s = FaultServer()
        self._cleanups_first.append(s.stop)
        run.add_call_counter(s.by_key)
        return s

    # ---- 503 storm

    def test_503_storm(self):
        njobs, nproc, max_in_flight, probes = size(2000, 500), 2, 16, 3
        storm_s = size(10.0, 6.0)
        run = self.fault_run("downstream-503-storm")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock("--latency", "5ms-20ms")
        mock.configure(error_rate=1)
        run.write_config(
            services={"llm": run.http_service(
                mock, max_deliver=5, backoff="200ms", ack_wait="10s", breaker_window=20,
                breaker_min_calls=10, breaker_open="1s", breaker_open_max="4s",
                breaker_probes=probes)},
            consumer={"max_in_flight": max_in_flight})
        procs = run.start_consumers(nproc)
        run.publish(run.make_jobs(njobs, "llm", "storm"))
        problems = []

        jh.wait_for(lambda: breaker_opens(procs, "llm"), 60, "the breaker to open", procs=procs)
        t_open = time.monotonic()
        calls_at_open = mock.stats()["requests"]
        # The storm goes on with the breaker open: only probes get through.
        while time.monotonic() < t_open + storm_s:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        st = mock.stats()
        storm_calls = st["requests"]
        calls_while_open = storm_calls - calls_at_open
        if set(st["by_status"]) != {"503"}:
            problems.append("calls answered other than 503 during the storm: %r" % st["by_status"])
        mock.configure(error_rate=0)
        t_off = time.monotonic()
        settled = run.wait_settled(size(300, 180), procs=procs)
        recovered_s = time.monotonic() - t_off
        # Per process: what was in flight when its breaker opened, then at
        # most `probes` calls per open period (>= 1 s).
        bound = nproc * (max_in_flight + probes * (int(storm_s) + 2))
        if calls_while_open > bound:
            problems.append("%d calls in %.0fs with the breaker open, more than %d" % (
                calls_while_open, storm_s, bound))
        opens = len(breaker_opens(procs, "llm"))
        run.finish(extra={"storm_s": storm_s, "storm_calls": storm_calls,
                          "calls_while_open": calls_while_open, "open_bound": bound,
                          "breaker_opens": opens,
                          "recovered_s": recovered_s if settled else -1.0}, problems=problems)

    # ---- slower than the timeout

    def test_slower_than_timeout(self):
        # Two services on the same mock: "slow" for the jobs always too slow,
        # "slowp" (more attempts) for the ones slow during the phase only.
        n_always, n_phase, max_deliver, max_deliver_p = size(30, 10), size(200, 100), 3, 6
        run = self.fault_run("downstream-slow")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock()
        mock.configure(latency="3s")  # the slow phase, for every job without a directive
        # The breaker stays shut (test_503_storm covers it): every attempt
        # here is a call, so each job's outcome follows from its calls alone.
        keys = dict(timeout="1s", backoff="200ms", ack_wait="5s", breaker_window=1000,
                    breaker_min_calls=1000)
        run.write_config(
            services={"slow": run.http_service(mock, max_deliver=max_deliver, **keys),
                      "slowp": run.http_service(mock, max_deliver=max_deliver_p, **keys)},
            consumer={"max_in_flight": 32})
        procs = run.start_consumers(2)
        always = [Job("slow-always-%04d" % i, "slow", PRIORITIES[i % 3],
                      payload={"n": i, "mock": {"latency": "3s"}}, expect="dead",
                      attempts=max_deliver, reason="max_deliveries") for i in range(n_always)]
        phase = [Job("slow-phase-%04d" % i, "slowp", PRIORITIES[i % 3], payload={"n": i},
                     expect=None) for i in range(n_phase)]
        jobs = [j for pair in zip(phase, always + [None] * n_phase) for j in pair if j]
        run.publish(jobs)
        problems = []

        # The slow phase lasts until a third of the phase jobs have had a
        # call (redeliveries go first, so waiting for all of them would
        # only use up the early ones' attempts).
        def third_called():
            bk = mock.stats()["by_key"]
            return sum(1 for j in phase if bk.get(j.id)) >= len(phase) // 3
        jh.wait_for(third_called, 180, "a call for a third of the phase jobs", interval=0.1,
                    procs=procs)
        mock.configure(latency="0")
        settled = run.wait_settled(size(300, 180), procs=procs)
        log = calls_by_key(mock)
        rows = run.ledger_rows()
        outcome = collections.Counter()
        timeout_errors = 0
        for j in always + phase:
            calls = log.get(j.id, [])
            timed_out = [c for c in calls if c["status"] != 200]
            ok = [c for c in calls if c["status"] == 200]
            md = max_deliver if j in always else max_deliver_p
            if j in always or not ok:
                want = ("dead", md)
                # status 0: the mock never answered, the client gave up.
                if len(calls) != md or ok or any(c["status"] != 0 for c in calls):
                    problems.append("%s: calls %r, expected %d timed out" % (
                        j.id, [(c["status"], c["latency_ms"]) for c in calls], md))
            else:
                want = ("succeeded", len(calls))
                if calls[-1]["status"] != 200 or len(ok) != 1 or len(calls) > md or \
                        any(c["status"] != 0 for c in timed_out):
                    problems.append("%s: calls %r, expected timeouts then one 200" % (
                        j.id, [(c["status"], c["latency_ms"]) for c in calls]))
            j.expect = want[0]
            got = rows.get(j.id)
            if got != [want] and settled:
                problems.append("%s: ledger %r, from the mock's log expected %r" % (
                    j.id, got, [want]))
            outcome["%s_after_%d" % want] += 1
            timeout_errors += len(timed_out)
        if settled:
            errs = run.pg.query("SELECT DISTINCT error FROM jetfleet_jobs WHERE status = 'dead'")
            if errs != [["timeout after 1000 ms"]]:
                problems.append("dead jobs' errors %r, expected the timeout" % errs)
        retried_ok = sum(v for k, v in outcome.items()
                         if k.startswith("succeeded") and not k.endswith("_1"))
        if retried_ok == 0:
            problems.append("no phase job succeeded after a timed-out call: the test proves "
                            "nothing")
        extra = {"timeouts": timeout_errors, "retried_then_ok": retried_ok}
        extra.update(sorted(outcome.items()))
        run.finish(extra=extra, problems=problems)

    # ---- connection resets

    def test_connection_resets(self):
        n_ok, max_deliver = size(600, 200), 4
        run = self.fault_run("downstream-resets")
        run.start_nats()
        run.start_postgres()
        srv = self.fault_server(run)
        acc = self.fault_server(run)
        accept_resets = size(40, 15)
        acc.reset_at_accept(accept_resets)
        run.write_config(
            services={
                "rst": run.http_service(srv.url(), timeout="5s", max_deliver=max_deliver,
                                        backoff="100ms", ack_wait="10s", breaker_window=1000,
                                        breaker_min_calls=1000),
                "acc": run.http_service(acc.url(), timeout="5s", max_deliver=10,
                                        backoff="100ms", ack_wait="10s", breaker_window=1000,
                                        breaker_min_calls=1000),
            },
            consumer={"max_in_flight": 16})
        procs = run.start_consumers(2)
        kinds = [("reset", 2, "succeeded", 3), ("close", 1, "succeeded", 2),
                 ("partial", 1, "succeeded", 2), ("reset", 99, "dead", max_deliver),
                 ("close", 99, "dead", max_deliver)]
        jobs, special = [], {}
        for i in range(n_ok):
            k = kinds[i % 10] if i % 10 < len(kinds) else None
            jid = "rst-%05d" % i
            if k is None:
                jobs.append(Job(jid, "rst", PRIORITIES[i % 3], payload={"n": i}))
                continue
            mode, first, expect, attempts = k
            jobs.append(Job(jid, "rst", PRIORITIES[i % 3],
                            payload={"n": i, "fault": {"mode": mode, "first": first}},
                            expect=expect, attempts=attempts,
                            reason="max_deliveries" if expect == "dead" else None))
            special[jid] = k
        jobs += run.make_jobs(size(300, 100), "acc", "acc")
        run.publish(jobs)
        settled = run.wait_settled(size(300, 180), procs=procs)
        problems = []
        rows = run.ledger_rows()
        exact = 0
        for jid, (mode, first, expect, attempts) in special.items():
            calls = srv.calls_of(jid)
            if settled and rows.get(jid) != [(expect, attempts)]:
                problems.append("%s (%s first %d): ledger %r, expected %r; calls %r" % (
                    jid, mode, first, rows.get(jid), [(expect, attempts)],
                    [(c[2], c[3]) for c in calls]))
            elif len(calls) == attempts:
                exact += 1
        # An attempt is one request: the same Jetfleet-Attempt twice means a
        # request the ledger did not count reached the service.
        seen = collections.Counter((c[1], c[2]) for c in srv.calls + acc.calls)
        twice = sorted(k for k, n in seen.items() if n > 1)
        if twice:
            problems.append("%d attempts reached the service more than once, e.g. %r" % (
                len(twice), [(k, [c[3] for c in srv.calls if (c[1], c[2]) == k])
                             for k in twice[:5]]))
        if acc.accept_resets != accept_resets:
            problems.append("only %d of %d connection resets at accept happened" % (
                acc.accept_resets, accept_resets))
        # The last error of a job that died names what the connection did.
        want_error = {"reset": ("connection error", "connection lost before an answer"),
                      "close": ("empty reply", "connection lost before an answer")}
        errors = collections.Counter()
        if settled:
            for jid, e in run.pg.query("SELECT job_id, error FROM jetfleet_jobs "
                                       "WHERE status = 'dead'"):
                head = (e or "").split(" (")[0]
                errors[head] += 1
                mode = special.get(jid, ("?",))[0]
                if not head.startswith(want_error.get(mode, ("-",))):
                    problems.append("%s (%s): dead with error %r" % (jid, mode, e))
        actions = collections.Counter(c[3] for c in srv.calls)
        run.finish(extra={"resets": actions["reset"], "closes": actions["close"],
                          "partials": actions["partial"], "accept_resets": acc.accept_resets,
                          "exact": exact, "same_attempt_twice": len(twice),
                          "dead_errors": ",".join("%s:%d" % (k.replace(" ", "_"), v)
                                                  for k, v in sorted(errors.items())),
                          "connections": srv.connections + acc.connections},
                   problems=problems)

    # ---- 429 with odd Retry-After values

    def test_429_odd_retry_after(self):
        backoff_ms, ra_max_ms, slack_ms = 300, 5000, 1500
        run = self.fault_run("downstream-retry-after")
        run.start_nats()
        run.start_postgres()
        mock = run.start_mock()
        srv = self.fault_server(run)
        common = dict(timeout="5s", max_deliver=3, backoff="%dms" % backoff_ms,
                      retry_after_max="%dms" % ra_max_ms, ack_wait="10s")
        run.write_config(services={"ra": run.http_service(mock, **common),
                                   "raw": run.http_service(srv.url(), **common)},
                         consumer={"max_in_flight": 32})
        procs = run.start_consumers(2)

        now = time.time()
        # 3-4 s ahead, under retry_after_max (whole seconds: HTTP dates
        # have no fraction).
        at = int(now) + 4
        imf = email.utils.formatdate(at, usegmt=True)            # Sun, 06 Nov 1994 08:49:37 GMT
        t = time.gmtime(at)
        rfc850 = time.strftime("%A, %d-%b-%y %H:%M:%S GMT", t)     # Sunday, 06-Nov-94 08:49:37 GMT
        asctime = time.strftime("%a %b ", t) + ("%2d" % t.tm_mday) + time.strftime(
            " %H:%M:%S %Y", t)                                      # Sun Nov  6 08:49:37 1994
        past = email.utils.formatdate(now - 3600, usegmt=True)
        far = email.utils.formatdate(253402300799, usegmt=True)   # Fri, 31 Dec 9999 23:59:59 GMT
        # (name, value, expectation): ("at", unix s) the retry comes at that
        # second; ("gap", ms) that long after the 429; "clamp" retry_after_max;
        # "fallback" the backoff (value refused, or zero).
        cases = [
            ("seconds", "2", ("gap", 2000)),
            ("seconds-ows", "  2 ", ("gap", 2000)),
            ("zero", "0", "fallback"),
            ("imf-date", imf, ("at", at)),
            ("rfc850-date", rfc850, ("at", at)),
            ("asctime-date", asctime, ("at", at)),
            ("past-date", past, "fallback"),
            ("far-date", far, "clamp"),
            ("huge", "9" * 40, "clamp"),
            ("day", "86400", "clamp"),
            ("negative", "-5", "fallback"),
            ("fraction", "3.5", "fallback"),  # read as 3 s it would land past the bound
            ("garbage", "soon", "fallback"),
            ("digits-then-garbage", "120abc", "fallback"),
            ("hex", "0x10", "fallback"),
            ("wrong-weekday", "Mon, 01 Jan 2100 00:00:00 GMT", "fallback"),
            ("lower-case-date", imf.lower(), "fallback"),
        ]
        raw_cases = [
            ("empty", "", "fallback"),
            ("blank", "   ", "fallback"),
            ("over-long", " " + "7" * 200, "fallback"),
        ]
        jobs = []
        for i, (name, value, _) in enumerate(cases):
            jobs.append(Job("ra-%s" % name, "ra", PRIORITIES[i % 3], payload={
                "mock": {"fail_first": 1, "status": 429, "retry_after": value}}, attempts=2))
        for i, (name, value, _) in enumerate(raw_cases):
            jobs.append(Job("raw-%s" % name, "raw", PRIORITIES[i % 3], payload={
                "fault": {"mode": "429", "first": 1, "retry_after": value}}, attempts=2))
        run.publish(jobs)
        run.wait_settled(120, procs=procs)  # finish() reports a timeout
        log = calls_by_key(mock)
        problems, gaps = [], []
        for name, value, want in cases + raw_cases:
            jid = ("ra-%s" if (name, value, want) in cases else "raw-%s") % name
            if jid.startswith("ra-"):
                calls = [(c["ts_ms"], c["status"]) for c in log.get(jid, [])]
            else:
                calls = [(c[0], 429 if c[3] == "429" else 200) for c in srv.calls_of(jid)]
            if [s for _, s in calls] != [429, 200]:
                problems.append("%s (%r): calls %r, expected a 429 then a 200" % (
                    name, value, calls))
                continue
            first, second = calls[0][0], calls[1][0]
            gap = second - first
            gaps.append("%s:%d" % (name, gap))
            # ts_ms values are truncated to the millisecond: 1 ms of leeway.
            if want == "fallback":
                lo, hi = 0, backoff_ms + slack_ms
            elif want == "clamp":
                lo, hi = ra_max_ms - 1, ra_max_ms + slack_ms
            elif want[0] == "gap":
                lo, hi = want[1] - 1, want[1] + slack_ms
            else:
                lo, hi = want[1] * 1000 - first - 1, want[1] * 1000 - first + slack_ms
                if lo < backoff_ms:
                    problems.append("%s: the first call came too late (%d ms before the date) "
                                    "to tell the date from the backoff" % (name, lo))
            if not lo <= gap <= hi:
                problems.append("%s (Retry-After %r, expected %r): %d ms between the 429 and "
                                "the retry, expected %d..%d" % (name, value, want, gap, lo, hi))
        run.finish(extra={"cases": len(cases) + len(raw_cases), "gaps_ms": ",".join(gaps)},
                   problems=problems)


if __name__ == "__main__":
    unittest.main()
