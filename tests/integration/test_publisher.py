"""jetfleet-publisher against a real nats-server -js: what it prints, what it
stores, the streams it creates or refuses.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_publisher
"""

import json
import os
import time
import unittest
from datetime import datetime, timezone

from jfharness import (RFC3339_RE, UUID4_RE, JetfleetTestCase, free_port, hval, publisher_json,
                       wait_for)


def parse_ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))


class TestPublisher(JetfleetTestCase):

    def publish(self, *args, input=None, check=0, env=None):
        cfg = self.config()
        cp = self.progs.run_publisher(["--config", cfg, "publish"] + list(args), input=input,
                                      check=check, env=env)
        return cp

    def test_publish_prints_json_and_stores_envelope(self):
        before = datetime.now(timezone.utc)
        out = publisher_json(self.publish("--service", "work", "--type", "t", "--id", "job-1",
                                          '{"a":1,"b":[true,null]}'))
        self.assertEqual(out, {"id": "job-1", "stream": "JOBS", "seq": 1, "duplicate": False})
        m = self.nc.stream_msg_get("JOBS", 1)
        self.assertEqual(m["subject"], "jobs.work.normal.t")
        self.assertEqual(hval(m["headers"], "Nats-Msg-Id"), "job-1")
        env = json.loads(m["data"])
        self.assertEqual((env["id"], env["service"], env["type"]), ("job-1", "work", "t"))
        self.assertIn(env.get("priority", "normal"), ("normal",))
        self.assertEqual(env["payload"], {"a": 1, "b": [True, None]})
        self.assertRegex(env["created_at"], RFC3339_RE)
        created = parse_ts(env["created_at"])
        self.assertLess(abs((created - before).total_seconds()), 120, env["created_at"])
        self.assertNotIn("deadline", env)

        out = publisher_json(self.publish("--service", "work", "--type", "t"))
        self.assertEqual(out["seq"], 2)
        self.assertEqual(json.loads(self.nc.stream_msg_get("JOBS", 2)["data"])["payload"], {},
                         "payload defaults to {}")

    def test_generated_id_is_uuid(self):
        a = publisher_json(self.publish("--service", "work", "--type", "t"))
        b = publisher_json(self.publish("--service", "work", "--type", "t"))
        for out in (a, b):
            self.assertRegex(out["id"], UUID4_RE)
            self.assertFalse(out["duplicate"])
        self.assertNotEqual(a["id"], b["id"])
        m = self.nc.stream_msg_get("JOBS", a["seq"])
        self.assertEqual(json.loads(m["data"])["id"], a["id"])
        self.assertEqual(hval(m["headers"], "Nats-Msg-Id"), a["id"])

    def test_priority_tenant_deadline(self):
        now = datetime.now(timezone.utc)
        out = publisher_json(self.publish("--service", "llm", "--type", "enrich", "--priority",
                                          "high", "--tenant", "acme", "--deadline", "10m",
                                          "--id", "p-1", '{"tender_id":8145}'))
        m = self.nc.stream_msg_get("JOBS", out["seq"])
        self.assertEqual(m["subject"], "jobs.llm.high.enrich")
        env = json.loads(m["data"])
        self.assertEqual(env.get("priority"), "high")
        self.assertEqual(env["tenant"], "acme")
        self.assertRegex(env["deadline"], RFC3339_RE)
        ahead = (parse_ts(env["deadline"]) - now).total_seconds()
        self.assertTrue(480 <= ahead <= 720, "deadline 10m from now is %.0fs ahead" % ahead)

        out = publisher_json(self.publish("--service", "llm", "--type", "enrich", "--deadline",
                                          "2030-01-02T03:04:05+02:00", "--id", "p-2"))
        env = json.loads(self.nc.stream_msg_get("JOBS", out["seq"])["data"])
        self.assertEqual(parse_ts(env["deadline"]),
                         parse_ts("2030-01-02T03:04:05+02:00"))

    def test_payload_from_stdin(self):
        out = publisher_json(self.publish("--service", "work", "--type", "t", "--id", "s-1", "-",
                                          input='{"from":"stdin","n":[1,2,3]}\n'))
        env = json.loads(self.nc.stream_msg_get("JOBS", out["seq"])["data"])
        self.assertEqual(env["payload"], {"from": "stdin", "n": [1, 2, 3]})

    def test_invalid_publish_refused(self):
        for args in (["--service", "work", "--type", "t", "{not json"],
                     ["--service", "work", "--type", "t", "--priority", "urgent"],
                     ["--service", "bad.service", "--type", "t"],
                     ["--service", "work", "--type", "t", "--id", "x" * 201],
                     ["--service", "work", "--type", "t", "--deadline", "tomorrow"],
                     ["--type", "t"]):
            with self.subTest(args=args):
                cp = self.publish(*args, check=None)
                self.assertEqual(cp.returncode, 2, cp.stderr.decode(errors="replace"))
                self.assertTrue(cp.stderr.strip(), "no message on stderr")
                self.assertEqual(cp.stdout.strip(), b"")
        if self.nc.stream_exists("JOBS"):
            self.assertEqual(self.nc.stream_info("JOBS")["state"]["messages"], 0)

    def test_batch_summary_and_invalid_line(self):
        lines = [
            b'{"id":"b-1","service":"work","type":"t","payload":{"n":1}}',
            b"",
            b'{ "id" : "b-2", "service":"work", "priority":"high", "type":"t", "payload":[1, 2] }',
            b'{"id":"b-3","type":"t","payload":{}}',
            b'{"id":"b-4","service":"mail","type":"send","priority":"low","payload":"x\\u00e9"}',
            b"   ",
            b'{"id":"b-5","service":"work","type":"t","payload":{},"tenant":"t\xc3\xa9"}',
        ]
        path = os.path.join(self.tmp, "batch.ndjson")
        with open(path, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        cp = self.progs.run_publisher(["--config", self.config(), "batch", path])
        summary = publisher_json(cp)
        err = cp.stderr.decode(errors="replace")
        self.assertEqual(cp.returncode, 1, err)
        self.assertEqual({k: summary[k] for k in ("published", "duplicates", "invalid", "failed")},
                         {"published": 4, "duplicates": 0, "invalid": 1, "failed": 0})
        self.assertIsInstance(summary["seconds"], (int, float))
        self.assertIn("line 4:", err)
        self.assertIn("invalid envelope", err)
        self.assertNotIn("line 2:", err)
        self.assertNotIn("line 6:", err)

        stored = self.nc.stream_messages("JOBS")
        want = [(lines[0], "jobs.work.normal.t", "b-1"), (lines[2], "jobs.work.high.t", "b-2"),
                (lines[4], "jobs.mail.low.send", "b-4"), (lines[6], "jobs.work.normal.t", "b-5")]
        self.assertEqual([(m["data"], m["subject"], hval(m["headers"], "Nats-Msg-Id"))
                          for m in stored], want, "batch lines are published verbatim")

    def test_batch_from_stdin(self):
        body = "".join(json.dumps({"id": "in-%d" % i, "service": "work", "type": "t",
                                   "payload": {"i": i}}) + "\n" for i in range(250))
        cp = self.progs.run_publisher(["--config", self.config(), "batch", "-"], input=body)
        summary = publisher_json(cp)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual((summary["published"], summary["invalid"], summary["failed"]),
                         (250, 0, 0))
        self.assertEqual(self.nc.stream_info("JOBS")["state"]["messages"], 250)

    def test_streams_created_on_first_publish(self):
        self.assertEqual(self.nc.stream_names(), [])
        self.publish("--service", "work", "--type", "t")
        jobs = self.nc.stream_info("JOBS")["config"]
        self.assertEqual(jobs["subjects"], ["jobs.>"])
        self.assertEqual(jobs["retention"], "limits")
        self.assertEqual(jobs["storage"], "file")
        self.assertGreater(jobs.get("duplicate_window", 0), 0)
        self.assertGreater(jobs.get("max_age", 0), 0)
        dlq = self.nc.stream_info("JOBS_DLQ")["config"]
        self.assertEqual(dlq["subjects"], ["dlq.>"])
        self.assertEqual(dlq["retention"], "limits")
        self.assertEqual(dlq["storage"], "file")
        # A second run verifies what it finds and changes nothing.
        self.publish("--service", "work", "--type", "t")
        self.assertEqual(self.nc.stream_info("JOBS")["config"], jobs)

    def test_no_provision_against_empty_server(self):
        cp = self.progs.run_publisher(["--config", self.config(), "--no-provision", "publish",
                                       "--service", "work", "--type", "t"])
        err = cp.stderr.decode(errors="replace")
        self.assertEqual(cp.returncode, 1, err)
        self.assertIn("JOBS", err)
        self.assertEqual(cp.stdout.strip(), b"")
        self.assertEqual(self.nc.stream_names(), [], "--no-provision created a stream")

    def test_workqueue_stream_refused(self):
        self.nc.add_stream({"name": "JOBS", "subjects": ["jobs.>"], "retention": "workqueue",
                            "storage": "file"})
        cp = self.progs.run_publisher(["--config", self.config(), "publish", "--service", "work",
                                       "--type", "t"])
        err = cp.stderr.decode(errors="replace")
        self.assertNotEqual(cp.returncode, 0, err)
        self.assertIn("JOBS", err)
        self.assertIn("retention", err.lower())
        info = self.nc.stream_info("JOBS")
        self.assertEqual(info["config"]["retention"], "workqueue", "the stream was changed")
        self.assertEqual(info["state"]["messages"], 0, "a job went into a workqueue stream")

    def test_server_unreachable(self):
        dead = "nats://127.0.0.1:%d" % free_port()
        cfg = self.config(extra="")
        t0 = time.monotonic()
        cp = self.progs.run_publisher(["--config", cfg, "publish", "--service", "work", "--type",
                                       "t"], env={"JETFLEET_NATS_URL": dead,
                                                  "JETFLEET_NATS_CONNECT_TIMEOUT": "1s"},
                                      timeout=60)
        err = cp.stderr.decode(errors="replace")
        self.assertEqual(cp.returncode, 1, err)
        self.assertTrue(err.strip())
        self.assertLess(time.monotonic() - t0, 30)

    def test_help_version_usage_errors(self):
        cp = self.progs.run_publisher(["--help"])
        self.assertEqual(cp.returncode, 0)
        out = (cp.stdout + cp.stderr).decode(errors="replace")
        self.assertIn("usage", out.lower())
        for word in ("publish", "batch", "--config", "--no-provision"):
            self.assertIn(word, out)
        cp = self.progs.run_publisher(["--version"])
        self.assertEqual(cp.returncode, 0)
        self.assertRegex((cp.stdout + cp.stderr).decode(), r"\d+\.\d+\.\d+")
        for args in (["frobnicate"], [], ["publish", "--type", "t", "--bogus"],
                     ["batch"]):
            with self.subTest(args=args):
                cp = self.progs.run_publisher(["--config", self.config()] + args)
                self.assertEqual(cp.returncode, 2, (cp.stdout, cp.stderr))
                self.assertTrue(cp.stderr.strip())


if __name__ == "__main__":
    unittest.main()
