"""pgharness — a throwaway PostgreSQL server for the integration tests.

PostgresServer runs initdb into a temporary directory and starts the server
with pg_ctl, listening on 127.0.0.1 (a free port) and on a unix socket in
that directory only, with trust authentication for the superuser `postgres`.
PostgreSQL refuses to run as root, so when the tests run as root (CI) the
directory belongs to the `postgres` OS user (created by Debian's postgresql
package) and the server's programs run through `runuser -u postgres --`.

Binaries come from $JETFLEET_PG_BIN (default /usr/lib/postgresql/15/bin),
psql from $JETFLEET_PSQL (default /usr/bin/psql, then the PG bin dir).

    pg = PostgresServer().start()
    pg.query("CREATE TABLE t (x int)")
    pg.dsn()                  # "host=127.0.0.1 port=… user=postgres dbname=jetfleet"
    pg.restart("immediate")   # a crash and recovery; "fast" for a clean one
    pg.cleanup()
"""

import csv
import io
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

PG_BIN = os.environ.get("JETFLEET_PG_BIN", "/usr/lib/postgresql/15/bin")


def _find_psql():
    explicit = os.environ.get("JETFLEET_PSQL")
    if explicit:
        return explicit
    for p in ("/usr/bin/psql", os.path.join(PG_BIN, "psql")):
        if os.access(p, os.X_OK):
            return p
    return shutil.which("psql") or "/usr/bin/psql"


PSQL = _find_psql()
NULL = "\\N"  # how query() asks psql to print SQL NULL; returned as None


def available():
    """(True, "") when initdb, pg_ctl and psql are there; else (False, why)."""
    for p in (os.path.join(PG_BIN, "initdb"), os.path.join(PG_BIN, "pg_ctl"), PSQL):
        if not os.access(p, os.X_OK):
            return False, "%s is missing (set JETFLEET_PG_BIN / JETFLEET_PSQL)" % p
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False, "running as root and there is no 'postgres' OS user to run the server"
    return True, ""


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresError(Exception):
    pass


class PostgresServer:
    """initdb + pg_ctl on 127.0.0.1 with a database `jetfleet`."""

    def __init__(self, dbname="jetfleet"):
        self.dbname = dbname
        self.tmpdir = tempfile.mkdtemp(prefix="jf-pg-")
        self.data_dir = os.path.join(self.tmpdir, "data")
        self.sock_dir = os.path.join(self.tmpdir, "sock")
        self.log_path = os.path.join(self.tmpdir, "postgres.log")
        self.port = None
        self._as_user = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.tmpdir, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.tmpdir, 0o755)

    # --- running programs as the server's user

    def _run(self, args, timeout=120, check=True):
        cp = subprocess.run(self._as_user + args, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                            cwd=self.tmpdir)
        if check and cp.returncode != 0:
            raise PostgresError("%s exited %d:\n%s\n--- server log:\n%s" % (
                " ".join(args), cp.returncode, cp.stdout.decode(errors="replace"),
                self.log_tail()))
        return cp

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(text[-lines:])

    # --- life cycle

    def start(self, timeout=60):
        if not os.path.isdir(self.data_dir):
            self._run([os.path.join(PG_BIN, "initdb"), "-D", self.data_dir, "-U", "postgres",
                       "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            self._run(["mkdir", "-p", self.sock_dir])
        attempts = 3 if self.port is None else 1
        for attempt in range(attempts):
            if self.port is None or attempt > 0:
                self.port = _free_port()
            cp = self._pg_ctl_start(timeout)
            if cp.returncode == 0:
                break
        else:
            raise PostgresError("PostgreSQL did not start:\n%s\n--- server log:\n%s" % (
                cp.stdout.decode(errors="replace"), self.log_tail()))
        self._wait_accepting(timeout)
        if not self.query("SELECT 1 FROM pg_database WHERE datname = '%s'" % self.dbname,
                          dbname="postgres"):
            self.query("CREATE DATABASE %s" % self.dbname, dbname="postgres")
        return self

    def _pg_ctl_start(self, timeout):
        # fsync off: the tests crash processes, not the machine (the OS keeps
        # what was written). synchronous_commit stays on: a commit that was
        # acknowledged must survive an immediate shutdown.
        opts = ("-c listen_addresses=127.0.0.1 -p %d -c unix_socket_directories=%s "
                "-c fsync=off -c full_page_writes=off "
                "-c max_connections=200 -c log_min_messages=warning" % (self.port, self.sock_dir))
        return self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data_dir, "-l",
                          self.log_path, "-o", opts, "-w", "-t", str(int(timeout)), "start"],
                         timeout=timeout + 30, check=False)

    def _wait_accepting(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            cp = subprocess.run([PSQL, "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                 "-U", "postgres", "-d", "postgres", "-c", "SELECT 1"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=30)
            if cp.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise PostgresError("PostgreSQL does not accept connections:\n" + self.log_tail())
            time.sleep(0.1)

    def stop(self, mode="fast", timeout=60):
        """pg_ctl stop -m fast|immediate|smart; a no-op when not running."""
        if self.port is None or not os.path.isdir(self.data_dir):
            return
        self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data_dir, "-m", mode, "-w",
                   "-t", str(int(timeout)), "stop"], timeout=timeout + 30, check=False)

    def running(self):
        cp = self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data_dir, "status"],
                       check=False)
        return cp.returncode == 0

    def restart(self, mode="fast", down_seconds=0.0, timeout=60):
        """Stops (mode "fast": clean; "immediate": like a crash, recovery on
        start), stays down for down_seconds, starts again on the same port."""
        self.stop(mode)
        if down_seconds > 0:
            time.sleep(down_seconds)
        cp = self._pg_ctl_start(timeout)
        if cp.returncode != 0:
            raise PostgresError("PostgreSQL did not come back:\n%s\n%s" % (
                cp.stdout.decode(errors="replace"), self.log_tail()))
        self._wait_accepting(timeout)
        return self

    def cleanup(self):
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # --- clients

    def dsn(self, dbname=None):
        return "host=127.0.0.1 port=%d user=postgres dbname=%s" % (self.port,
                                                                  dbname or self.dbname)

    def url(self, dbname=None):
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, dbname or self.dbname)

    def query(self, sql, dbname=None, timeout=60):
        """Runs sql with psql (ON_ERROR_STOP): the rows of the last
        statement as lists of strings, SQL NULL as None. Raises
        PostgresError with psql's message on an error."""
        cp = subprocess.run(
            [PSQL, "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-d", dbname or self.dbname, "-v", "ON_ERROR_STOP=1", "--csv", "-t",
             "-P", "null=" + NULL, "-c", sql],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=timeout)
        if cp.returncode != 0:
            raise PostgresError("psql: %s\n(sql: %s)" % (cp.stderr.decode(errors="replace").strip(),
                                                       sql[:300]))
        rows = []
        for row in csv.reader(io.StringIO(cp.stdout.decode("utf-8"))):
            rows.append([None if v == NULL else v for v in row])
        return rows

    def scalar(self, sql, dbname=None):
        rows = self.query(sql, dbname=dbname)
        return rows[0][0] if rows and rows[0] else None

    def backend_pids(self, application_name="jetfleet-consumer"):
        return [int(r[0]) for r in self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '%s'" % application_name)]


class PostgresMixin:
    """Gives a unittest.TestCase whose setUp makes self.progs (JetfleetTestCase
    and its subclasses) a PostgreSQL per test as self.pg, its log shown on
    failure; skips when PostgreSQL is not installed. Put it first among the
    bases: class T(PostgresMixin, JetfleetTestCase)."""

    def setUp(self):
        ok, why = available()
        if not ok:
            self.skipTest("no PostgreSQL: " + why)
        super().setUp()
        self.pg = PostgresServer()
        self.progs.logs.append(("postgresql", self.pg.log_path))
        try:
            self.pg.start()
        except BaseException:
            self.pg.cleanup()
            super().tearDown()
            raise

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            self.pg.cleanup()
