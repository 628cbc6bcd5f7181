"""deploy/: what an operator deploys, checked here as far as this machine can.

- deploy/jetfleet.ini and the Kubernetes ConfigMap's copy are accepted by the
  real programs (with the environment the containers get);
- deploy/nats/accounts.conf on a real nats-server: the publisher and consumer
  users run the normal flow (jobs, a dead letter, the limits' KV bucket)
  without a single permission violation, and cannot do what they must not
  (delete or purge a stream, publish outside their subjects, create or read
  any consumer but the consumer user's own durables, read a stream's
  messages directly); the durables accounts.conf names are exactly those of
  the services in deploy/jetfleet.ini and the Kubernetes ConfigMap;
- deploy/nats/cluster/n1..n3.conf run as they are (ports and data directories
  from the environment, as cluster.env sets them) as a three-node JetStream
  cluster; JOBS gets three replicas through jetfleet-publisher, a consumer
  works jobs off, and both keep going when the stream's leader stops;
- docker-compose.yml validates (`docker-compose config`, when installed) and
  is wired as documented; the Dockerfile's stages, packages and user; the
  Grafana dashboard and Prometheus config use the consumers' metric names and
  port; the systemd units pass `systemd-analyze verify` (when available); the
  Kubernetes manifests parse and agree with each other.

The Docker engine is not needed: nothing is built or started in a container.
YAML checks need PyYAML (Debian: python3-yaml) and are skipped without it.

Run from this directory: JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_deploy
"""

import configparser
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
import urllib.error
import urllib.request

from jfharness import (BIN_DIR, CONSUMER, NATS_SERVER, PUBLISHER, SOURCE_DIR, JetfleetTestCase,
                       NatsClient, NatsTimeout, Programs, free_port, log_msgs,
                       make_config, publisher_json, tail, wait_for, write_config)

try:
    import yaml
except ImportError:  # python3-yaml missing: the YAML checks say so and skip
    yaml = None

DEPLOY = os.path.join(SOURCE_DIR, "deploy")
MOCK = os.path.join(BIN_DIR, "jetfleet-mock")
NEEDS_YAML = "PyYAML is missing (Debian package python3-yaml)"

METRICS = ("jetfleet_jobs_total", "jetfleet_in_flight", "jetfleet_handler_duration_seconds",
           "jetfleet_breaker_state", "jetfleet_rate_limit_waits_total",
           "jetfleet_redeliveries_total", "jetfleet_dead_letters_total")


def deploy_path(*parts):
    return os.path.join(DEPLOY, *parts)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def duration_s(text):
    """Seconds of a jetfleet/compose/systemd duration such as 45s, 1m30s, 30."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+)(ms|s|m|h|d)", text):
        if m.start() != pos:
            break
        pos = m.end()
        total += int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if pos != len(text):
        raise ValueError("not a duration: %r" % text)
    return total


def ini_text_value(text, section, key):
    """A key's value in jetfleet INI text (inline '; comment' removed)."""
    cp = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None,
                                   comment_prefixes=(";", "#"))
    cp.read_string(text)
    return cp.get(section, key)


def shutdown_grace_s(ini_text):
    return duration_s(ini_text_value(ini_text, "consumer", "shutdown_grace"))


class AuthNatsClient(NatsClient):
    """jfharness' client logging in with a user and password."""

    def __init__(self, url, user, password, **kw):
        self._auth = {"user": user, "pass": password}
        try:
            super().__init__(url, name="test_deploy-%s" % user, **kw)
        except BaseException:
            if getattr(self, "sock", None) is not None:
                self.sock.close()  # a refused CONNECT leaves it open
            raise

    def _send(self, data):
        if data.startswith(b"CONNECT "):
            line, _, rest = data.partition(b"\r\n")
            opts = json.loads(line[len(b"CONNECT "):])
            opts.update(self._auth)
            data = b"CONNECT " + json.dumps(opts).encode() + b"\r\n" + rest
        super()._send(data)

    def violation_after(self, action):
        """Runs action(), then a round trip; returns the -ERR the server sent
        meanwhile (None when there was none)."""
        self.error = None
        try:
            action()
        except NatsTimeout:
            pass  # a refused request gets no reply
        self.flush()
        return self.error


class Mock:
    """jetfleet-mock on a free loopback port (it picks one: port 0)."""

    def __init__(self, tmpdir, args=()):
        self.out_path = os.path.join(tmpdir, "mock.out")
        out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([MOCK, "--listen", "127.0.0.1:0"] + list(args),
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT)
        out.close()
        self.proc.jf_name = "jetfleet-mock"
        m = wait_for(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", read(self.out_path)),
                     20, "jetfleet-mock to listen", procs=[self.proc])
        self.port = int(m.group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def http_get(port, path):
    """(status, body text) of GET http://127.0.0.1:<port><path>."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def start_intake(progs, config_path, env):
    """`jetfleet-publisher serve` on a free port, tracked by progs: (proc, port)."""
    out_path = os.path.join(progs.tmpdir, "intake.log")
    out = open(out_path, "wb")
    proc = subprocess.Popen([PUBLISHER, "--config", config_path, "serve",
                             "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=out, cwd=progs.tmpdir, env=dict(progs.env, **env))
    out.close()
    proc.jf_name = "intake"
    progs.procs.append(proc)
    progs.logs.append(("intake", out_path))
    m = wait_for(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", read(out_path)), 30,
                 "the intake to listen", procs=[proc])
    return proc, int(m.group(1))


def post_jobs(port, body, token=None):
    """(status, decoded answer or None) of POST /jobs."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request("http://127.0.0.1:%d/jobs" % port,
                                 data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


class Server:
    """A nats-server started from a config file, its output in a log file."""

    def __init__(self, name, conf, tmpdir, env=None, client_port=None, monitor_port=None):
        self.name = name
        self.conf = conf
        self.log_path = os.path.join(tmpdir, "%s.log" % name)
        self.env = dict(os.environ, **(env or {}))
        self.port = client_port
        self.mon_port = monitor_port
        self.proc = None

    @property
    def url(self):
        return "nats://127.0.0.1:%d" % self.port

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        self.proc.jf_name = "nats-server %s" % self.name
        return self

    def monitor(self, path):
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.mon_port, path),
                                    timeout=3) as r:
            return json.loads(r.read().decode("utf-8"))

    def healthy(self):
        try:
            return self.monitor("/healthz?js-enabled-only=true").get("status") == "ok"
        except (OSError, ValueError):
            return False

    def stop(self, timeout=15):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class ServersTestCase(unittest.TestCase):
    """A temp dir, servers and programs of one test; their logs are printed
    when the test fails (JETFLEET_IT_KEEP=1 keeps the dir)."""

    def setUp(self):
        for path in (CONSUMER, PUBLISHER, MOCK):
            if not os.access(path, os.X_OK):
                self.fail("%s is missing: build first (JETFLEET_BIN=%s)" % (path, BIN_DIR))
        self.tmp = tempfile.mkdtemp(prefix="jf-it-%s-" % self._testMethodName[:40])
        self.servers = []
        self.clients = []
        self.mock = None
        self.progs = Programs(self.tmp)

    def tearDown(self):
        failed = JetfleetTestCase._has_failed(self)
        try:
            self.progs.cleanup()
            for c in self.clients:
                c.close()
            if self.mock is not None:
                self.mock.stop()
            for s in self.servers:
                s.stop()
        finally:
            if failed or os.environ.get("JETFLEET_IT_VERBOSE"):
                out = ["", "=" * 70, "logs of %s (%s)" % (self.id(), self.tmp)]
                for name, path in self.progs.logs:
                    out += ["--- %s (last 40 lines)" % name, tail(path, 40)]
                for s in self.servers:
                    out += ["--- nats-server %s (last 30 lines)" % s.name, tail(s.log_path, 30)]
                sys.stderr.write("\n".join(out) + "\n")
            if failed or os.environ.get("JETFLEET_IT_KEEP"):
                sys.stderr.write("[%s] kept %s\n" % (self.id(), self.tmp))
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def start_server(self, server, timeout=30):
        self.servers.append(server.start())
        return server

    def client(self, url, user=None, password=None):
        c = AuthNatsClient(url, user, password) if user else NatsClient(url)
        self.clients.append(c)
        return c


# ---------------------------------------------------------------------------
# NATS users and permissions (deploy/nats/accounts.conf)

class TestNatsPermissions(ServersTestCase):
    """accounts.conf, included as it is by a server config written here (the
    compose file's nats-server.conf listens on 0.0.0.0 and stores in /data)."""

    def setUp(self):
        super().setUp()
        # nats-server parses a variable's value like a config value: a leading
        # digit would make it a (bad) number, so these start with a letter.
        self.passwords = {u: "pw-" + secrets.token_hex(12)
                          for u in ("publisher", "consumer", "admin")}
        port, mon = free_port(), free_port()
        rel = os.path.relpath(deploy_path("nats", "accounts.conf"), self.tmp)
        conf = write_config(self.tmp, "\n".join([
            "host: 127.0.0.1", "port: %d" % port, "http_port: %d" % mon,
            'jetstream { store_dir: "%s" }' % os.path.join(self.tmp, "js"),
            'include "%s"' % rel, ""]), name="server.conf")
        env = {"NATS_%s_PASSWORD" % u.upper(): p for u, p in self.passwords.items()}
        self.nats = self.start_server(Server("accounts", conf, self.tmp, env, port, mon))
        wait_for(self.nats.healthy, 30, "nats-server with accounts.conf to be ready",
                 procs=[self.nats.proc])
        self.admin = self.client(self.nats.url, "admin", self.passwords["admin"])

    def as_user(self, user):
        return {"JETFLEET_NATS_URL": self.nats.url, "JETFLEET_NATS_USER": user,
                "JETFLEET_NATS_PASSWORD": self.passwords[user]}

    def violations(self):
        return [l for l in read(self.nats.log_path).splitlines() if "Violation" in l]

    def provision_streams(self):
        cfg = write_config(self.tmp, make_config(self.nats.url))
        self.progs.run_publisher(["--config", cfg, "publish", "--service", "work", "--type", "t"],
                                 env=self.as_user("publisher"), check=0)
        self.assertTrue(self.admin.stream_exists("JOBS"))
        self.assertTrue(self.admin.stream_exists("JOBS_DLQ"))

    def test_publisher_and_consumer_users_run_the_whole_flow(self):
        self.mock = Mock(self.tmp)
        # An http service with fleet-wide limits (KV bucket), a noop one, a job
        # the API refuses (dead letter), so every permission the consumer needs
        # is used at least once.
        cfg = write_config(self.tmp, make_config(
            self.nats.url, consumer={"max_in_flight": 32},
            services={"llm": {"kind": "http", "url": "http://127.0.0.1:%d/x" % self.mock.port,
                              "rate": "100/s", "fleet_in_flight": 5, "max_deliver": 2,
                              "backoff": "100ms"},
                      "echo": {"kind": "noop"}}))
        # Streams created by the publisher user, jobs published one by one and in a batch.
        out = publisher_json(self.progs.run_publisher(
            ["--config", cfg, "publish", "--service", "llm", "--type", "enrich", "--id", "p-1",
             '{"tender_id":1}'], env=self.as_user("publisher"), check=0))
        self.assertEqual((out["stream"], out["seq"], out["duplicate"]), ("JOBS", 1, False))
        lines = [{"id": "b-%d" % i, "service": "echo", "priority": p, "type": "t", "payload": {}}
                 for i, p in enumerate(["high", "normal", "low"])]
        lines.append({"id": "refused", "service": "llm", "type": "enrich",
                      "payload": {"mock": {"status": 400}}})
        path = os.path.join(self.tmp, "jobs.ndjson")
        with open(path, "w") as f:
            f.write("".join(json.dumps(l) + "\n" for l in lines))
        summary = publisher_json(self.progs.run_publisher(
            ["--config", cfg, "batch", path], env=self.as_user("publisher"), check=0))
        self.assertEqual((summary["published"], summary["failed"]), (4, 0))

        # The intake logs in as the publisher too.
        intake, port = start_intake(self.progs, cfg, dict(self.as_user("publisher"),
                                                          JETFLEET_INTAKE_TOKEN="t0ken"))
        status, body = post_jobs(port, [{"id": "h-1", "service": "echo", "type": "t",
                                         "payload": {}}], "t0ken")
        self.assertEqual(status, 202, body)
        self.assertEqual(http_get(port, "/healthz")[0], 200)
        self.assertEqual(self.progs.stop(intake), 0)

        consumer = self.progs.start_consumer(cfg, env=self.as_user("consumer"))
        durables = ["%s-%s" % (s, p) for s in ("llm", "echo") for p in ("high", "normal", "low")]

        def drained():
            infos = [self.admin.consumer_info("JOBS", d) for d in durables]
            return all(i["num_pending"] == 0 and i["num_ack_pending"] == 0 for i in infos)
        wait_for(drained, 60, "the durables to drain", interval=0.2, procs=[consumer])
        dlq = self.admin.stream_messages("JOBS_DLQ")
        self.assertEqual([m["subject"] for m in dlq], ["dlq.llm.normal.enrich"])
        self.assertTrue(self.admin.stream_exists("KV_jetfleet_limits"),
                        "the consumer user created the limits bucket")
        self.assertEqual(self.progs.stop(consumer), 0)
        stopped = log_msgs(consumer, "consumer stopped")
        self.assertEqual((stopped[-1]["acked"], stopped[-1]["dead"]), (5, 1), stopped)
        self.assertEqual(self.violations(), [], "the normal flow needs a permission it lacks")

    def test_consumer_user_cannot_delete_purge_or_publish_jobs(self):
        self.provision_streams()
        c = self.client(self.nats.url, "consumer", self.passwords["consumer"])
        for subject in ("$JS.API.STREAM.DELETE.JOBS", "$JS.API.STREAM.DELETE.JOBS_DLQ",
                        "$JS.API.STREAM.PURGE.JOBS", "$JS.API.STREAM.UPDATE.JOBS",
                        "$JS.API.CONSUMER.DELETE.JOBS.work-normal"):
            with self.subTest(subject=subject):
                err = c.violation_after(lambda: c.request(subject, b"{}", timeout=1))
                self.assertIn('Permissions Violation for Publish to "%s"' % subject, err or "")
        err = c.violation_after(lambda: c.publish("jobs.work.normal.t", b"{}"))
        self.assertIn("Permissions Violation for Publish", err or "")
        # What it may do works on the same connection (the checks above can fail).
        self.assertEqual(c.js_api("STREAM.INFO.JOBS")["config"]["name"], "JOBS")
        self.assertTrue(self.admin.stream_exists("JOBS"), "JOBS survived")
        self.assertTrue(self.admin.stream_exists("JOBS_DLQ"), "JOBS_DLQ survived")
        self.assertEqual(self.admin.stream_info("JOBS")["state"]["messages"], 1)

    def test_publisher_user_publishes_jobs_and_nothing_else(self):
        self.provision_streams()
        p = self.client(self.nats.url, "publisher", self.passwords["publisher"])
        ack = p.js_publish("jobs.work.normal.t",
                           b'{"id":"x","service":"work","type":"t","payload":{}}',
                           headers={"Nats-Msg-Id": "x"})
        self.assertEqual(ack["stream"], "JOBS")
        for subject in ("dlq.work.normal.t", "orders.created", "$JS.ACK.JOBS.work-normal.1.1.1.1.0",
                        "$JS.API.STREAM.DELETE.JOBS", "$JS.API.STREAM.PURGE.JOBS",
                        "$JS.API.CONSUMER.DURABLE.CREATE.JOBS.spy"):
            with self.subTest(subject=subject):
                err = p.violation_after(lambda: p.publish(subject, b"{}"))
                self.assertIn('Permissions Violation for Publish to "%s"' % subject, err or "")
        err = p.violation_after(lambda: p.subscribe("jobs.>"))
        self.assertIn('Permissions Violation for Subscription to "jobs.>"', err or "")
        self.assertEqual(self.admin.stream_info("JOBS")["state"]["messages"], 2)
        self.assertEqual(self.admin.stream_info("JOBS_DLQ")["state"]["messages"], 0)

    def test_consumer_user_creates_no_other_consumer_and_reads_nothing_else(self):
        self.provision_streams()
        # A durable the admin made (an operator's, say): not the consumer's.
        self.admin.js_api("CONSUMER.DURABLE.CREATE.JOBS.audit", {
            "stream_name": "JOBS", "config": {"durable_name": "audit", "ack_policy": "explicit",
                                              "filter_subject": "jobs.>"}})
        c = self.client(self.nats.url, "consumer", self.passwords["consumer"])
        spy = json.dumps({"stream_name": "JOBS", "config": {
            "durable_name": "spy", "ack_policy": "explicit"}}).encode()
        for subject, body in (
                ("$JS.API.CONSUMER.DURABLE.CREATE.JOBS.spy", spy),      # a durable not in its config
                ("$JS.API.CONSUMER.CREATE.JOBS", b'{"stream_name":"JOBS","config":{}}'),  # ephemeral
                ("$JS.API.CONSUMER.CREATE.JOBS.spy", spy),              # the newer API's form
                ("$JS.API.CONSUMER.CREATE.JOBS.spy.jobs.>", spy),
                ("$JS.API.CONSUMER.DURABLE.CREATE.JOBS_DLQ.llm-normal", b"{}"),  # another stream
                ("$JS.API.CONSUMER.MSG.NEXT.JOBS.audit", b'{"batch":1}'),  # another's messages
                ("$JS.API.CONSUMER.INFO.JOBS.audit", b""),
                ("$JS.ACK.JOBS.audit.1.1.1.1.0", b"+ACK"),
                ("$JS.API.STREAM.MSG.GET.JOBS", b'{"seq":1}'),          # the stream's messages
                ("$JS.API.DIRECT.GET.JOBS", b'{"seq":1}'),
                ("$JS.API.STREAM.CREATE.OTHER", b'{"name":"OTHER","subjects":["other.>"]}'),
                ("$JS.API.STREAM.LIST", b""),
                ("orders.created", b"{}"), ("jobs.llm.normal.enrich", b"{}"),
                ("$KV.other_bucket.k", b"v"), ("$SYS.REQ.SERVER.PING", b"")):
            with self.subTest(subject=subject):
                err = c.violation_after(lambda: c.request(subject, body, timeout=1))
                self.assertIn('Permissions Violation for Publish to "%s"' % subject, err or "")
        for subject in ("jobs.>", ">", "dlq.>"):
            with self.subTest(subscribe=subject):
                err = c.violation_after(lambda: c.subscribe(subject))
                self.assertIn('Permissions Violation for Subscription to "%s"' % subject, err or "")
        names = self.admin.js_api("CONSUMER.NAMES.JOBS").get("consumers") or []
        self.assertEqual(sorted(names), ["audit"], "a consumer was created")
        self.assertEqual(self.admin.consumer_info("JOBS", "audit")["num_pending"], 1,
                         "the audit durable's job was taken")
        self.assertFalse(self.admin.stream_exists("OTHER"))
        # Its own durable it may create and pull from on the same connection.
        own = c.js_api("CONSUMER.DURABLE.CREATE.JOBS.llm-normal", {
            "stream_name": "JOBS", "config": {"durable_name": "llm-normal",
                                              "ack_policy": "explicit",
                                              "filter_subject": "jobs.llm.normal.>"}})
        self.assertEqual(own["name"], "llm-normal")

    def test_publisher_user_cannot_read_streams_or_create_consumers(self):
        self.provision_streams()
        self.admin.js_api("CONSUMER.DURABLE.CREATE.JOBS.work-normal", {
            "stream_name": "JOBS", "config": {"durable_name": "work-normal",
                                              "ack_policy": "explicit",
                                              "filter_subject": "jobs.work.normal.>"}})
        p = self.client(self.nats.url, "publisher", self.passwords["publisher"])
        for subject, body in (
                ("$JS.API.CONSUMER.CREATE.JOBS", b'{"stream_name":"JOBS","config":{}}'),
                ("$JS.API.CONSUMER.CREATE.JOBS.spy.jobs.>", b"{}"),
                ("$JS.API.CONSUMER.MSG.NEXT.JOBS.work-normal", b'{"batch":1}'),
                ("$JS.API.CONSUMER.INFO.JOBS.work-normal", b""),
                ("$JS.API.STREAM.MSG.GET.JOBS", b'{"seq":1}'),
                ("$JS.API.DIRECT.GET.JOBS", b'{"seq":1}'),
                ("$JS.API.DIRECT.GET.JOBS.jobs.work.normal.t", b""),
                ("$JS.API.STREAM.MSG.GET.JOBS_DLQ", b'{"seq":1}'),
                ("$JS.API.STREAM.CREATE.OTHER", b'{"name":"OTHER","subjects":["other.>"]}'),
                ("$JS.API.STREAM.LIST", b""), ("$JS.API.STREAM.NAMES", b""),
                ("$KV.jetfleet_limits.x", b"v")):
            with self.subTest(subject=subject):
                err = p.violation_after(lambda: p.request(subject, body, timeout=1))
                self.assertIn('Permissions Violation for Publish to "%s"' % subject, err or "")
        for subject in ("dlq.>", ">", "$JS.API.>"):
            with self.subTest(subscribe=subject):
                err = p.violation_after(lambda: p.subscribe(subject))
                self.assertIn('Permissions Violation for Subscription to "%s"' % subject, err or "")
        self.assertEqual(self.admin.consumer_info("JOBS", "work-normal")["num_pending"], 1)
        self.assertEqual(sorted(self.admin.js_api("CONSUMER.NAMES.JOBS").get("consumers") or []),
                         ["work-normal"])
        # Publishing jobs still works on the same connection.
        ack = p.js_publish("jobs.work.normal.t",
                           b'{"id":"y","service":"work","type":"t","payload":{}}',
                           headers={"Nats-Msg-Id": "y"})
        self.assertEqual((ack["stream"], ack["seq"]), ("JOBS", 2))

    def test_wrong_password_is_refused(self):
        cfg = write_config(self.tmp, make_config(self.nats.url))
        env = dict(self.as_user("publisher"), JETFLEET_NATS_PASSWORD="not-the-password")
        cp = self.progs.run_publisher(
            ["--config", cfg, "publish", "--service", "work", "--type", "t"], env=env)
        self.assertEqual(cp.returncode, 1, cp.stderr)
        self.assertIn(b"Authorization Violation", cp.stderr)
        self.assertNotIn(b"not-the-password", cp.stderr)
        with self.assertRaises(ConnectionError):
            AuthNatsClient(self.nats.url, "consumer", "not-the-password").close()


class TestNatsPermissionsMatchServices(unittest.TestCase):
    """The consumer user's durables are listed by name in accounts.conf:
    exactly the three of every service the deployed configs declare."""

    def test_durables_of_accounts_conf_are_the_configs_services(self):
        conf = read(deploy_path("nats", "accounts.conf"))
        allowed = {}
        for prefix in ("$JS.API.CONSUMER.INFO.JOBS.", "$JS.API.CONSUMER.DURABLE.CREATE.JOBS.",
                       "$JS.API.CONSUMER.MSG.NEXT.JOBS."):
            allowed[prefix] = set(re.findall(r'"%s([\w-]+)"' % re.escape(prefix), conf))
        allowed["ack"] = set(re.findall(r'"\$JS\.ACK\.JOBS\.([\w-]+)\.>"', conf))
        inis = [read(deploy_path("jetfleet.ini"))]
        if yaml is not None:
            cm = [d for d in load_yaml(deploy_path("k8s", "configmap.yaml"))
                  if d.get("kind") == "ConfigMap"]
            inis.append(cm[0]["data"]["jetfleet.ini"])
        for ini in inis:
            services = re.findall(r"(?m)^\s*\[service\.([\w-]+)\]", ini)
            self.assertTrue(services)
            want = {"%s-%s" % (s, p) for s in services for p in ("high", "normal", "low")}
            for what, names in allowed.items():
                self.assertEqual(names, want, what)


# ---------------------------------------------------------------------------
# The three-node cluster (deploy/nats/cluster)

class TestNatsCluster(ServersTestCase):
    """n1.conf, n2.conf, n3.conf as they are; the environment gives each node
    free loopback ports and its own data directory, as cluster.env does."""

    def start_cluster(self):
        nodes = {}
        ports = {}
        for n in (1, 2, 3):
            ports[n] = {"PORT": free_port(), "CLUSTER_PORT": free_port(),
                        "MONITOR_PORT": free_port()}
        routes = "[%s]" % ", ".join("nats-route://127.0.0.1:%d" % ports[n]["CLUSTER_PORT"]
                                   for n in (1, 2, 3))
        env = {"JF_NATS_ROUTES": routes}
        for n in (1, 2, 3):
            for k, v in ports[n].items():
                env["JF_NATS_N%d_%s" % (n, k)] = str(v)
            env["JF_NATS_N%d_STORE_DIR" % n] = os.path.join(self.tmp, "n%d" % n)
        for n in (1, 2, 3):
            nodes["n%d" % n] = self.start_server(Server(
                "n%d" % n, deploy_path("nats", "cluster", "n%d.conf" % n), self.tmp, env,
                ports[n]["PORT"], ports[n]["MONITOR_PORT"]))
        procs = [s.proc for s in nodes.values()]

        def formed():
            for s in nodes.values():
                if s.monitor("/routez").get("num_routes") != 2:
                    return False
                meta = s.monitor("/jsz").get("meta_cluster") or {}
                if not meta.get("leader") or meta.get("cluster_size") != 3:
                    return False
            return True
        wait_for(formed, 60, "three routed nodes with a JetStream meta leader", interval=0.2,
                 procs=procs)
        return nodes

    def test_jobs_replicated_three_times_survive_the_leader_stopping(self):
        nodes = self.start_cluster()
        for s in nodes.values():
            self.assertEqual(s.monitor("/varz")["cluster"]["name"], "jetfleet")
            self.assertEqual(s.monitor("/jsz")["meta_cluster"]["name"], "jetfleet")
        urls = ",".join(s.url for s in nodes.values())
        cfg = write_config(self.tmp, make_config(
            urls, services={"work": {"kind": "noop"}},
            extra="[stream]\nreplicas = 3\n"))

        summary = self.publish_n(cfg, "a", 20)
        self.assertEqual((summary["published"], summary["failed"]), (20, 0))
        nc = self.client(nodes["n1"].url)
        info = nc.stream_info("JOBS")
        self.assertEqual(info["config"]["num_replicas"], 3)
        self.assertEqual(nc.stream_info("JOBS_DLQ")["config"]["num_replicas"], 3)
        cluster = info["cluster"]
        self.assertIn(cluster["leader"], nodes)
        self.assertEqual(sorted([cluster["leader"]] + [r["name"] for r in cluster["replicas"]]),
                         ["n1", "n2", "n3"])
        wait_for(lambda: all(r.get("current")
                             for r in nc.stream_info("JOBS")["cluster"]["replicas"]),
                 30, "both JOBS followers to be current", interval=0.2)

        consumer = self.progs.start_consumer(cfg)
        self.wait_processed(nc, 20, consumer)
        ci = nc.consumer_info("JOBS", "work-normal")
        self.assertIn(ci["config"].get("num_replicas", 0), (0, 3), "0: the stream's replicas")
        self.assertEqual(len(ci["cluster"]["replicas"]), 2, "the durable is replicated too")

        # The stream's leader goes away: the other two elect a new one and
        # nothing stored is lost; publishing and consuming carry on.
        leader = cluster["leader"]
        nodes[leader].stop()
        survivor = next(s for n, s in nodes.items() if n != leader)
        nc2 = self.client(survivor.url)

        def new_leader():
            c = nc2.stream_info("JOBS").get("cluster") or {}
            return c.get("leader") not in (None, "", leader) and c["leader"]
        wait_for(new_leader, 60, "JOBS to elect a new leader", interval=0.3)
        self.assertEqual(nc2.stream_info("JOBS")["state"]["messages"], 20)
        summary = wait_for(lambda: self.try_publish(cfg, "b", 10), 60,
                           "a batch to publish after the leader stopped", interval=0.5)
        self.assertEqual(summary["published"], 10)
        self.wait_processed(nc2, 30, consumer)
        self.assertEqual(self.progs.stop(consumer), 0)
        self.assertEqual(log_msgs(consumer, "consumer stopped")[-1]["dead"], 0)

    def publish_n(self, cfg, prefix, n):
        path = os.path.join(self.tmp, "%s.ndjson" % prefix)
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": "%s-%d" % (prefix, i), "service": "work", "type": "t",
                                    "payload": {"n": i}}) + "\n")
        cp = self.progs.run_publisher(["--config", cfg, "batch", path], timeout=120)
        return publisher_json(cp) if cp.returncode == 0 else None

    def try_publish(self, cfg, prefix, n):
        s = self.publish_n(cfg, prefix, n)
        return s if s and s["failed"] == 0 else None

    def wait_processed(self, nc, total, consumer):
        def done():
            ci = nc.consumer_info("JOBS", "work-normal")
            return (ci["delivered"]["stream_seq"] >= total and ci["num_pending"] == 0
                    and ci["num_ack_pending"] == 0)
        wait_for(done, 90, "%d jobs to be worked off" % total, interval=0.3, procs=[consumer])


# ---------------------------------------------------------------------------
# The containers' config, run by the real programs

class TestContainerConfig(JetfleetTestCase):
    """deploy/jetfleet.ini (compose, the image) and the ConfigMap's copy, with
    the environment the containers set; only the hosts differ here. The
    consumer's metrics port answers what Prometheus, Grafana and the
    Kubernetes probes ask of it."""

    def run_with(self, ini_path, env):
        port = free_port()
        env = dict(env, JETFLEET_CONSUMER_METRICS_LISTEN="127.0.0.1:%d" % port)
        consumer = self.progs.start_consumer(ini_path, env=env)
        names = set(self.nc.consumer_names("JOBS"))
        self.assertEqual(names, {"%s-%s" % (s, p) for s in ("llm", "echo")
                                 for p in ("high", "normal", "low")})
        info = self.nc.consumer_info("JOBS", "llm-normal")
        self.assertEqual(info["config"]["max_ack_pending"], 20, "fleet_in_flight of [service.llm]")
        publisher_json(self.progs.run_publisher(
            ["--config", ini_path, "publish", "--service", "echo", "--type", "smoke"], env=env,
            check=0))
        self.wait_drained(["echo-normal"], 30, procs=[consumer])

        self.assertEqual(http_get(port, "/healthz")[0], 200)
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz to answer 200",
                 procs=[consumer])
        status, text = http_get(port, "/metrics")
        self.assertEqual(status, 200)
        exported = set(re.findall(r"^# TYPE (jetfleet_\w+) ", text, re.M))
        dash = read(deploy_path("grafana", "dashboards", "jetfleet.json"))
        used = set(re.findall(r"\b(jetfleet_[a-z_]+?)(?:_bucket|_sum|_count)?\b", dash))
        self.assertEqual(used - exported, set(), "the dashboard queries metrics nobody exports")
        self.assertRegex(text, r'(?m)^jetfleet_jobs_total\{service="echo",priority="normal",'
                               r'outcome="succeeded"\} 1$')

        self.assertEqual(self.progs.stop(consumer), 0)
        self.assertEqual(log_msgs(consumer, "consumer stopped")[-1]["acked"], 1)

    def test_compose_ini_is_accepted(self):
        env = {"JETFLEET_NATS_URL": self.nats.url, "JETFLEET_POSTGRES_DSN": ""}
        self.run_with(deploy_path("jetfleet.ini"), env)

    def test_compose_intake_takes_jobs(self):
        """The intake as the compose file runs it: serve --listen, the token
        from JETFLEET_INTAKE_TOKEN."""
        proc, port = start_intake(self.progs, deploy_path("jetfleet.ini"), {
            "JETFLEET_NATS_URL": self.nats.url, "JETFLEET_POSTGRES_DSN": "",
            "JETFLEET_INTAKE_TOKEN": "compose-token"})
        self.assertEqual(http_get(port, "/healthz")[0], 200)
        job = {"id": "via-intake", "service": "echo", "type": "smoke", "payload": {}}
        self.assertEqual(post_jobs(port, job)[0], 401)
        self.assertEqual(post_jobs(port, job, "wrong")[0], 401)
        status, body = post_jobs(port, job, "compose-token")
        self.assertEqual(status, 202, body)
        self.assertEqual(body["ids"], ["via-intake"])
        m = self.nc.stream_msg_get("JOBS", body["seqs"][0])
        self.assertEqual(m["subject"], "jobs.echo.normal.smoke")
        self.assertEqual(self.progs.stop(proc), 0)

    @unittest.skipIf(yaml is None, NEEDS_YAML)
    def test_configmap_ini_is_accepted(self):
        cm = load_yaml(deploy_path("k8s", "configmap.yaml"))[0]
        path = write_config(self.tmp, cm["data"]["jetfleet.ini"], name="configmap.ini")
        # One server here: the ConfigMap's replicas = 3 needs the cluster.
        env = {"JETFLEET_NATS_URL": self.nats.url, "JETFLEET_POSTGRES_DSN": "",
               "JETFLEET_STREAM_REPLICAS": "1", "LLM_AUTH_HEADER": "Authorization: Bearer x"}
        self.run_with(path, env)


# ---------------------------------------------------------------------------
# Files checked without servers

class TestNatsConfigFiles(unittest.TestCase):

    def test_server_conf_is_valid_and_needs_every_password(self):
        conf = deploy_path("nats", "nats-server.conf")
        env = dict(os.environ, NATS_PUBLISHER_PASSWORD="a", NATS_CONSUMER_PASSWORD="b",
                   NATS_ADMIN_PASSWORD="c")
        cp = subprocess.run([NATS_SERVER, "-c", conf, "-t"], capture_output=True, env=env,
                            timeout=30)
        self.assertEqual(cp.returncode, 0, cp.stderr)
        self.assertIn(b"is valid", cp.stdout + cp.stderr)
        del env["NATS_CONSUMER_PASSWORD"]
        cp = subprocess.run([NATS_SERVER, "-c", conf, "-t"], capture_output=True, env=env,
                            timeout=30)
        self.assertNotEqual(cp.returncode, 0, "a missing password must stop the server")
        self.assertIn(b"NATS_CONSUMER_PASSWORD", cp.stdout + cp.stderr)

    def test_cluster_nodes_differ_only_by_number_and_env_covers_them(self):
        texts = {n: read(deploy_path("nats", "cluster", "n%d.conf" % n)) for n in (1, 2, 3)}
        # Comments aside, only the node's number differs.
        norm = {n: re.sub(r"\bn%d\b|_N%d_" % (n, n), "X",
                          "\n".join(l for l in t.splitlines() if not l.lstrip().startswith("#")))
                for n, t in texts.items()}
        self.assertIn("server_name: X", norm[1])
        self.assertEqual(norm[1], norm[2])
        self.assertEqual(norm[1], norm[3])
        env_text = read(deploy_path("nats", "cluster", "cluster.env"))
        defined = set(re.findall(r"^([A-Z0-9_]+)=", env_text, re.M))
        used = set()
        for t in texts.values():
            used |= set(re.findall(r"\$([A-Z][A-Z0-9_]*)", t))
        self.assertTrue(used)
        self.assertEqual(used - defined, set(), "variables cluster.env does not set")
        stores = re.findall(r"^JF_NATS_N\d_STORE_DIR=(.+)$", env_text, re.M)
        self.assertEqual(len(set(stores)), 3, "each node needs its own store dir")


class TestComposeFile(unittest.TestCase):

    def setUp(self):
        self.path = deploy_path("docker-compose.yml")

    @unittest.skipIf(shutil.which("docker-compose") is None,
                     "docker-compose is not installed (Debian package docker-compose)")
    def test_docker_compose_config_validates(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
        cp = subprocess.run(["docker-compose", "-f", self.path, "config", "-q"],
                            capture_output=True, env=env, timeout=60)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        cp = subprocess.run(["docker-compose", "-f", self.path, "config", "--services"],
                            capture_output=True, env=env, timeout=60)
        self.assertEqual(cp.returncode, 0, cp.stderr.decode(errors="replace"))
        self.assertEqual(set(cp.stdout.decode().split()),
                         {"nats", "postgres", "mock", "consumer", "intake", "prometheus",
                          "grafana"})

    @unittest.skipIf(yaml is None, NEEDS_YAML)
    def test_services_are_wired_as_documented(self):
        doc = load_yaml(self.path)[0]
        svc = doc["services"]
        nats = svc["nats"]
        self.assertEqual(nats["image"], "nats:2.9")
        self.assertIn("./nats/nats-server.conf:/etc/nats/nats-server.conf:ro", nats["volumes"])
        self.assertEqual(nats["command"][-1], "/etc/nats/nats-server.conf")
        self.assertEqual(set(re.findall(r"\$([A-Z_]+PASSWORD)",
                                        read(deploy_path("nats", "accounts.conf")))),
                         set(nats["environment"]), "every password accounts.conf reads is set")
        self.assertEqual(svc["postgres"]["image"], "postgres:15")
        for name in ("mock", "consumer", "intake"):
            s = svc[name]
            self.assertEqual(s["image"], "jetfleet:local", name)
            self.assertEqual(s["build"]["dockerfile"], "deploy/Dockerfile", name)
        self.assertEqual(svc["mock"]["command"][0], "jetfleet-mock")
        self.assertEqual(svc["consumer"]["command"][0], "jetfleet-consumer")
        self.assertEqual(svc["intake"]["command"][-3:], ["serve", "--listen", "0.0.0.0:8080"])
        # --scale consumer=N needs no fixed name and no host port.
        consumer = svc["consumer"]
        self.assertNotIn("container_name", consumer)
        self.assertNotIn("ports", consumer)
        # Bind mounts exist (relative to deploy/).
        for name, s in svc.items():
            for v in s.get("volumes", []):
                src = v.split(":")[0]
                if src.startswith("."):
                    self.assertTrue(os.path.exists(os.path.join(DEPLOY, src)), "%s: %s" % (name, v))
        # Users: consumer and publisher, never admin.
        self.assertEqual(consumer["environment"]["JETFLEET_NATS_USER"], "consumer")
        self.assertEqual(svc["intake"]["environment"]["JETFLEET_NATS_USER"], "publisher")
        # Stopping waits longer than the consumer's shutdown grace.
        grace = shutdown_grace_s(read(deploy_path("jetfleet.ini")))
        self.assertGreater(duration_s(consumer["stop_grace_period"]), grace)
        # Prometheus scrapes the port the consumers serve metrics on.
        listen = consumer["environment"]["JETFLEET_CONSUMER_METRICS_LISTEN"]
        prom = load_yaml(deploy_path("prometheus", "prometheus.yml"))[0]
        job = next(j for j in prom["scrape_configs"] if j["job_name"] == "jetfleet-consumer")
        sd = job["dns_sd_configs"][0]
        self.assertEqual(sd["names"], ["consumer"])
        self.assertEqual("0.0.0.0:%d" % sd["port"], listen)
        self.assertIn(str(sd["port"]), [str(p) for p in consumer["expose"]])

    def test_grafana_dashboard_shows_every_metric(self):
        dash = json.loads(read(deploy_path("grafana", "dashboards", "jetfleet.json")))
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        used = set(re.findall(r"\b(jetfleet_[a-z_]+?)(?:_bucket|_sum|_count)?\b", " ".join(exprs)))
        # (that they exist is checked against a running consumer's /metrics)
        self.assertEqual(set(METRICS) - used, set(), "metrics without a panel")
        titles = " | ".join(p["title"] for p in dash["panels"])
        for words in ("by outcome", "In flight", "p50", "p99", "Breaker", "Dead letters",
                      "Rate-limit"):
            self.assertIn(words, titles)
        quantiles = [e for e in exprs if "histogram_quantile" in e]
        self.assertTrue(any("0.50" in e for e in quantiles) and any("0.99" in e for e in quantiles))
        uids = {p["datasource"]["uid"] for p in dash["panels"]}
        ds = read(deploy_path("grafana", "provisioning", "datasources", "prometheus.yml"))
        self.assertEqual(uids, set(re.findall(r"uid:\s*(\S+)", ds)))
        provider = read(deploy_path("grafana", "provisioning", "dashboards", "jetfleet.yml"))
        self.assertIn("path: /var/lib/grafana/dashboards", provider)
        self.assertIn("./grafana/dashboards:/var/lib/grafana/dashboards:ro",
                      read(deploy_path("docker-compose.yml")))


class TestDockerfile(unittest.TestCase):
    """The image cannot be built here: its structure is checked, and its
    package lists against what this build really links and compiles with."""

    def setUp(self):
        text = read(deploy_path("Dockerfile"))
        # Join continuation lines, drop comments.
        text = re.sub(r"\\\n", " ", text)
        self.lines = [l.strip() for l in text.splitlines()
                      if l.strip() and not l.strip().startswith("#")]
        self.stages = []
        for l in self.lines:
            if l.upper().startswith("FROM "):
                self.stages.append([l])
            elif self.stages:
                self.stages[-1].append(l)

    def apt_packages(self, stage):
        pkgs = set()
        for l in stage:
            m = re.search(r"apt-get install ([^&]*)", l)
            if m:
                pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
        return pkgs

    def test_two_bookworm_stages_non_root(self):
        froms = [s[0] for s in self.stages]
        self.assertEqual(len(froms), 2, froms)
        self.assertRegex(froms[0], r"^FROM debian:bookworm AS build$")
        self.assertRegex(froms[1], r"^FROM debian:bookworm( AS \w+)?$")
        build, runtime = self.stages
        self.assertTrue(any("cmake" in l and "-DCMAKE_BUILD_TYPE=Release" in l for l in build))
        self.assertTrue(any(l.startswith("COPY --from=build ") for l in runtime))
        users = [l.split()[1] for l in runtime if l.upper().startswith("USER ")]
        self.assertTrue(users, "the runtime stage sets no USER (it would run as root)")
        user = users[-1].split(":")[0]
        self.assertNotIn(user, ("root", "0"))
        self.assertRegex(user, r"^\d+$", "numeric, so Kubernetes' runAsNonRoot can check it")
        self.assertEqual(int(user), 10001, "the uid of the Kubernetes manifests")
        self.assertFalse([p for p in self.apt_packages(runtime) if p.endswith("-dev")],
                         "no -dev package at run time")

    def test_build_stage_copies_every_source_directory(self):
        cmake = read(os.path.join(SOURCE_DIR, "CMakeLists.txt"))
        dirs = set(re.findall(r"(?<![\w/${}.])([a-z_]+)/[\w/]+\.c\b", cmake))
        dirs |= set(re.findall(r"install\(DIRECTORY (\w+)/", cmake))
        self.assertTrue(dirs)
        copied = " ".join(l for l in self.stages[0] if l.startswith("COPY "))
        for d in sorted(dirs):
            self.assertRegex(copied, r"\b%s/" % d, "the build stage does not copy %s/" % d)
        for f in re.findall(r"install\(FILES (\S+)", cmake):
            self.assertIn(f, copied)

    def test_packages_match_what_the_programs_need(self):
        if shutil.which("dpkg-query") is None or shutil.which("objdump") is None:
            self.skipTest("needs dpkg and objdump (binutils)")
        build, runtime = self.stages
        need_runtime = set()
        for prog in ("jetfleet-consumer", "jetfleet-publisher", "jetfleet-mock"):
            path = os.path.join(BIN_DIR, prog)
            if not os.access(path, os.X_OK):
                self.fail("%s is missing: build first" % path)
            dump = subprocess.run(["objdump", "-p", path], capture_output=True, text=True,
                                  check=True).stdout
            for lib in re.findall(r"^\s*NEEDED\s+(\S+)", dump, re.M):
                need_runtime.add(self.package_of_library(lib))
        ignore = {"libc6", "libgcc-s1"}
        need_runtime = {p for p in need_runtime
                        if p not in ignore and not re.match(r"lib(a|ub)san\d", p)}
        self.assertEqual(need_runtime - self.apt_packages(runtime), set(),
                         "libraries the programs link that the runtime stage does not install")
        cmake = read(os.path.join(SOURCE_DIR, "CMakeLists.txt"))
        modules = re.findall(r"pkg_check_modules\(\w+ REQUIRED IMPORTED_TARGET (\S+)\)", cmake)
        self.assertTrue(modules)
        need_dev = set()
        for mod in modules:
            pc = subprocess.run(["pkg-config", "--path", mod], capture_output=True, text=True)
            self.assertEqual(pc.returncode, 0, "pkg-config does not know %s" % mod)
            need_dev.add(self.package_of_file(pc.stdout.strip()))
        self.assertEqual(need_dev - self.apt_packages(build), set(),
                         "-dev packages the build needs that the build stage does not install")

    def package_of_library(self, soname):
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        m = re.search(r"^\s*%s \(.*\) => (\S+)$" % re.escape(soname), out, re.M)
        self.assertIsNotNone(m, "ldconfig does not know %s" % soname)
        return self.package_of_file(m.group(1))

    def package_of_file(self, path):
        for candidate in (path, os.path.realpath(path)):
            for p in (candidate, candidate.replace("/usr/lib/", "/lib/", 1),
                      candidate.replace("/lib/", "/usr/lib/", 1)):
                cp = subprocess.run(["dpkg-query", "-S", p], capture_output=True, text=True)
                if cp.returncode == 0:
                    return cp.stdout.split(":")[0].strip()
        self.fail("no Debian package owns %s" % path)


class TestSystemdUnits(unittest.TestCase):
    UNITS = ("jetfleet-consumer.service", "jetfleet-consumer@.service", "jetfleet-intake.service")
    HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "PrivateDevices=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=",
                 "SystemCallFilter=@system-service", "MemoryDenyWriteExecute=yes")

    def unit(self, name):
        text = read(deploy_path("systemd", name))
        keys = {}
        for line in text.splitlines():
            if "=" in line and not line.startswith("#"):
                k, _, v = line.partition("=")
                keys.setdefault(k.strip(), []).append(v.strip())
        return text, keys

    def test_units_run_unprivileged_and_stop_gracefully(self):
        grace = shutdown_grace_s(read(deploy_path("jetfleet.ini")))
        for name in self.UNITS:
            with self.subTest(unit=name):
                text, k = self.unit(name)
                self.assertEqual(k["User"], ["jetfleet"])
                self.assertEqual(k["Restart"], ["on-failure"])
                self.assertEqual(k["KillSignal"], ["SIGTERM"])
                self.assertIn("2", k["RestartPreventExitStatus"][0].split(),
                              "a config error (exit 2) must not restart-loop")
                self.assertTrue(any(v.startswith("/etc/jetfleet/") for v in k["EnvironmentFile"]))
                self.assertIn("--config /etc/jetfleet/jetfleet.ini", k["ExecStart"][0])
                for h in self.HARDENING:
                    self.assertIn("\n" + h, text, h)
                if "consumer" in name:
                    self.assertGreater(duration_s(k["TimeoutStopSec"][0]), grace)
        self.assertIn("%i", self.unit("jetfleet-consumer@.service")[0])
        sysusers = read(deploy_path("systemd", "jetfleet.sysusers"))
        self.assertRegex(sysusers, r"(?m)^u jetfleet ")

    @unittest.skipIf(shutil.which("systemd-analyze") is None, "systemd-analyze is not installed")
    def test_systemd_analyze_verify_and_security(self):
        """verify and security --offline against a throw-away root that has
        the units in /etc/systemd/system, the built programs in
        /usr/local/bin and the host's own system units."""
        root = tempfile.mkdtemp(prefix="jf-it-systemd-")
        try:
            os.makedirs(os.path.join(root, "etc", "systemd", "system"))
            os.makedirs(os.path.join(root, "usr", "local", "bin"))
            os.makedirs(os.path.join(root, "usr", "lib", "systemd"))
            shutil.copytree("/usr/lib/systemd/system",
                            os.path.join(root, "usr", "lib", "systemd", "system"), symlinks=True)
            for prog in ("jetfleet-consumer", "jetfleet-publisher"):
                shutil.copy(os.path.join(BIN_DIR, prog), os.path.join(root, "usr", "local", "bin"))
            for name in self.UNITS:
                shutil.copy(deploy_path("systemd", name),
                            os.path.join(root, "etc", "systemd", "system"))
            units = ["jetfleet-consumer.service", "jetfleet-consumer@1.service",
                     "jetfleet-intake.service"]
            cp = subprocess.run(["systemd-analyze", "verify", "--man=no", "--root=" + root] + units,
                                capture_output=True, text=True, timeout=120)
            self.assertEqual((cp.returncode, cp.stderr.strip()), (0, ""), cp.stdout)
            for u in units:
                cp = subprocess.run(["systemd-analyze", "security", "--offline=true",
                                     "--root=" + root, "--no-pager", u],
                                    capture_output=True, text=True, timeout=120)
                m = re.search(r"Overall exposure level for %s: ([\d.]+)" % re.escape(u),
                              cp.stdout + cp.stderr)
                if m is None and "offline" in cp.stderr:
                    self.skipTest("systemd-analyze security has no --offline here")
                self.assertIsNotNone(m, cp.stdout + cp.stderr)
                self.assertLessEqual(float(m.group(1)), 2.0, "%s is exposed: %s" % (u, m.group(0)))
        finally:
            shutil.rmtree(root, ignore_errors=True)


@unittest.skipIf(yaml is None, NEEDS_YAML)
class TestKubernetesManifests(unittest.TestCase):

    def setUp(self):
        self.docs = {}
        for f in sorted(os.listdir(deploy_path("k8s"))):
            if f.endswith(".yaml"):
                for d in load_yaml(deploy_path("k8s", f)):
                    self.docs[(d["kind"], d.get("metadata", {}).get("name"))] = (f, d)

    def doc(self, kind, name):
        self.assertIn((kind, name), self.docs)
        return self.docs[(kind, name)][1]

    def container(self, name):
        return self.doc("Deployment", name)["spec"]["template"]["spec"]["containers"][0]

    def test_every_object_is_namespaced_and_kustomized(self):
        kust = self.doc("Kustomization", None)
        listed = set(kust["resources"])
        for (kind, name), (f, d) in self.docs.items():
            if kind in ("Kustomization", "Namespace"):
                continue
            self.assertEqual(d["metadata"]["namespace"], "jetfleet", (kind, name))
            if kind != "Secret":
                self.assertIn(f, listed)
        self.assertNotIn("secret.yaml", listed,
                         "applying the example would overwrite the real Secret")
        for f in listed:
            self.assertTrue(os.path.exists(deploy_path("k8s", f)), f)

    def test_consumer_deployment(self):
        dep = self.doc("Deployment", "jetfleet-consumer")
        pod = dep["spec"]["template"]["spec"]
        c = self.container("jetfleet-consumer")
        env = {e["name"]: e for e in c["env"]}
        listen = env["JETFLEET_CONSUMER_METRICS_LISTEN"]["value"]
        port = int(listen.rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        self.assertEqual(ports["metrics"], port)
        self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/readyz")
        self.assertEqual(c["livenessProbe"]["httpGet"]["path"], "/healthz")
        for probe in ("readinessProbe", "livenessProbe"):
            self.assertIn(c[probe]["httpGet"]["port"], ("metrics", port))
        ini = self.doc("ConfigMap", "jetfleet-config")["data"]["jetfleet.ini"]
        self.assertGreater(pod["terminationGracePeriodSeconds"], shutdown_grace_s(ini))
        self.assertTrue(c["resources"]["requests"] and c["resources"]["limits"])
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertEqual(pod["securityContext"]["runAsUser"], 10001)
        self.assertFalse(c["securityContext"]["allowPrivilegeEscalation"])
        self.assertEqual(env["JETFLEET_NATS_USER"]["value"], "consumer")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts["config"], "/etc/jetfleet")
        self.assertEqual(c["command"][-1], "/etc/jetfleet/jetfleet.ini")

    def test_intake_deployment_and_service(self):
        c = self.container("jetfleet-intake")
        self.assertEqual(c["command"][:1] + c["command"][-3:],
                         ["jetfleet-publisher", "serve", "--listen", "0.0.0.0:8080"])
        self.assertEqual({e["name"]: e.get("value") for e in c["env"]}["JETFLEET_NATS_USER"],
                         "publisher")
        svc = self.doc("Service", "jetfleet-intake")
        dep = self.doc("Deployment", "jetfleet-intake")
        self.assertEqual(svc["spec"]["selector"], dep["spec"]["selector"]["matchLabels"])
        self.assertEqual(svc["spec"]["ports"][0]["targetPort"], "http")

    def test_secret_refs_exist_and_are_placeholders(self):
        secret = self.doc("Secret", "jetfleet-secrets")
        keys = set(secret["stringData"])
        for v in secret["stringData"].values():
            self.assertIn("CHANGE-ME", v)
        for name in ("jetfleet-consumer", "jetfleet-intake"):
            for e in self.container(name)["env"]:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    self.assertEqual(ref["name"], "jetfleet-secrets")
                    self.assertIn(ref["key"], keys, (name, e["name"]))

    def test_keda_scales_the_consumers_on_jetstream_lag(self):
        so = self.doc("ScaledObject", "jetfleet-consumer")
        self.assertEqual(so["apiVersion"], "keda.sh/v1alpha1")
        self.assertEqual(so["spec"]["scaleTargetRef"]["name"], "jetfleet-consumer")
        self.assertGreaterEqual(so["spec"]["minReplicaCount"], 1)
        triggers = so["spec"]["triggers"]
        accounts = read(deploy_path("nats", "accounts.conf"))
        account = re.search(r"accounts:\s*{\s*(\w+):", accounts).group(1)
        consumers = set()
        for t in triggers:
            self.assertEqual(t["type"], "nats-jetstream")
            md = t["metadata"]
            self.assertRegex(md["natsServerMonitoringEndpoint"], r"^[\w.-]+:8222$")
            self.assertEqual(md["account"], account)
            self.assertEqual(md["stream"], "JOBS")
            self.assertGreater(int(md["lagThreshold"]), 0)
            consumers.add(md["consumer"])
        self.assertIn("llm-normal", consumers)
        ini = self.doc("ConfigMap", "jetfleet-config")["data"]["jetfleet.ini"]
        for c in consumers:
            service = c.rsplit("-", 1)[0]
            self.assertIn("[service.%s]" % service, ini, "durable %s has no service" % c)


if __name__ == "__main__":
    unittest.main()
