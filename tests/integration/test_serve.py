"""`jetfleet-publisher serve`, the HTTP intake, against a real nats-server -js
(and a real PostgreSQL for GET /jobs/{id}): what it answers, what it stores,
what it refuses, and that a 202 means the jobs are already in the stream.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_serve
"""

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
import unittest

import pgharness
from jfharness import (PUBLISHER, UUID4_RE, JetfleetTestCase, NatsClient, envelope, free_port,
                       hval, log_msgs, make_config, read_log_lines, wait_for, write_config)

TOKEN = "t0k-3n_for-intake"


def enc(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


class Intake:
    """One `jetfleet-publisher serve --listen 127.0.0.1:0`; the port comes
    from its "listening on" line."""

    def __init__(self, test, config_path, args=(), env=None, name="serve"):
        self.test = test
        self.out_path = os.path.join(test.tmp, "%s.out" % name)
        self.log_path = os.path.join(test.tmp, "%s.log" % name)
        e = dict(test.progs.env)
        e.update(env or {})
        cmd = [PUBLISHER, "--config", config_path, "serve", "--listen", "127.0.0.1:0"] + list(args)
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                         cwd=test.tmp, env=e)
        self.proc.jf_name = name
        self.proc.jf_log_path = self.log_path
        test.progs.procs.append(self.proc)
        test.progs.logs.append((name, self.log_path))

        def listening():
            with open(self.out_path, "rb") as f:
                m = re.search(rb"listening on 127\.0\.0\.1:(\d+)", f.read())
            return int(m.group(1)) if m else None
        self.port = wait_for(listening, 30, "%s to print \"listening on\"" % name,
                             procs=[self.proc])

    def request(self, method, path, body=None, headers=None, token=TOKEN, chunked=False):
        """(status, headers {lower name: value}, JSON body or raw bytes)."""
        h = {"Content-Type": "application/json"}
        if token is not None:
            h["Authorization"] = "Bearer " + token
        h.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            if chunked:
                conn.request(method, path, body=iter([body]), headers=h, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            headers = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        try:
            parsed = json.loads(data.decode("utf-8")) if data else None
        except ValueError:
            parsed = data
        return r.status, headers, parsed

    def post(self, body, **kw):
        if not isinstance(body, bytes):
            body = enc(body)
        return self.request("POST", "/jobs", body, **kw)

    def log(self):
        return read_log_lines(self.proc)


class ServeTestCase(JetfleetTestCase):

    def intake_config(self, intake=None, extra=""):
        keys = {"token": TOKEN}
        keys.update(intake or {})
        text = "".join("%s = %s\n" % kv for kv in keys.items() if kv[1] is not None)
        return write_config(self.tmp, make_config(self.nats.url, extra="[intake]\n" + text + extra))

    def start_intake(self, intake=None, extra="", **kw):
        return Intake(self, self.intake_config(intake, extra), **kw)

    def stream_count(self):
        try:
            return self.nc.stream_info("JOBS")["state"]["messages"]
        except Exception:
            return 0


class TestServe(ServeTestCase):

    def test_post_one_envelope_is_stored_before_the_202(self):
        srv = self.start_intake()
        body = b'{"id":"job-1","service":"work","type":"t","payload":{"n":1.50,"s":"\\u00e9"}}'
        st, _, out = srv.post(body)
        self.assertEqual(st, 202, out)
        self.assertEqual(out["ids"], ["job-1"])
        self.assertEqual(out["duplicates"], [False])
        seq = out["seqs"][0]
        # No waiting: the PubAck was in before the answer, so the job is.
        m = self.nc.stream_msg_get("JOBS", seq)
        self.assertIsNotNone(m, "seq %d of the 202 is not in JOBS" % seq)
        self.assertEqual(m["subject"], "jobs.work.normal.t")
        self.assertEqual(m["data"], body, "the bytes sent are the bytes stored")
        self.assertEqual(hval(m["headers"], "Nats-Msg-Id"), "job-1")

        # The same id again: the duplicate window keeps one copy.
        st, _, out = srv.post(body)
        self.assertEqual((st, out["seqs"], out["duplicates"]), (202, [seq], [True]))
        self.assertEqual(self.stream_count(), 1)

        # One access log line per request: method, path, status, ms.
        lines = [l for l in srv.log() if l.get("msg") == "request"]
        self.assertEqual(len(lines), 2, lines)
        for l in lines:
            self.assertEqual((l["method"], l["path"], l["status"], l["jobs"]),
                             ("POST", "/jobs", 202, 1))
            self.assertIsInstance(l["ms"], int)

    def test_post_array_generates_ids_and_keeps_bytes(self):
        srv = self.start_intake()
        elems = [b'{"service":"work","type":"t","payload":{"k":[1, 2]}}',
                 b'{ "id" : "given" , "service":"work","priority":"high","type":"u","payload":1e3}',
                 b'{\n "service":"other","type":"t","payload":"]},[{"}']
        body = b"[ " + b" ,\n".join(elems) + b" ]\n"
        st, _, out = srv.post(body)
        self.assertEqual(st, 202, out)
        ids = out["ids"]
        self.assertEqual(len(ids), 3)
        self.assertRegex(ids[0], UUID4_RE)
        self.assertEqual(ids[1], "given")
        self.assertRegex(ids[2], UUID4_RE)
        self.assertNotEqual(ids[0], ids[2])
        self.assertEqual(out["duplicates"], [False, False, False])
        self.assertEqual(len(set(out["seqs"])), 3)
        subjects = ["jobs.work.normal.t", "jobs.work.high.u", "jobs.other.normal.t"]
        for i, seq in enumerate(out["seqs"]):
            m = self.nc.stream_msg_get("JOBS", seq)
            self.assertEqual(m["subject"], subjects[i])
            self.assertEqual(hval(m["headers"], "Nats-Msg-Id"), ids[i])
            if i == 1:
                self.assertEqual(m["data"], elems[1], "an envelope with an id is stored as sent")
            else:
                # The id goes in front; everything else is the client's bytes.
                prefix = b'{"id":"%s",' % ids[i].encode()
                self.assertEqual(m["data"], prefix + elems[i][1:])
                self.assertEqual(json.loads(m["data"])["id"], ids[i])
        self.assertEqual(self.stream_count(), 3)

    def test_bad_input_is_400_with_index_and_publishes_nothing(self):
        srv = self.start_intake({"max_jobs": 3})
        good = envelope("g-1")
        cases = [
            (b'{"id":"x","service":"work",', 400, 0, "not JSON"),
            (b"", 400, 0, "empty body"),
            (b"42", 400, 0, "invalid envelope"),
            (enc([good, envelope("g-2"), {"id": "x", "service": "work", "type": "t"}]), 400, 2,
             "payload"),
            (enc([good, dict(envelope("g-3"), priority="urgent")]), 400, 1, "priority"),
            (enc([good, envelope("bad.service", service="a.b")]), 400, 1, "service"),
            (b'{"id":"d","id":"e","service":"work","type":"t","payload":{}}', 400, 0,
             "duplicate"),
            (enc([good]) + b" trailing", 400, 0, "after the array"),
            (b'[{"id":"u","service":"work","type":"t","payload":{}}', 400, 0, "not closed"),
            (b"[]", 400, 0, "no envelopes"),
            (enc([envelope("m-%d" % i) for i in range(4)]), 413, 3, "max_jobs"),
        ]
        for body, status, index, words in cases:
            st, h, out = srv.post(body)
            self.assertEqual(st, status, (body, out))
            self.assertEqual(h.get("content-type"), "application/json")
            self.assertEqual(out.get("index"), index, (body, out))
            self.assertIn(words, out["error"], body)
        self.assertEqual(self.stream_count(), 0, "nothing of a refused request is published")

    def test_body_over_max_body_is_413(self):
        srv = self.start_intake({"max_body": 2048})
        big = enc(envelope("big", payload="x" * 4000))
        st, _, out = srv.post(big)
        self.assertEqual(st, 413, out)
        self.assertIn("max_body", out["error"])
        # Without a Content-Length (chunked) the limit holds as well.
        st, _, out = srv.post(big, chunked=True)
        self.assertEqual(st, 413, out)
        # Just under the limit is fine.
        ok = enc(envelope("ok", payload="x" * 1900))
        self.assertLessEqual(len(ok), 2048)
        st, _, out = srv.post(ok, chunked=True)
        self.assertEqual((st, out["ids"]), (202, ["ok"]))
        self.assertEqual(self.stream_count(), 1)

    def test_bearer_token(self):
        srv = self.start_intake()
        st, h, out = srv.post(envelope("a-1"), token=None)
        self.assertEqual(st, 401, out)
        self.assertIn("Bearer", h.get("www-authenticate", ""))
        for bad in ("wrong", TOKEN + "x", TOKEN[:-1], ""):
            st, _, out = srv.post(envelope("a-1"), token=bad)
            self.assertEqual(st, 401, (bad, out))
        st, _, out = srv.post(envelope("a-1"), headers={"Authorization": "Basic " + TOKEN},
                              token=None)
        self.assertEqual(st, 401, out)
        st, _, out = srv.request("GET", "/jobs/a-1", token="wrong")
        self.assertEqual(st, 401, out)
        self.assertEqual(self.stream_count(), 0)
        # healthz needs no token; the right token is let in.
        self.assertEqual(srv.request("GET", "/healthz", token=None)[0], 200)
        st, _, out = srv.post(envelope("a-1"), headers={"Authorization": "bearer " + TOKEN},
                              token=None)
        self.assertEqual((st, out["ids"]), (202, ["a-1"]))
        with open(srv.log_path, "rb") as f:
            self.assertNotIn(TOKEN.encode(), f.read(), "the token must never be logged")

    def test_token_file_and_no_auth(self):
        path = os.path.join(self.tmp, "token")
        with open(path, "w") as f:
            f.write("from-file-secret\n")
        srv = self.start_intake({"token": None, "token_file": path}, name="serve-file")
        self.assertEqual(srv.post(envelope("f-1"))[0], 401)
        st, _, out = srv.post(envelope("f-1"), token="from-file-secret")
        self.assertEqual(st, 202, out)
        # Without token and token_file anyone may post.
        open_srv = self.start_intake({"token": None}, name="serve-open")
        st, _, out = open_srv.post(envelope("f-2"), token=None)
        self.assertEqual(st, 202, out)
        # An unreadable token file is a configuration error (exit 2) naming it.
        cfg = self.intake_config({"token": None, "token_file": path + ".missing"})
        cp = self.progs.run_publisher(["--config", cfg, "serve", "--listen", "127.0.0.1:0"])
        self.assertEqual(cp.returncode, 2)
        self.assertIn(b"token_file", cp.stderr)
        self.assertIn(b"token.missing", cp.stderr)

    def test_methods_and_paths(self):
        srv = self.start_intake()
        st, h, out = srv.request("GET", "/jobs")
        self.assertEqual((st, h.get("allow")), (405, "POST"), out)
        st, h, out = srv.request("DELETE", "/jobs/x")
        self.assertEqual(st, 405, out)
        self.assertIn("GET", h.get("allow"))
        st, h, out = srv.request("POST", "/healthz", b"{}")
        self.assertEqual(st, 405, out)
        st, _, out = srv.request("GET", "/nope")
        self.assertEqual(st, 404, out)
        self.assertIn("error", out)
        # No ledger configured: GET /jobs/{id} cannot answer.
        st, _, out = srv.request("GET", "/jobs/x")
        self.assertEqual(st, 501, out)
        self.assertIn("[postgres] dsn", out["error"])

    def test_healthz_follows_nats_and_sigterm_stops(self):
        srv = self.start_intake()
        st, _, out = srv.request("GET", "/healthz", token=None)
        self.assertEqual((st, out), (200, {"status": "ok", "nats": "connected"}))

        self.nats.stop()
        wait_for(lambda: srv.request("GET", "/healthz", token=None)[0] == 503, 20,
                 "healthz to turn 503 with NATS down", procs=[srv.proc])
        st, _, out = srv.request("GET", "/healthz", token=None)
        self.assertEqual(out["status"], "unavailable")
        self.assertNotEqual(out["nats"], "connected")
        st, _, out = srv.post(envelope("while-down"))
        self.assertEqual(st, 503, out)
        self.assertIn("safe", out["error"], "a 503 tells the client that a retry is safe")

        self.nats.restart()
        wait_for(lambda: srv.request("GET", "/healthz", token=None)[0] == 200, 30,
                 "healthz to come back once NATS is", procs=[srv.proc])
        self.nc.close()
        self.nc = NatsClient(self.nats.url)
        st, _, out = srv.post(envelope("after"))
        self.assertEqual(st, 202, out)
        self.assertIsNotNone(self.nc.stream_msg_get("JOBS", out["seqs"][0]))

        srv.proc.send_signal(signal.SIGTERM)
        self.assertEqual(srv.proc.wait(timeout=30), 0)
        lines = srv.log()
        self.assertEqual(lines[-1]["msg"], "intake stopped", lines[-1])
        self.assertGreaterEqual(lines[-1]["jobs_accepted"], 1)

    def test_sigterm_lets_a_request_in_progress_finish(self):
        # The server is frozen (SIGSTOP) so the PubAck of a POST cannot come
        # yet; SIGTERM arrives while the request waits for it. Once the server
        # thaws, the request still gets its 202, and then the process exits 0.
        srv = self.start_intake(env={"JETFLEET_LOG_LEVEL": "debug"})
        result = {}
        self.nats.proc.send_signal(signal.SIGSTOP)
        try:
            t = threading.Thread(target=lambda: result.update(r=srv.post(envelope("late"))))
            t.start()
            wait_for(lambda: log_msgs(srv.proc, "publishing"), 10, "the POST to be publishing",
                     procs=[srv.proc])
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: log_msgs(srv.proc, "shutting down"), 10, "serve to start stopping",
                     procs=[srv.proc])
            self.assertIsNone(srv.proc.poll(), "serve must wait for the request in progress")
        finally:
            self.nats.proc.send_signal(signal.SIGCONT)
        t.join(30)
        self.assertEqual(srv.proc.wait(timeout=30), 0)
        st, _, out = result["r"]
        self.assertEqual((st, out["ids"]), (202, ["late"]), out)
        self.assertIsNotNone(self.nc.stream_msg_get("JOBS", out["seqs"][0]))


class TestServeLedger(pgharness.PostgresMixin, ServeTestCase):
    """GET /jobs/{id} from the ledger a consumer writes."""

    def test_job_status_from_the_ledger(self):
        cfg = write_config(self.tmp, make_config(
            self.nats.url, consumer={"max_in_flight": 16},
            services={"work": {"kind": "noop"}, "flaky": {"kind": "noop", "fail_attempts": 1,
                                                         "backoff": "100ms"}},
            extra="[postgres]\ndsn = %s\n[intake]\ntoken = %s\n" % (self.pg.dsn(), TOKEN)))
        srv = Intake(self, cfg)
        # No consumer yet has created the table: the ledger cannot answer.
        st, _, out = srv.request("GET", "/jobs/early")
        self.assertEqual(st, 503, out)
        self.assertIn("jetfleet_jobs", out["error"])

        consumer = self.progs.start_consumer(cfg)
        jobs = [envelope("doc/1", tenant="acme", payload={"n": 1}),
                envelope("doc-2", service="flaky", priority="high")]
        st, _, out = srv.post(jobs)
        self.assertEqual(st, 202, out)
        seqs = out["seqs"]

        def finished(job_id):
            st, _, row = srv.request("GET", "/jobs/" + job_id.replace("/", "%2F"))
            return row if st == 200 and row.get("status") == "succeeded" else None
        row = wait_for(lambda: finished("doc/1"), 30, "doc/1 to succeed", procs=[consumer])
        self.assertEqual((row["job_id"], row["service"], row["priority"], row["type"],
                          row["tenant"], row["attempts"], row["stream_seq"]),
                         ("doc/1", "work", "normal", "t", "acme", 1, seqs[0]))
        self.assertRegex(row["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")
        self.assertIsNotNone(row["finished_at"])
        row = wait_for(lambda: finished("doc-2"), 30, "doc-2 to succeed", procs=[consumer])
        self.assertEqual((row["service"], row["priority"], row["attempts"]), ("flaky", "high", 2))

        st, _, out = srv.request("GET", "/jobs/unknown-id")
        self.assertEqual(st, 404, out)
        self.assertEqual(out["job_id"], "unknown-id")
        st, _, out = srv.request("GET", "/jobs/doc-2", token=None)
        self.assertEqual(st, 401, out)

        # The ledger going away is a 503, and its return is noticed.
        self.pg.stop("fast")
        st, _, out = srv.request("GET", "/jobs/doc-2")
        self.assertEqual(st, 503, out)
        self.assertIn("ledger", out["error"])
        self.pg.restart("fast")
        st, _, row = srv.request("GET", "/jobs/doc-2")
        self.assertEqual((st, row["status"]), (200, "succeeded"))

    def test_unreachable_ledger_is_503(self):
        dead = "host=127.0.0.1 port=%d user=postgres dbname=x connect_timeout=2" % free_port()
        srv = self.start_intake(extra="[postgres]\ndsn = %s\n" % dead)
        st, _, out = srv.request("GET", "/jobs/any")
        self.assertEqual(st, 503, out)
        self.assertTrue(out["error"].startswith("ledger unreachable"), out)


if __name__ == "__main__":
    unittest.main()
