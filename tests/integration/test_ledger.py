"""kind = postgres and the PostgreSQL ledger, against a real nats-server -js
and a real PostgreSQL (pgharness): the envelope reaches the SQL function and
its answer is the job's result; SQLSTATE classes decide retry against
dead letter; statement_timeout; a database that is down at start or
restarts mid-run; the ledger's rows, results, migrations and the
"already succeeded: no second call" rule.

(kill -9 of consumers and a PostgreSQL restart with the ledger on, under
load, are in test_downstream.py.)

Run from this directory:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_ledger
"""

import json
import signal
import time
import unittest
from datetime import datetime, timedelta, timezone

import pgharness
from jfharness import (JetfleetTestCase, envelope, log_msgs, make_config, read_log_lines,
                       wait_for, write_config)

PRIORITIES = ("high", "normal", "low")


def durables_of(service):
    return tuple("%s-%s" % (service, p) for p in PRIORITIES)


def hval(headers, key):
    for k, v in headers.items():
        if k.lower() == key.lower():
            return v[0] if v else None
    return None


def sql_literal(s):
    return "'" + s.replace("'", "''") + "'"


# A function that raises `code` on the first `fail_first` calls of each job
# (payload.code, payload.fail_first; counted in a sequence per job, which a
# rollback does not undo) and then records the job in `done` once.
FLAKY_SQL = r"""
CREATE TABLE done (job_id text PRIMARY KEY, calls_before int NOT NULL);
CREATE FUNCTION flaky(j jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  n bigint := nextval(format('%I', 'calls_' || (j->>'id')));
  code text := j->'payload'->>'code';
BEGIN
  IF n <= coalesce((j->'payload'->>'fail_first')::int, 0) THEN
    IF code = 'sleep' THEN
      PERFORM pg_sleep(5);
    ELSE
      RAISE EXCEPTION 'flaky failure % of job %', n, j->>'id' USING ERRCODE = code;
    END IF;
  END IF;
  INSERT INTO done VALUES (j->>'id', n - 1) ON CONFLICT DO NOTHING;
  RETURN jsonb_build_object('job', j->>'id', 'calls', n);
END $$;
"""

# Permanent failures by payload.fail, one call counted per job as above.
JUDGE_SQL = r"""
CREATE TABLE uniq (x int PRIMARY KEY);
CREATE FUNCTION judge(j jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
  PERFORM nextval(format('%I', 'calls_' || (j->>'id')));
  CASE j->'payload'->>'fail'
    WHEN 'div' THEN RETURN to_jsonb(1 / 0);
    WHEN 'raise' THEN RAISE EXCEPTION 'tender % is not valid', j->>'id';
    WHEN 'unique' THEN INSERT INTO uniq VALUES (1); INSERT INTO uniq VALUES (1);
    WHEN 'cast' THEN RETURN to_jsonb('abc'::int);
    ELSE RETURN '{"ok": true}'::jsonb;
  END CASE;
  RETURN NULL;
END $$;
"""


class PostgresTestCase(pgharness.PostgresMixin, JetfleetTestCase):
    """A nats-server (JetfleetTestCase) and a PostgreSQL per test."""

    # --- config

    def db_service(self, sql, **keys):
        s = {"kind": "postgres", "dsn": self.pg.dsn(), "sql": sql, "timeout": "5s",
             "max_deliver": 5, "backoff": "100ms"}
        s.update(keys)
        return s

    def pg_config(self, services, ledger=False, max_in_flight=32, extra_postgres=None, **consumer):
        c = {"max_in_flight": max_in_flight, "stats_interval": "200ms"}
        c.update(consumer)
        extra = ""
        if ledger:
            keys = {"dsn": self.pg.dsn()}
            keys.update(extra_postgres or {})
            extra = "[postgres]\n" + "".join("%s = %s\n" % kv for kv in keys.items())
        return write_config(self.tmp, make_config(self.nats.url, consumer=c, services=services,
                                                  extra=extra))

    # --- jobs

    def publish_jobs(self, cfg, jobs, name="jobs.ndjson"):
        cp, summary = self.publish_batch(cfg, jobs, name=name)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual((summary["published"], summary["invalid"], summary["failed"]),
                         (len(jobs), 0, 0), summary)

    def make_counters(self, job_ids):
        self.pg.query("".join("CREATE SEQUENCE %s;" % self.counter(i) for i in job_ids))

    @staticmethod
    def counter(job_id):
        return '"calls_%s"' % job_id

    def calls(self, job_id):
        return int(self.pg.scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM %s"
                                  % self.counter(job_id)))

    # --- outcomes

    def dlq(self):
        """[(job id, reason, deliveries, error)] of the dead letters."""
        out = []
        for m in self.nc.all_dlq_messages():
            body = json.loads(m["data"].decode("utf-8"))
            h = m["headers"]
            out.append((body["id"], hval(h, "Jetfleet-Reason"), hval(h, "Jetfleet-Deliveries"),
                        hval(h, "Jetfleet-Error")))
        return sorted(out)

    def dlq_count(self):
        try:
            return self.nc.stream_info("JOBS_DLQ")["state"]["messages"]
        except Exception:
            return 0

    def stop_consumer(self, proc, timeout=60):
        rc = self.progs.stop(proc, signal.SIGTERM, timeout=timeout)
        self.assertEqual(rc, 0, "%s exit code after SIGTERM" % proc.jf_name)
        lines = read_log_lines(proc)
        self.assertEqual(lines[-1].get("msg"), "consumer stopped", lines[-1])
        return lines[-1]

    def ledger_row(self, job_id):
        rows = self.pg.query(
            "SELECT status, attempts, result, error, service, priority, type, tenant, "
            "finished_at IS NOT NULL, stream_seq FROM jetfleet_jobs WHERE job_id = %s"
            % sql_literal(job_id))
        if not rows:
            return None
        r = rows[0]
        return {"status": r[0], "attempts": int(r[1]),
                "result": None if r[2] is None else json.loads(r[2]), "error": r[3],
                "service": r[4], "priority": r[5], "type": r[6], "tenant": r[7],
                "finished": r[8] == "t", "stream_seq": None if r[9] is None else int(r[9])}


# ---------------------------------------------------------------------------
# kind = postgres (no ledger)

class TestPostgresHandler(PostgresTestCase):

    def test_function_gets_the_envelope_and_runs_once_per_job(self):
        self.pg.query(r"""
            CREATE TABLE enriched (job_id text PRIMARY KEY, n int, tenant text, prio text,
                                   calls int NOT NULL DEFAULT 1);
            CREATE FUNCTION enrich(j jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
            BEGIN
              INSERT INTO enriched (job_id, n, tenant, prio)
                VALUES (j->>'id', (j->'payload'->>'n')::int, j->>'tenant', j->>'priority')
                ON CONFLICT (job_id) DO UPDATE SET calls = enriched.calls + 1;
              RETURN jsonb_build_object('id', j->>'id', 'doubled', (j->'payload'->>'n')::int * 2);
            END $$;""")
        njobs = 200
        cfg = self.pg_config({"db": self.db_service("SELECT enrich($1::jsonb)")})
        proc = self.progs.start_consumer(cfg)
        jobs = [envelope("e-%d" % i, service="db", type_="enrich", priority=PRIORITIES[i % 3],
                         payload={"n": i, "text": "caf\u00e9 \u2603 'quoted' \"q\""},
                         tenant="t%d" % (i % 4))
                for i in range(njobs)]
        self.publish_jobs(cfg, jobs)
        self.wait_drained(durables_of("db"), 120, procs=[proc])

        rows = self.pg.query("SELECT job_id, n, tenant, prio, calls FROM enriched ORDER BY n")
        self.assertEqual(len(rows), njobs)
        for i, r in enumerate(rows):
            self.assertEqual(r, ["e-%d" % i, str(i), "t%d" % (i % 4), PRIORITIES[i % 3], "1"])
        self.assertEqual(self.dlq_count(), 0, self.dlq())
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("dead"), stopped.get("retried")),
                         (njobs, 0, 0), stopped)

    def test_permanent_sqlstates_dead_letter_after_one_call(self):
        self.pg.query(JUDGE_SQL)
        cases = {"div": "22012", "raise": "P0001", "unique": "23505", "cast": "22P02"}
        ids = ["perm-%s" % k for k in cases] + ["perm-ok"]
        self.make_counters(ids)
        cfg = self.pg_config({
            "judge": self.db_service("SELECT judge($1::jsonb)", max_deliver=5),
            "missing": self.db_service("SELECT no_such_function($1::jsonb)", max_deliver=5),
        })
        proc = self.progs.start_consumer(cfg)
        jobs = [envelope("perm-%s" % k, service="judge", payload={"fail": k}) for k in cases]
        jobs.append(envelope("perm-ok", service="judge", payload={}))
        jobs.append(envelope("perm-missing", service="missing", payload={}))
        self.publish_jobs(cfg, jobs)
        self.wait_drained(durables_of("judge") + durables_of("missing"), 60, procs=[proc])
        wait_for(lambda: self.dlq_count() >= len(cases) + 1, 30, "the dead letters",
                 procs=[proc])

        dead = {d[0]: d for d in self.dlq()}
        self.assertEqual(sorted(dead), sorted(["perm-%s" % k for k in cases] + ["perm-missing"]))
        for k, code in list(cases.items()) + [("missing", "42883")]:
            job_id, reason, deliveries, error = dead["perm-%s" % k]
            self.assertEqual((reason, deliveries), ("permanent", "1"), dead[job_id])
            self.assertIn("SQLSTATE %s" % code, error)
        self.assertIn("division by zero", dead["perm-div"][3])
        self.assertIn("tender perm-raise is not valid", dead["perm-raise"][3])
        for job_id in ids:
            self.assertEqual(self.calls(job_id), 1, "calls of %s" % job_id)
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("dead"), stopped.get("retried")),
                         (1, len(cases) + 1, 0), stopped)

    def test_retryable_sqlstates_are_retried_until_success(self):
        self.pg.query(FLAKY_SQL)
        # serialization, deadlock, lock not available, too many connections,
        # admin shutdown, I/O error, connection failure
        codes = ["40001", "40P01", "55P03", "53300", "57P01", "58030", "08006"]
        ids = ["retry-%s" % c for c in codes]
        self.make_counters(ids)
        # The breaker would trip on 14 failures out of 21 calls and only
        # slow the test down; it has tests of its own.
        cfg = self.pg_config({"db": self.db_service("SELECT flaky($1::jsonb)", max_deliver=5,
                                                    breaker_min_calls=100,
                                                    breaker_window=100)})
        proc = self.progs.start_consumer(cfg)
        self.publish_jobs(cfg, [envelope("retry-%s" % c, service="db",
                                         payload={"code": c, "fail_first": 2}) for c in codes])
        self.wait_drained(durables_of("db"), 60, procs=[proc])

        self.assertEqual(self.dlq_count(), 0, self.dlq())
        self.assertEqual(sorted(r[0] for r in self.pg.query("SELECT job_id FROM done")),
                         sorted(ids))
        for job_id in ids:
            self.assertEqual(self.calls(job_id), 3, "calls of %s" % job_id)
        retries = log_msgs(proc, "job failed; retrying")
        self.assertEqual(len(retries), 2 * len(codes))
        for c in codes:
            errs = [l.get("error", "") for l in retries if l.get("job_id") == "retry-%s" % c]
            self.assertEqual(len(errs), 2, retries)
            self.assertTrue(all("SQLSTATE %s" % c in e for e in errs), errs)
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("dead"), stopped.get("retried")),
                         (len(codes), 0, 2 * len(codes)), stopped)

    def test_statement_timeout_is_the_service_timeout_and_retryable(self):
        self.pg.query(FLAKY_SQL)
        self.make_counters(["slow-1"])
        cfg = self.pg_config({"db": self.db_service("SELECT flaky($1::jsonb)", timeout="300ms")})
        proc = self.progs.start_consumer(cfg)
        t0 = time.monotonic()
        self.publish_jobs(cfg, [envelope("slow-1", service="db",
                                         payload={"code": "sleep", "fail_first": 1})])
        self.wait_drained(durables_of("db"), 30, procs=[proc])
        elapsed = time.monotonic() - t0

        self.assertEqual(self.calls("slow-1"), 2)
        self.assertLess(elapsed, 4.5, "the first call (pg_sleep(5)) was not cut at 300ms")
        retries = log_msgs(proc, "job failed; retrying")
        self.assertEqual(len(retries), 1, retries)
        self.assertIn("57014", retries[0].get("error", ""))
        self.assertIn("statement timeout", retries[0].get("error", ""))
        self.assertEqual(self.dlq_count(), 0, self.dlq())

    def test_retries_exhausted_dead_letter_after_max_deliver_calls(self):
        self.pg.query(FLAKY_SQL)
        self.make_counters(["poison-1"])
        cfg = self.pg_config({"db": self.db_service("SELECT flaky($1::jsonb)", max_deliver=3)})
        proc = self.progs.start_consumer(cfg)
        self.publish_jobs(cfg, [envelope("poison-1", service="db",
                                         payload={"code": "40001", "fail_first": 1000})])
        wait_for(lambda: self.dlq_count() >= 1, 60, "the dead letter", procs=[proc])
        self.wait_drained(durables_of("db"), 30, procs=[proc])

        [(job_id, reason, deliveries, error)] = self.dlq()
        self.assertEqual((job_id, reason, deliveries), ("poison-1", "max_deliveries", "3"))
        self.assertIn("SQLSTATE 40001", error)
        self.assertEqual(self.calls("poison-1"), 3)

    def test_database_restart_mid_run_loses_nothing(self):
        self.pg.query(r"""
            CREATE TABLE done (job_id text PRIMARY KEY, calls int NOT NULL DEFAULT 1);
            CREATE FUNCTION work(j jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
            BEGIN
              PERFORM pg_sleep(0.01);
              INSERT INTO done VALUES (j->>'id') ON CONFLICT (job_id)
                DO UPDATE SET calls = done.calls + 1;
              RETURN '{}'::jsonb;
            END $$;""")
        njobs = 400
        cfg = self.pg_config({"db": self.db_service("SELECT work($1::jsonb)", max_deliver=10,
                                                    backoff="200ms,500ms,1s",
                                                    max_connections=2)})
        proc = self.progs.start_consumer(cfg)
        self.publish_jobs(cfg, [envelope("r-%d" % i, service="db", priority=PRIORITIES[i % 3])
                                for i in range(njobs)])
        wait_for(lambda: int(self.pg.scalar("SELECT count(*) FROM done")) >= 60, 60,
                 "60 jobs done before the restart", procs=[proc])
        self.pg.restart("immediate", down_seconds=1.5)
        at_restart = int(self.pg.scalar("SELECT count(*) FROM done"))
        self.assertLess(at_restart, njobs - 50, "the run was nearly over at the restart")
        self.wait_drained(durables_of("db"), 120, procs=[proc])

        self.assertEqual(int(self.pg.scalar("SELECT count(*) FROM done")), njobs)
        self.assertEqual(self.dlq_count(), 0, self.dlq())
        lost = [l for l in read_log_lines(proc) if l.get("msg") == "postgres connection lost"]
        back = [l for l in read_log_lines(proc) if l.get("msg") == "postgres connection restored"]
        self.assertGreaterEqual(len(lost), 1, "the restart was not noticed")
        self.assertEqual(len(back), len(lost), "every lost connection comes back")
        self.assertIsNone(proc.poll(), "the consumer must ride out the restart")
        stopped = self.stop_consumer(proc)
        self.assertEqual(stopped.get("acked"), njobs, stopped)

    def test_database_down_at_start(self):
        self.pg.query("CREATE TABLE done (job_id text PRIMARY KEY)")
        self.pg.stop("fast")
        cfg = self.pg_config({"db": self.db_service(
            "INSERT INTO done VALUES ($1::jsonb->>'id') ON CONFLICT DO NOTHING RETURNING job_id",
            max_deliver=20, backoff="200ms")})
        # The consumer starts (other services must not wait for this one).
        proc = self.progs.start_consumer(cfg)
        self.publish_jobs(cfg, [envelope("d-%d" % i, service="db") for i in range(10)])
        wait_for(lambda: any("cannot connect to PostgreSQL" in l.get("error", "")
                             for l in log_msgs(proc, "job failed; retrying")),
                 30, "a retry for want of a connection", procs=[proc])
        self.pg.restart()
        self.wait_drained(durables_of("db"), 90, procs=[proc])
        self.assertEqual(int(self.pg.scalar("SELECT count(*) FROM done")), 10)
        self.assertEqual(self.dlq_count(), 0, self.dlq())

    def test_bad_dsn_is_a_config_error_without_the_secret(self):
        cfg = self.pg_config({"db": {"kind": "postgres", "sql": "SELECT $1::jsonb",
                                     "dsn": "host=127.0.0.1 password=hunter2 oops"}})
        cp = self.progs.run_consumer_once(["--config", cfg])
        err = cp.stderr.decode(errors="replace")
        self.assertEqual(cp.returncode, 2, err)
        self.assertIn("service db", err)
        self.assertIn("dsn", err)
        self.assertNotIn("hunter2", err)


# ---------------------------------------------------------------------------
# the ledger ([postgres] dsn)

class TestLedger(PostgresTestCase):

    def test_rows_and_results_for_every_outcome(self):
        self.pg.query(FLAKY_SQL + JUDGE_SQL)
        self.make_counters(["ok-1", "flaky-1", "perm-div"])
        services = {
            "obj": self.db_service("SELECT flaky($1::jsonb)", max_connections=1),
            "txt": self.db_service("SELECT 'hello ' || ($1::jsonb->>'id')", max_connections=1),
            "num": self.db_service("SELECT 42 + 0 * length($1::text)", max_connections=1),
            "js": self.db_service("SELECT json_build_array(1, $1::json->'payload')",
                                  max_connections=1),
            "none": self.db_service("SELECT 1 WHERE $1::jsonb IS NULL", max_connections=1),
            "judge": self.db_service("SELECT judge($1::jsonb)", max_connections=1),
            "work": {"kind": "noop"},
        }
        cfg = self.pg_config(services, ledger=True, max_in_flight=64)
        proc = self.progs.start_consumer(cfg)
        past = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        jobs = [
            envelope("ok-1", service="obj", priority="high", type_="enrich", tenant="acme",
                     payload={}),
            envelope("flaky-1", service="obj", payload={"code": "40001", "fail_first": 2}),
            envelope("txt-1", service="txt"),
            envelope("num-1", service="num"),
            envelope("js-1", service="js", payload={"a": [1, 2]}),
            envelope("none-1", service="none"),
            envelope("perm-div", service="judge", payload={"fail": "div"}),
            envelope("noop-1", service="work", priority="low"),
            envelope("late-1", service="work", deadline=past),
        ]
        self.publish_jobs(cfg, jobs)
        durables = sum((durables_of(s) for s in services), ())
        self.wait_drained(durables, 60, procs=[proc])
        wait_for(lambda: self.dlq_count() >= 2, 30, "two dead letters", procs=[proc])
        # Acked only after the row is committed: every row is final by now.
        rows = {j["id"]: self.ledger_row(j["id"]) for j in jobs}

        ok = rows["ok-1"]
        self.assertEqual((ok["status"], ok["attempts"], ok["error"], ok["finished"]),
                         ("succeeded", 1, None, True), ok)
        self.assertEqual(ok["result"], {"job": "ok-1", "calls": 1})
        self.assertEqual((ok["service"], ok["priority"], ok["type"], ok["tenant"]),
                         ("obj", "high", "enrich", "acme"))
        self.assertIsNotNone(ok["stream_seq"])
        self.assertEqual(self.pg.scalar("SELECT jsonb_typeof(result) FROM jetfleet_jobs "
                                        "WHERE job_id = 'ok-1'"), "object")

        flaky = rows["flaky-1"]
        self.assertEqual((flaky["status"], flaky["attempts"], flaky["error"]),
                         ("succeeded", 3, None), flaky)
        self.assertEqual(flaky["result"], {"job": "flaky-1", "calls": 3})
        self.assertEqual(self.calls("flaky-1"), 3)

        self.assertEqual(rows["txt-1"]["result"], "hello txt-1")
        self.assertEqual(rows["num-1"]["result"], "42")
        self.assertEqual(rows["js-1"]["result"], [1, {"a": [1, 2]}])
        self.assertEqual(self.pg.scalar("SELECT result IS NOT NULL AND jsonb_typeof(result) = "
                                        "'null' FROM jetfleet_jobs WHERE job_id = 'none-1'"), "t",
                         "no row: the result is JSON null")
        self.assertEqual(rows["noop-1"]["status"], "succeeded", rows["noop-1"])
        self.assertEqual(rows["noop-1"]["priority"], "low")

        dead = rows["perm-div"]
        self.assertEqual((dead["status"], dead["attempts"], dead["finished"]),
                         ("dead", 1, True), dead)
        self.assertIn("22012", dead["error"])
        self.assertIsNone(dead["result"])

        late = rows["late-1"]
        self.assertEqual((late["status"], late["attempts"]), ("dead", 0), late)
        self.assertEqual(int(self.pg.scalar("SELECT count(*) FROM jetfleet_jobs")), len(jobs))
        self.stop_consumer(proc)

    def test_already_succeeded_row_is_acked_without_a_call(self):
        self.pg.query(FLAKY_SQL)
        self.make_counters(["old-1", "new-1"])
        cfg = self.pg_config({"db": self.db_service("SELECT flaky($1::jsonb)")}, ledger=True)
        # A first consumer creates the table; a row then says old-1 is done
        # (as after a crash between the ledger's commit and the ack).
        proc = self.progs.start_consumer(cfg)
        self.stop_consumer(proc)
        self.pg.query("INSERT INTO jetfleet_jobs (job_id, service, type, status, attempts, result,"
                      " finished_at) VALUES ('old-1', 'db', 't', 'succeeded', 1, "
                      "'{\"kept\": true}', now())")
        before = self.pg.query("SELECT * FROM jetfleet_jobs WHERE job_id = 'old-1'")

        proc = self.progs.start_consumer(cfg)
        self.publish_jobs(cfg, [envelope("old-1", service="db"), envelope("new-1", service="db")])
        self.wait_drained(durables_of("db"), 60, procs=[proc])

        self.assertEqual(self.calls("old-1"), 0, "a succeeded job was run again")
        self.assertEqual(self.calls("new-1"), 1)
        self.assertEqual(self.pg.query("SELECT * FROM jetfleet_jobs WHERE job_id = 'old-1'"),
                         before, "a succeeded row changed")
        self.assertEqual(self.ledger_row("new-1")["status"], "succeeded")
        self.assertEqual(self.dlq_count(), 0, self.dlq())
        stopped = self.stop_consumer(proc)
        self.assertEqual((stopped.get("acked"), stopped.get("skipped")), (1, 1), stopped)

    def test_migrations_applied_once_by_consumers_starting_together(self):
        cfg = self.pg_config({"work": {"kind": "noop"}}, ledger=True)
        procs = [self.progs.start_consumer(cfg, name="c%d" % i, wait_ready=False)
                 for i in range(3)]
        for p in procs:
            wait_for(lambda p=p: log_msgs(p, "consumer ready"), 60, "%s ready" % p.jf_name,
                     procs=procs)
        applied = [l for p in procs for l in log_msgs(p, "ledger migration applied")]
        self.assertEqual([l.get("version") for l in applied],
                         ["001_jetfleet_jobs", "002_replays"])
        self.assertEqual(self.pg.query("SELECT version FROM jetfleet_migrations ORDER BY 1"),
                         [["001_jetfleet_jobs"], ["002_replays"]])
        indexes = sorted(r[0] for r in self.pg.query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'jetfleet_jobs'"))
        self.assertEqual(indexes, ["jetfleet_jobs_pkey", "jetfleet_jobs_service_status",
                                   "jetfleet_jobs_updated_at"])
        for p in procs:
            self.stop_consumer(p)
        # A restart finds everything in place and applies nothing.
        proc = self.progs.start_consumer(cfg, name="again")
        self.assertEqual(log_msgs(proc, "ledger migration applied"), [])
        self.assertEqual(int(self.pg.scalar("SELECT count(*) FROM jetfleet_migrations")), 2)
        self.stop_consumer(proc)

    def test_ledger_unreachable_at_start_is_an_error(self):
        self.pg.stop("fast")
        cfg = self.pg_config({"work": {"kind": "noop"}}, ledger=True)
        cp = self.progs.run_consumer_once(["--config", cfg], timeout=60)
        err = cp.stderr.decode(errors="replace")
        self.assertEqual(cp.returncode, 1, err)
        self.assertIn("ledger", err)
        self.assertIn("cannot connect", err)


if __name__ == "__main__":
    unittest.main()
