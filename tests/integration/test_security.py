"""Security: NATS authentication, PostgreSQL least privilege, secrets kept out
of every output. Real servers on loopback, each test in its own temp dir.

- NATS authentication. For user/password, token, nkey (seed file), creds
  (operator mode: operator/account/user JWTs made here, memory resolver) and
  TLS with a CA and client certificates (`verify: true`), a nats-server that
  requires that mode and gives the account JetStream: jetfleet-publisher
  publishes and jetfleet-consumer works the job off with the right [nats]
  keys; with a wrong or missing credential each program exits non-zero at
  once with an error that names the problem (the consumer does not sit
  retrying in silence).
- PostgreSQL: deploy/postgres/roles.sql's roles. A consumer running as
  jetfleet_consumer (no DDL rights) against a database nobody migrated stops
  with "migrations must be applied by a role that may create tables"; once
  jetfleet_owner's consumer has applied them, jetfleet_consumer works jobs
  and writes the ledger, and is refused CREATE/ALTER/DROP/TRUNCATE/DELETE;
  jetfleet_reader is enough for `jetfleet-publisher status`.
- Secrets: the NATS password and token, a password in a NATS URL and in a
  service URL, the ledger's and a kind=postgres service's dsn passwords,
  three HTTP auth headers (auth_header, _env, _file) and the intake's bearer
  token go through the programs at debug level, with wrong passwords, a
  stopped NATS server, a PostgreSQL restart, a downstream answering 401 and
  one refusing connections; no byte of any stdout, stderr, --help output,
  /metrics, /healthz, /readyz, dead letter or ledger row holds any of them.
  Nor does any error about a malformed setting that holds one (bad dsn,
  bad URL, auth header without a colon, a mistyped key, a broken line).

Run from this directory:
JETFLEET_BIN=<build>/bin JETFLEET_SOURCE_DIR=<source> /usr/bin/python3 -m unittest -v test_security
"""

import json
import os
import re
import secrets
import subprocess
import time
import unittest
import urllib.error
import urllib.request

import natsauth
import test_deploy as deploy
from jfharness import (CONSUMER, PUBLISHER, SOURCE_DIR, free_port, log_msgs, make_config,
                       publisher_json, read_log_lines, wait_for, write_config)
from pgharness import PSQL, PostgresMixin

ROLES_SQL = os.path.join(SOURCE_DIR, "deploy", "postgres", "roles.sql")
PG_ROLES = ("jetfleet_owner", "jetfleet_consumer", "jetfleet_reader")
MIGRATE_HINT = "migrations must be applied by a role that may create tables"


def secret(prefix):
    """A value no program prints by chance: starts with a letter (nats-server
    reads a config value that starts with a digit as a number)."""
    return "%s%s" % (prefix, secrets.token_hex(10))


def http_get(port, path):
    """(status, body bytes) of GET http://127.0.0.1:<port><path>."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class NatsCase(deploy.ServersTestCase):
    """A nats-server per test from a config written here (auth section given
    by the test), JetStream on, monitoring for the checks (the monitor port
    needs no login)."""

    def tearDown(self):
        self.progs.cleanup()  # first, so that their logs are complete
        reports = self.progs.sanitizer_reports()
        super().tearDown()
        if reports:
            self.fail("sanitizer report in " + ", ".join("%s (%s)" % (n, m) for n, _, m in reports))

    def start_nats(self, auth, name="nats", port=None):
        port, mon = port or free_port(), free_port()
        conf = write_config(self.tmp, "\n".join([
            "host: 127.0.0.1", "port: %d" % port, "http_port: %d" % mon,
            'jetstream { store_dir: "%s" }' % os.path.join(self.tmp, "js-" + name), auth, ""]),
            name="%s.conf" % name)
        server = self.start_server(deploy.Server(name, conf, self.tmp, None, port, mon))
        wait_for(server.healthy, 30, "%s to be ready" % name, procs=[server.proc])
        return server

    def config(self, server, nats_keys=None, url=None, services=None, extra="", name=None):
        """A config file: [nats] url (server's, or url) and nats_keys; noop
        service `work` unless services are given."""
        text = make_config(url or server.url,
                           consumer={"pull_expires": "1s", "shutdown_grace": "5s"},
                           services=services or {"work": {"kind": "noop"}}, extra=extra)
        keys = dict({"connect_timeout": "3s"}, **(nats_keys or {}))
        text = text.replace("[nats]\n", "[nats]\n" + "".join(
            "%s = %s\n" % kv for kv in keys.items()), 1)
        return write_config(self.tmp, text, name=name or "jetfleet-%d.ini" % len(os.listdir(self.tmp)))

    def durables_drained(self, server, durables):
        """True when every durable exists with nothing pending or unacked."""
        found = {}
        j = server.monitor("/jsz?accounts=true&streams=true&consumers=true")
        for acc in j.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                for c in st.get("consumer_detail") or []:
                    found[c["name"]] = c
        return all(d in found and found[d]["num_pending"] == 0 and
                   found[d]["num_ack_pending"] == 0 for d in durables)


# ---------------------------------------------------------------------------
# 1. NATS authentication

class TestNatsAuthentication(NatsCase):

    def assert_fleet_works(self, server, cfg, env=None, job_id="job-1"):
        """The publisher publishes a job, a consumer works it off and stops
        cleanly having acknowledged exactly it."""
        out = publisher_json(self.progs.run_publisher(
            ["--config", cfg, "publish", "--service", "work", "--type", "t", "--id", job_id, "{}"],
            env=env, check=0))
        self.assertEqual((out["id"], out["stream"], out["duplicate"]), (job_id, "JOBS", False))
        consumer = self.progs.start_consumer(cfg, env=env, ready_timeout=30)
        wait_for(lambda: self.durables_drained(server, ["work-high", "work-normal", "work-low"]),
                 30, "the job to be worked off", interval=0.1, procs=[consumer])
        self.assertEqual(self.progs.stop(consumer), 0)
        stopped = log_msgs(consumer, "consumer stopped")
        self.assertEqual((stopped[-1]["acked"], stopped[-1]["dead"]), (1, 0), stopped)

    def assert_refused(self, cfg, expect, env=None, code=1):
        """Both programs stop at once, exit `code` and say `expect` (a
        regex) on stderr; the consumer also logs it as a JSON line."""
        cp = self.progs.run_publisher(
            ["--config", cfg, "publish", "--service", "work", "--type", "t", "{}"], env=env,
            timeout=30)
        self.assertEqual(cp.returncode, code, cp.stderr)
        self.assertRegex(cp.stderr.decode("utf-8", "replace"), expect)
        t0 = time.monotonic()
        cp = self.progs.run_consumer_once(["--config", cfg], env=env, timeout=30)
        took = time.monotonic() - t0
        err = cp.stderr.decode("utf-8", "replace")
        self.assertEqual(cp.returncode, code, err)
        self.assertRegex(err, expect)
        self.assertLess(took, 10, "the consumer took %.1fs to give up" % took)
        if code == 1:  # a daemon's failure is also in its JSON log
            lines = [json.loads(l) for l in err.splitlines() if l.startswith("{")]
            self.assertTrue(any(l.get("level") == "error" and
                                re.search(expect, l.get("error", "")) for l in lines), err)
        return err

    def test_user_and_password(self):
        password = secret("pw")
        server = self.start_nats('authorization { users: [ {user: jf, password: "%s"} ] }'
                                 % password)
        self.assert_fleet_works(server, self.config(server, {"user": "jf",
                                                             "password": password}))
        # The same from the environment, and from the URL's user info.
        self.assert_fleet_works(server, self.config(server),
                                env={"JETFLEET_NATS_USER": "jf",
                                     "JETFLEET_NATS_PASSWORD": password}, job_id="job-2")
        self.assert_fleet_works(server, self.config(
            server, url="nats://jf:%s@127.0.0.1:%d" % (password, server.port)), job_id="job-3")
        wrong = secret("wrong")
        for keys in ({"user": "jf", "password": wrong}, {"user": "nobody", "password": password},
                     {}):
            with self.subTest(keys=sorted(keys)):
                err = self.assert_refused(self.config(server, keys), "Authorization Violation")
                self.assertNotIn(wrong, err)
                self.assertNotIn(password, err)
        err = self.assert_refused(self.config(
            server, url="nats://jf:%s@127.0.0.1:%d" % (wrong, server.port)),
            "cannot connect to nats://127\\.0\\.0\\.1:%d: Authorization Violation" % server.port)
        self.assertNotIn(wrong, err)
        # A password without a user is a config mistake, said as such.
        self.assert_refused(self.config(server, {"password": password}),
                            r"\[nats\] password is set but \[nats\] user is not", code=2)

    def test_token(self):
        token = secret("tok")
        server = self.start_nats('authorization { token: "%s" }' % token)
        self.assert_fleet_works(server, self.config(server, {"token": token}))
        for keys in ({"token": secret("wrong")}, {}):
            with self.subTest(keys=sorted(keys)):
                self.assert_refused(self.config(server, keys), "Authorization Violation")

    def test_nkey_seed_file(self):
        user, stranger = natsauth.NKey(natsauth.PREFIX_USER), natsauth.NKey(natsauth.PREFIX_USER)
        server = self.start_nats("authorization { users: [ {nkey: %s} ] }" % user.public)
        seed = natsauth.write_secret(os.path.join(self.tmp, "user.nk"), user.seed + "\n")
        self.assert_fleet_works(server, self.config(server, {"nkey_seed": seed}))
        # The armoured form nsc writes works too.
        armoured = natsauth.write_secret(os.path.join(self.tmp, "user-armoured.nk"),
                                         "-----BEGIN USER NKEY SEED-----\n%s\n"
                                         "------END USER NKEY SEED------\n" % user.seed)
        self.progs.run_publisher(["--config", self.config(server, {"nkey_seed": armoured}),
                                  "publish", "--service", "work", "--type", "t", "{}"], check=0)

        other = natsauth.write_secret(os.path.join(self.tmp, "stranger.nk"), stranger.seed + "\n")
        for keys in ({"nkey_seed": other}, {}):
            with self.subTest(keys=sorted(keys)):
                self.assert_refused(self.config(server, keys), "Authorization Violation")
        missing = os.path.join(self.tmp, "missing.nk")
        self.assert_refused(self.config(server, {"nkey_seed": missing}),
                            r"\[nats\] nkey_seed: cannot open %s: No such file" % re.escape(missing),
                            code=2)
        # One character changed: the checksum catches it before any connect.
        broken = user.seed[:-3] + ("A" if user.seed[-3] != "A" else "B") + user.seed[-2:]
        path = natsauth.write_secret(os.path.join(self.tmp, "broken.nk"), broken + "\n")
        err = self.assert_refused(self.config(server, {"nkey_seed": path}),
                                  r"\[nats\] nkey_seed: the seed in .* fails its checksum", code=2)
        self.assertNotIn(broken, err, "a seed is a private key: never printed")

    def test_creds_in_operator_mode(self):
        op = natsauth.Operator()
        op.add_account("SYS", jetstream=False)
        op.add_account("JETFLEET")
        server = self.start_nats(op.server_config(system_account="SYS"))
        creds = natsauth.write_secret(os.path.join(self.tmp, "jf.creds"),
                                      op.user_creds("JETFLEET", "consumer"))
        self.assert_fleet_works(server, self.config(server, {"creds": creds}))

        # A user of an account this server's operator never signed; a user
        # JWT that expired a minute ago; one signed by a key that is not its
        # account's (forged); no credentials at all.
        stranger_op = natsauth.Operator("stranger")
        stranger_op.add_account("ELSEWHERE")
        bad = {
            "foreign": stranger_op.user_creds("ELSEWHERE", "x"),
            "expired": op.user_creds("JETFLEET", "old", expires=time.time() - 60),
            "forged": op.user_creds("JETFLEET", "forged",
                                    signer=natsauth.NKey(natsauth.PREFIX_ACCOUNT)),
        }
        for name, text in bad.items():
            with self.subTest(creds=name):
                path = natsauth.write_secret(os.path.join(self.tmp, "%s.creds" % name), text)
                self.assert_refused(self.config(server, {"creds": path}), "Authorization Violation")
        self.assert_refused(self.config(server), "Authorization Violation")
        missing = os.path.join(self.tmp, "missing.creds")
        self.assert_refused(self.config(server, {"creds": missing}),
                            r"\[nats\] creds: cannot read %s: No such file" % re.escape(missing),
                            code=2)
        self.assert_refused(self.config(server, {"creds": creds, "nkey_seed": creds}),
                            r"\[nats\] creds and nkey_seed cannot both be set", code=2)

    def test_tls_with_client_certificates(self):
        ca = natsauth.CertAuthority(os.path.join(self.tmp, "ca"))
        server_cert, server_key = ca.issue("nats-server", server=True)
        client_cert, client_key = ca.issue("jetfleet", client=True)
        other_ca = natsauth.CertAuthority(os.path.join(self.tmp, "other-ca"), "other-ca")
        intruder_cert, intruder_key = other_ca.issue("intruder", client=True)
        server = self.start_nats(
            'tls { cert_file: "%s", key_file: "%s", ca_file: "%s", verify: true, timeout: 3 }'
            % (server_cert, server_key, ca.cert))
        good = {"tls_ca": ca.cert, "tls_cert": client_cert, "tls_key": client_key}
        self.assert_fleet_works(server, self.config(server, good))
        self.assertEqual(server.monitor("/varz")["tls_verify"], True)

        no_client_cert = "requires a client certificate it trusts"
        cases = [
            ("a client certificate of another CA",
             dict(good, tls_cert=intruder_cert, tls_key=intruder_key), no_client_cert),
            ("no client certificate", {"tls_ca": ca.cert}, no_client_cert),
            ("the server's certificate not trusted", dict(good, tls_ca=other_ca.cert),
             "SSL handshake error: .*unable to get local issuer certificate"),
            ("no TLS settings at all", {},
             "SSL handshake error: .*unable to get local issuer certificate"),
        ]
        for what, keys, expect in cases:
            with self.subTest(what):
                # A write that fails after the handshake is retried until
                # connect_timeout: keep that short here.
                self.assert_refused(self.config(server, dict(keys, connect_timeout="1s")), expect)
        self.assert_refused(self.config(server, {"tls_ca": ca.cert, "tls_cert": client_cert}),
                            r"\[nats\] tls_cert is set but \[nats\] tls_key is not", code=2)


# ---------------------------------------------------------------------------
# 3. PostgreSQL least privilege (deploy/postgres/roles.sql)

class PgRoles:
    """deploy/postgres/roles.sql applied to a PostgresServer, the three
    roles given passwords that the server checks (scram-sha-256 for them
    over TCP; the harness' superuser keeps trust)."""

    def __init__(self, test, pg):
        self.test = test
        self.pg = pg
        self.passwords = {r: secret("pg") for r in PG_ROLES}

    def apply_roles_sql(self):
        cp = subprocess.run([PSQL, "-X", "-h", "127.0.0.1", "-p", str(self.pg.port), "-U",
                             "postgres", "-d", self.pg.dbname, "-v", "ON_ERROR_STOP=1",
                             "-f", ROLES_SQL], stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=60)
        self.test.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        return cp.stderr.decode(errors="replace")

    def require_passwords(self):
        for role, pw in self.passwords.items():
            self.pg.query("ALTER ROLE %s PASSWORD '%s'" % (role, pw))
        hba = os.path.join(self.pg.data_dir, "pg_hba.conf")
        with open(hba) as f:
            text = f.read()
        with open(hba, "w") as f:
            f.write("host all %s 127.0.0.1/32 scram-sha-256\n" % ",".join(PG_ROLES) + text)
        self.pg.query("SELECT pg_reload_conf()")
        wait_for(lambda: self.psql("jetfleet_reader", "SELECT 1", password="wrong").returncode != 0,
                 20, "PostgreSQL to ask the roles for their passwords")

    def dsn(self, role, password=None):
        return "host=127.0.0.1 port=%d dbname=%s user=%s password=%s" % (
            self.pg.port, self.pg.dbname, role,
            self.passwords[role] if password is None else password)

    def psql(self, role, sql, password=None):
        env = dict(os.environ, PGPASSWORD=self.passwords[role] if password is None else password)
        return subprocess.run([PSQL, "-X", "-q", "-h", "127.0.0.1", "-p", str(self.pg.port),
                               "-U", role, "-d", self.pg.dbname, "-v", "ON_ERROR_STOP=1",
                               "-c", sql], stdin=subprocess.DEVNULL, capture_output=True,
                              env=env, timeout=30)


class PgCase(PostgresMixin, NatsCase):
    """NatsCase with a PostgreSQL server per test (skipped without PostgreSQL)."""


class TestPostgresLeastPrivilege(PgCase):

    def test_consumer_role_without_ddl_rights(self):
        nats = self.start_nats("")
        roles = PgRoles(self, self.pg)
        notice = roles.apply_roles_sql()
        self.assertIn("jetfleet_jobs does not exist yet", notice)
        roles.require_passwords()
        services = {"work": {"kind": "noop"},
                    "flaky": {"kind": "noop", "fail_attempts": 5, "max_deliver": 1}}

        def cfg(role):
            return self.config(nats, services=services,
                               extra="[postgres]\ndsn = %s\n" % roles.dsn(role),
                               name="%s.ini" % role)

        # Nobody migrated yet: the everyday role may not, and says who must.
        cp = self.progs.run_consumer_once(["--config", cfg("jetfleet_consumer")])
        err = cp.stderr.decode("utf-8", "replace")
        self.assertEqual(cp.returncode, 1, err)
        self.assertIn(MIGRATE_HINT, err)
        self.assertIn("permission denied for schema public", err)
        self.assertIsNone(self.pg.scalar("SELECT to_regclass('jetfleet_migrations')::text"))

        # The owner's consumer applies them; the grants follow.
        owner = self.progs.start_consumer(cfg("jetfleet_owner"))
        self.assertEqual(self.progs.stop(owner), 0)
        owners = self.pg.query("SELECT tablename, tableowner FROM pg_tables "
                               "WHERE tablename LIKE 'jetfleet%' ORDER BY 1")
        self.assertEqual(owners, [["jetfleet_jobs", "jetfleet_owner"],
                                  ["jetfleet_migrations", "jetfleet_owner"]])
        self.assertNotIn("does not exist yet", roles.apply_roles_sql())

        # No DDL, no deleting history.
        for sql in ("CREATE TABLE jetfleet_x (x int)", "ALTER TABLE jetfleet_jobs ADD COLUMN x int",
                    "DROP TABLE jetfleet_jobs", "TRUNCATE jetfleet_jobs",
                    "DELETE FROM jetfleet_jobs", "CREATE INDEX ON jetfleet_jobs (tenant)",
                    "INSERT INTO jetfleet_migrations (version) VALUES ('999_fake')"):
            with self.subTest(sql=sql):
                cp = roles.psql("jetfleet_consumer", sql)
                self.assertNotEqual(cp.returncode, 0, sql)
                self.assertRegex(cp.stderr.decode(), r"permission denied|must be owner")

        # The everyday role works jobs off and writes their rows (twice: a
        # start on a current schema takes nothing it may not take).
        consumer = self.progs.start_consumer(cfg("jetfleet_consumer"))
        lines = "".join(json.dumps({"id": "w-%d" % i, "service": "work", "type": "t",
                                    "payload": {}}) + "\n" for i in range(10))
        lines += json.dumps({"id": "f-1", "service": "flaky", "type": "t", "payload": {}}) + "\n"
        path = os.path.join(self.tmp, "jobs.ndjson")
        with open(path, "w") as f:
            f.write(lines)
        self.progs.run_publisher(["--config", cfg("jetfleet_consumer"), "batch", path], check=0)
        durables = ["%s-%s" % (s, p) for s in services for p in ("high", "normal", "low")]
        wait_for(lambda: self.durables_drained(nats, durables), 60, "the jobs to be worked off",
                 interval=0.2, procs=[consumer])
        self.assertEqual(self.progs.stop(consumer), 0)
        self.assertEqual(self.pg.query("SELECT status, count(*) FROM jetfleet_jobs "
                                       "GROUP BY 1 ORDER BY 1"),
                         [["dead", "1"], ["succeeded", "10"]])
        again = self.progs.start_consumer(cfg("jetfleet_consumer"))
        self.assertEqual(self.progs.stop(again), 0)

        # jetfleet_reader is enough for status.
        cp = self.progs.run_publisher(["--config", cfg("jetfleet_reader"), "status", "--json",
                                       "--interval", "0"], check=0)
        self.assertIn("succeeded", cp.stdout.decode())
        cp = self.progs.run_publisher(["--config", cfg("jetfleet_reader"), "status", "w-3"],
                                      check=0)
        self.assertEqual(json.loads(cp.stdout)["status"], "succeeded")


# ---------------------------------------------------------------------------
# 4. No secret in any output

class TestSecretsNeverAppear(PgCase):

    def setUp(self):
        super().setUp()
        self.outputs = []  # (what, bytes)

    def keep(self, what, data):
        self.outputs.append((what, data if isinstance(data, bytes) else data.encode()))
        return data

    def run_pub(self, args, env=None, check=None):
        cp = self.progs.run_publisher(args, env=env, check=check, timeout=60)
        self.keep("publisher %s" % " ".join(args[2:4]), cp.stdout + cp.stderr)
        return cp

    def assert_no_secret(self, values):
        self.assertTrue(self.outputs)
        for name, path in self.progs.logs:  # the consumers' and intake's whole output
            if name.startswith(("consumer", "intake")):
                with open(path, "rb") as f:
                    self.keep(name, f.read())
        for what, data in self.outputs:
            for label, value in values.items():
                self.assertNotIn(value.encode(), data, "%s shows %s" % (what, label))

    def test_no_secret_in_logs_help_metrics_or_errors(self):
        s = {"nats password": secret("natspw"), "wrong nats password": secret("natsbad"),
             "url password": secret("urlpw"), "auth_header": secret("hdr"),
             "auth_header_env": secret("envhdr"), "auth_header_file": secret("filehdr"),
             "intake token": secret("intake"), "wrong intake token": secret("badtok"),
             "wrong pg password": secret("pgbad"), "service url password": secret("svcpw"),
             "token in the environment": secret("envtok")}
        nats = self.start_nats('authorization { users: [ {user: jf, password: "%s"}, '
                               '{user: jfurl, password: "%s"} ] }'
                               % (s["nats password"], s["url password"]))
        roles = PgRoles(self, self.pg)
        roles.apply_roles_sql()
        roles.require_passwords()
        s["pg password"] = roles.passwords["jetfleet_owner"]
        self.mock = deploy.Mock(self.tmp)
        header_file = natsauth.write_secret(os.path.join(self.tmp, "auth-header"),
                                            "X-Api-Key: %s\n" % s["auth_header_file"])
        url = "http://127.0.0.1:%d/v1" % self.mock.port
        http = {"kind": "http", "url": url, "max_deliver": 2, "backoff": "100ms", "timeout": "5s"}
        services = {
            "api": dict(http, auth_header="Authorization: Bearer %s" % s["auth_header"]),
            "apienv": dict(http, auth_header_env="JF_TEST_AUTH"),
            "apifile": dict(http, auth_header_file=header_file),
            "db": {"kind": "postgres", "dsn": roles.dsn("jetfleet_owner"),
                   "sql": "SELECT $1::jsonb"},
            # User info in a service's URL (curl sends it as Basic auth), and
            # the same where nothing listens (its error is dead-lettered).
            "apiuser": dict(http, url="http://u:%s@127.0.0.1:%d/v1" % (
                s["service url password"], self.mock.port)),
            "apidown": dict(http, url="http://u:%s@127.0.0.1:%d/v1" % (
                s["service url password"], free_port()), max_deliver=1),
        }
        durables = ["%s-%s" % (n, p) for n in services for p in ("high", "normal", "low")]
        extra = ("[postgres]\ndsn = %s\n\n[log]\nlevel = debug\n\n[intake]\ntoken = %s\n"
                 % (roles.dsn("jetfleet_owner"), s["intake token"]))
        nats_keys = {"user": "jf", "password": s["nats password"], "reconnect_wait": "200ms"}
        cfg = self.config(nats, nats_keys, services=services, extra=extra)
        with open(cfg) as f:
            cfg_text = f.read()
        cfg = write_config(self.tmp, cfg_text.replace(
            "[consumer]\n", "[consumer]\nmetrics_listen = 127.0.0.1:0\n", 1), name="main.ini")
        env = {"JF_TEST_AUTH": "X-Api-Key: %s" % s["auth_header_env"]}

        # --help of every program and command, with every secret configured.
        for args in ([CONSUMER, "--config", cfg, "--help"], [PUBLISHER, "--config", cfg, "--help"],
                     [CONSUMER, "--version"], [PUBLISHER, "--version"]) + tuple(
                [PUBLISHER, "--config", cfg, c, "--help"]
                for c in ("publish", "batch", "replay", "dlq", "status", "serve")):
            cp = subprocess.run(args, capture_output=True, timeout=30, cwd=self.tmp,
                                env=dict(os.environ, JETFLEET_NATS_TOKEN=s["token in the environment"],
                                         **env))
            self.assertEqual(cp.returncode, 0, (args, cp.stderr))
            self.keep(" ".join(args[-2:]), cp.stdout + cp.stderr)

        consumer = self.progs.start_consumer(cfg, env=env)
        port = wait_for(lambda: [m["port"] for m in log_msgs(consumer, "metrics listening")], 10,
                        "the metrics port", procs=[consumer])[0]

        # Jobs to every service, one the API refuses with 401; published with
        # the keys, in a batch, and through a URL holding a password.
        jobs = [{"id": "j-%s" % n, "service": n, "type": "t", "payload": {}} for n in services]
        jobs.append({"id": "j-401", "service": "api", "type": "t",
                     "payload": {"mock": {"status": 401}}})
        path = os.path.join(self.tmp, "jobs.ndjson")
        with open(path, "w") as f:
            f.write("".join(json.dumps(j) + "\n" for j in jobs))
        self.run_pub(["--config", cfg, "batch", path], check=0)
        url_cfg = self.config(nats, url="nats://jfurl:%s@127.0.0.1:%d" % (
            s["url password"], nats.port), extra="[log]\nlevel = debug\n", name="url.ini")
        self.run_pub(["--config", url_cfg, "publish", "--service", "api", "--type", "t",
                      "--id", "j-url", "{}"], check=0)
        wait_for(lambda: self.durables_drained(nats, durables), 60, "the jobs to be worked off",
                 interval=0.2, procs=[consumer])
        for p in ("/metrics", "/healthz", "/readyz"):
            # /readyz turns 200 once every durable's pulls have had an answer.
            body = wait_for(lambda: http_get(port, p)[0] == 200 and http_get(port, p)[1], 20,
                            "%s to answer 200" % p, interval=0.2, procs=[consumer])
            self.keep(p, body)

        # NATS goes away (the consumer and a publisher see it) and comes back.
        nats.stop()
        wait_for(lambda: log_msgs(consumer, "nats disconnected"), 20, "the disconnect",
                 procs=[consumer])
        cp = self.run_pub(["--config", url_cfg, "publish", "--service", "api", "--type", "t", "{}"])
        self.assertEqual(cp.returncode, 1, cp.stderr)
        self.assertIn(b"cannot connect to nats://127.0.0.1:%d" % nats.port, cp.stderr)
        self.start_server(nats)
        wait_for(lambda: log_msgs(consumer, "nats reconnected"), 30, "the reconnect",
                 procs=[consumer])
        # So does PostgreSQL (the ledger and the db service reconnect).
        self.pg.restart("fast")
        self.run_pub(["--config", cfg, "publish", "--service", "db", "--type", "t",
                      "--id", "j-after", "{}"], check=0)
        wait_for(lambda: self.pg.scalar("SELECT status FROM jetfleet_jobs WHERE job_id = 'j-after'")
                 == "succeeded", 60, "a job after the restarts", interval=0.2, procs=[consumer])
        status, body = http_get(port, "/metrics")
        self.keep("/metrics after the restarts", body)

        # Wrong passwords, everywhere one is given.
        wrong_nats = self.config(nats, dict(nats_keys, password=s["wrong nats password"]),
                                 services=services, extra=extra, name="wrong-nats.ini")
        wrong_pg = write_config(self.tmp, cfg_text.replace(
            s["pg password"], s["wrong pg password"]), name="wrong-pg.ini")
        for c, what in ((wrong_nats, "Authorization Violation"),
                        (wrong_pg, "password authentication failed")):
            cp = self.progs.run_consumer_once(["--config", c, "--log-level", "debug"], env=env)
            self.assertEqual(cp.returncode, 1, cp.stderr)
            self.assertIn(what.encode(), cp.stderr)
            self.keep("consumer with %s" % os.path.basename(c), cp.stdout + cp.stderr)
            cp = self.run_pub(["--config", c, "--log-level", "debug", "status", "--interval", "0"])
            self.assertEqual(cp.returncode, 1, cp.stderr)
            self.assertIn(what.encode(), cp.stdout + cp.stderr)  # status: in its table
        cp = self.run_pub(["--config", cfg, "--log-level", "debug", "status", "--interval", "0"],
                          check=0)
        cp = self.run_pub(["--config", cfg, "status", "j-401"], check=0)
        self.assertEqual(json.loads(cp.stdout)["status"], "dead")

        # The intake: a wrong token, the right one, a ledger read.
        intake, iport = deploy.start_intake(self.progs, cfg, env)
        self.assertEqual(deploy.post_jobs(iport, [{"id": "h-1", "service": "api", "type": "t",
                                                   "payload": {}}], s["wrong intake token"])[0],
                         401)
        self.assertEqual(deploy.post_jobs(iport, [{"id": "h-2", "service": "api", "type": "t",
                                                   "payload": {}}], s["intake token"])[0], 202)
        req = urllib.request.Request("http://127.0.0.1:%d/jobs/j-401" % iport,
                                     headers={"Authorization": "Bearer " + s["intake token"]})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.keep("GET /jobs/j-401", r.read())
        status, body = http_get(iport, "/healthz")
        self.keep("intake /healthz", body)
        self.assertEqual(self.progs.stop(intake), 0)

        wait_for(lambda: self.durables_drained(nats, durables), 60, "the last jobs",
                 interval=0.2, procs=[consumer])
        self.assertEqual(self.progs.stop(consumer), 0)
        stopped = log_msgs(consumer, "consumer stopped")[-1]
        self.assertEqual(stopped["dead"], 2, stopped)

        # What the fleet stored: the dead letter, the ledger's rows.
        self.keep("ledger", json.dumps(self.pg.query(
            "SELECT row_to_json(j)::text FROM jetfleet_jobs j")))
        nc = self.client(nats.url, "jf", s["nats password"])
        letters = nc.all_dlq_messages()
        self.assertEqual(sorted(m["subject"] for m in letters),
                         ["dlq.api.normal.t", "dlq.apidown.normal.t"])
        for m in letters:
            self.keep("dead letter", json.dumps(m["headers"]).encode() + m["data"])
        dead = [l for l in read_log_lines(consumer) if l.get("msg") == "dead-lettered"]
        self.assertEqual(sorted((d["job_id"], d["reason"]) for d in dead),
                         [("j-401", "permanent"), ("j-apidown", "max_deliveries")])
        self.assertIn("HTTP 401", [d for d in dead if d["job_id"] == "j-401"][0]["error"])
        self.assertTrue(any(l.get("level") == "debug" for l in read_log_lines(consumer)),
                        "the consumer ran at debug level")
        self.assert_no_secret(s)

    def test_no_token_in_logs_or_errors(self):
        token, wrong = secret("natstok"), secret("natsbadtok")
        nats = self.start_nats('authorization { token: "%s" }' % token)
        cfg = self.config(nats, {"token": token, "reconnect_wait": "200ms"},
                          extra="[log]\nlevel = debug\n")
        consumer = self.progs.start_consumer(cfg)
        self.run_pub(["--config", cfg, "publish", "--service", "work", "--type", "t", "{}"],
                     check=0)
        nats.stop()
        wait_for(lambda: log_msgs(consumer, "nats disconnected"), 20, "the disconnect",
                 procs=[consumer])
        self.start_server(nats)
        wait_for(lambda: log_msgs(consumer, "nats reconnected"), 30, "the reconnect",
                 procs=[consumer])
        wait_for(lambda: self.durables_drained(nats, ["work-normal"]), 30, "the job",
                 procs=[consumer])
        self.assertEqual(self.progs.stop(consumer), 0)
        bad = self.config(nats, {"token": wrong}, extra="[log]\nlevel = debug\n")
        cp = self.progs.run_consumer_once(["--config", bad])
        self.assertEqual(cp.returncode, 1)
        self.keep("consumer with a wrong token", cp.stdout + cp.stderr)
        cp = self.run_pub(["--config", bad, "publish", "--service", "work", "--type", "t", "{}"])
        self.assertEqual(cp.returncode, 1)
        # The token in the URL (nats://TOKEN@host) instead.
        cp = self.run_pub(["--config", self.config(nats, url="nats://%s@127.0.0.1:%d" % (
            wrong, nats.port)), "publish", "--service", "work", "--type", "t", "{}"])
        self.assertEqual(cp.returncode, 1)
        self.assertIn(b"Authorization Violation", cp.stderr)
        self.assert_no_secret({"token": token, "wrong token": wrong})


class TestNoSecretInConfigErrors(NatsCase):
    """Mistakes around a secret: the programs concerned refuse them, naming
    the key or the problem, never quoting the value. A plain nats-server
    runs, except where the case is about reaching NATS (its address then
    refuses connections)."""

    def test_bad_settings_are_refused_without_their_secret(self):
        s = secret("leak")
        nats = self.start_nats("")
        dead = free_port()  # nothing listens there
        header_file = natsauth.write_secret(os.path.join(self.tmp, "header"), "%s\n" % s)
        consumer, publish = ["consumer"], ["publish"]
        status, serve = ["status", "--interval", "0"], ["serve", "--listen", "127.0.0.1:0"]
        http = "[service.api]\nkind = http\nurl = http://127.0.0.1:%d/\n" % dead
        # (what, config text added, environment, the programs that must refuse)
        cases = [
            ("dsn with an unknown keyword",
             "[postgres]\ndsn = host=127.0.0.1 port=%d password=%s bogus=1\n" % (dead, s), {},
             [consumer, status]),
            ("dsn URI with a bad port", "[postgres]\ndsn = postgresql://u:%s@127.0.0.1:x/db\n" % s,
             {}, [consumer, status]),
            ("dsn refused", "[postgres]\ndsn = host=127.0.0.1 port=%d user=u password=%s\n"
             % (dead, s), {}, [consumer, status]),
            ("dsn with an open quote", "[postgres]\ndsn = host=127.0.0.1 password='%s\n" % s, {},
             [consumer, status]),
            ("service url with user info and a bad port",
             "[service.api]\nkind = http\nurl = http://u:%s@127.0.0.1:x/\n" % s, {}, [consumer]),
            ("auth_header without a colon", http + "auth_header = %s\n" % s, {}, [consumer]),
            ("auth_header_file without a colon", http + "auth_header_file = %s\n" % header_file,
             {}, [consumer]),
            ("auth_header_env without a colon", http + "auth_header_env = JF_TEST_BAD_HEADER\n",
             {"JF_TEST_BAD_HEADER": "no colon " + s}, [consumer]),
            ("a password line without =", "[postgres]\npassword %s\n" % s, {},
             [consumer, publish]),
            ("a mistyped key", "[postgres]\npasword = %s\n" % s, {}, [consumer, publish]),
            ("a secret in an unknown section", "[secrets]\ntoken = %s\n" % s, {},
             [consumer, publish]),
            ("NATS url with a password, refused", "",
             {"JETFLEET_NATS_URL": "nats://jf:%s@127.0.0.1:%d" % (s, dead)},
             [consumer, publish, serve]),
            ("NATS url with a password, bad port", "",
             {"JETFLEET_NATS_URL": "nats://jf:%s@127.0.0.1:x" % s}, [consumer, publish, serve]),
            ("NATS password without user", "", {"JETFLEET_NATS_PASSWORD": s}, [consumer, publish]),
        ]
        for what, text, env, progs in cases:
            cfg = self.config(nats, {"connect_timeout": "300ms"}, extra=text, name="bad.ini")
            for prog in progs:
                if prog == consumer:
                    try:
                        cp = self.progs.run_consumer_once(["--config", cfg, "--log-level", "debug"],
                                                          env=env)
                    except subprocess.TimeoutExpired as e:
                        self.fail("%s: the consumer did not stop: %s" % (what, e.stderr))
                else:
                    args = prog if prog != publish else ["publish", "--service", "work",
                                                         "--type", "t", "{}"]
                    cp = self.progs.run_publisher(["--config", cfg, "--log-level", "debug"] + args,
                                                  env=env, timeout=30)
                with self.subTest(what, program=prog[0]):
                    self.assertIn(cp.returncode, (1, 2), cp.stderr)
                    self.assertTrue(cp.stderr.strip() or cp.stdout.strip())
                    self.assertNotIn(s.encode(), cp.stdout + cp.stderr)


if __name__ == "__main__":
    unittest.main()
