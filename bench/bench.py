"""bench.py — the driver behind scripts/bench (Debian's /usr/bin/python3,
standard library only).

Starts its own servers on free loopback ports — nats-server with JetStream,
PostgreSQL (tests/integration/pgharness.py: initdb + pg_ctl, as the
`postgres` user when run as root, fsync off), jetfleet-mock — runs every row
of the benchmark table against a baseline measured in the same run on the
same machine, and prints the table (Markdown) with date, machine and
versions. Raw figures go to <workdir>/results.json, every process's output
to <workdir>/*.log.

Rows (issue 6):
  1  noop drain: jetfleet-consumer (kind noop) vs bench/raw_drain.c, one
     process and two; wall time from process start until the durable shows
     num_pending 0 and num_ack_pending 0.
  2  publish: jetfleet-publisher batch vs bench/raw_publish.c, same bytes.
  3  latency: publish -> ack at a fixed rate, seen by bench/latency.c.
  4  ledger path: noop + PostgreSQL ledger vs bench/raw_ledger.c.
  5  HTTP path: kind = http to jetfleet-mock vs the mock's capacity (wrk).
  6  LLM-shaped: 2 s jobs, fleet_in_flight 20, two processes: makespan.
  7  memory: 1,000 slow HTTP calls in flight in one process: peak RSS.

Each measurement is the best of `reps` tries (the machine is shared); a try
during which other processes kept the CPUs busy is repeated (see quiet()).
JETFLEET_BENCH_DEBUG=1 says, for every try, who else used the CPU."""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

SOURCE = os.environ.get("JETFLEET_SOURCE_DIR",
                        os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
import jfharness as H  # noqa: E402  (NatsServer, NatsClient: stdlib only)
import pgharness as PG  # noqa: E402

PG_BIN = os.environ.get("JETFLEET_PG_BIN", "/usr/lib/postgresql/15/bin")

# Row sizes: (full, quick).
SIZES = {
    "publish_jobs": (200000, 30000),
    "drain_jobs": (200000, 30000),
    "latency_seconds": (10, 3),
    "latency_rate": (2000, 2000),
    "ledger_jobs": (50000, 8000),
    "http_jobs": (30000, 5000),
    "wrk_seconds": (5, 2),
    "llm_jobs": (1000, 100),
    "llm_latency_s": (2.0, 1.0),
    "memory_jobs": (1000, 1000),
    "reps": (2, 1),
    "reps_fast": (3, 1),  # rows 1 and 2: a try takes seconds
}

# The consumer's settings for the noop rows: 4 pulls of 256 open keep the
# server busy while the loop works off the previous ones; MaxAckPending of
# the durable (fleet_in_flight) is not the limit.
NOOP_CONSUMER = {"max_in_flight": 1024, "pull_batch": 256, "pulls": 4}
NOOP_FLEET_IN_FLIGHT = 4096


# A try during which processes other than the benchmark's own (other users
# of a shared machine, or the hypervisor: steal) kept more than this share
# of one CPU busy on average is repeated, up to QUIET_RETRIES more times.
FOREIGN_MAX = 0.25
QUIET_RETRIES = 3
HZ = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def pid_cpu(pid, with_children=False):
    """CPU seconds of a process (and of its reaped children), 0 when gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12]) + ((int(v[13]) + int(v[14])) if with_children else 0)) / HZ
    except (OSError, IndexError, ValueError):
        return 0.0


DEBUG = bool(os.environ.get("JETFLEET_BENCH_DEBUG"))


def all_cpu():
    """{pid: (name, CPU seconds)} of every process (debugging the noise filter)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    st = f.read()
                v = st.rsplit(")", 1)[1].split()
                out[int(d)] = (st[st.index("(") + 1:st.rindex(")")], (int(v[11]) + int(v[12])) / HZ)
            except (OSError, ValueError, IndexError):
                pass
    return out


def machine_busy():
    """CPU seconds the machine spent on user, nice, system and steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[7]) / HZ


def human_rate(x):
    return "{:,.0f}".format(x)


def read_status_kib(pid, key):
    """VmHWM / VmRSS of a live process, in KiB (None when gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def http_json(url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
        return json.loads(text) if text.strip() else None


def log_records(path, msg=None):
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if msg is None or r.get("msg") == msg:
                    out.append(r)
    except OSError:
        pass
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.bin = args.bin
        self.work = args.workdir
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.procs = []
        self.nats = None
        self.nc = None
        self.pg = None
        self.mocks = []
        self.results = {}
        self.rows = []
        self.notes = []
        self.seq = 0
        self.tries = []    # every timed try: seconds, foreign CPU, own CPU
        self.cpu_of = {}   # label -> own CPU seconds of its best tries
        self.cpu_pairs = []  # (row, ours label, baseline label, jobs) for the CPU note
        self.last_own_cpu = 0.0
        self.last_split = {}
        self.split_of = {}  # label -> (own CPU, split by process) of its cheapest best try
        self.noisy = {}    # label -> measurements with no quiet try
        self.startup = []  # seconds from spawn to "consumer ready", drain row

    # ---- how quiet the machine was -------------------------------------

    def own_pids(self):
        """Long-lived processes of this benchmark: (pid, with reaped
        children, group)."""
        out = [(p.pid, False, p.jf_name) for p in self.procs]
        out += [(m.pid, False, "mock") for m in self.mocks]
        if self.nats is not None and self.nats.proc is not None:
            out.append((self.nats.proc.pid, False, "nats-server"))
        if self.pg is not None:
            # The postmaster is not our child (pg_ctl daemonizes it); its
            # backends are its children, reaped ones counted in its own stat.
            try:
                with open(os.path.join(self.pg.data_dir, "postmaster.pid")) as f:
                    pm = int(f.readline())
            except (OSError, ValueError):
                pm = None
            if pm is not None:
                out.append((pm, True, "postgres"))
                for d in os.listdir("/proc"):
                    if not d.isdigit():
                        continue
                    try:
                        with open("/proc/%s/stat" % d) as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) == pm:
                                out.append((int(d), False, "postgres"))
                    except (OSError, IndexError, ValueError):
                        pass
        return out

    def snapshot(self):
        t = os.times()
        return (time.monotonic(), machine_busy(),
                (t.user + t.system, t.children_user + t.children_system),
                {pid: (group, pid_cpu(pid, ch)) for pid, ch, group in self.own_pids()},
                all_cpu() if DEBUG else None)

    def foreign(self, a):
        """Average CPUs used since snapshot a by processes not ours."""
        b = self.snapshot()
        split = {"driver": b[2][0] - a[2][0], "exited children": b[2][1] - a[2][1]}
        for pid, (group, c) in b[3].items():
            split[group] = split.get(group, 0.0) + c - a[3].get(pid, ("", 0.0))[1]
        ours = sum(split.values())
        rate = max(0.0, (b[1] - a[1]) - ours) / max(1e-3, b[0] - a[0])
        self.last_own_cpu = ours
        self.last_split = {k: round(v, 3) for k, v in split.items() if v >= 0.005}
        if DEBUG:
            top = sorted(((c - a[4].get(pid, ("", 0.0))[1], name, pid)
                          for pid, (name, c) in b[4].items()), reverse=True)[:6]
            self.say("foreign %.2f CPU; busy %.2f, ours %.2f over %.2fs; top: %s" % (
                rate, b[1] - a[1], ours, b[0] - a[0],
                ", ".join("%s[%d]%s %.2f" % (n, p, "*" if p in b[3] else "", c)
                          for c, n, p in top)))
        return rate

    def quiet(self, try_fn, label):
        """Runs try_fn() -> (seconds, foreign) until a try is quiet (foreign
        below FOREIGN_MAX), QUIET_RETRIES more times at most; returns the
        quiet try's seconds, or the best when none was."""
        got = []
        for _ in range(1 + QUIET_RETRIES):
            secs, foreign = try_fn()
            got.append((secs, foreign, self.last_own_cpu, self.last_split))
            if foreign <= FOREIGN_MAX:
                break
            self.say("%s: %.2fs while other processes used %.2f CPU; again" % (
                label, secs, foreign))
        self.tries.append({"what": label, "tries": got})
        quiet = [g for g in got if g[1] <= FOREIGN_MAX]
        if not quiet:
            self.noisy[label] = self.noisy.get(label, 0) + 1
        best = min(quiet or got, key=lambda g: g[0])
        self.cpu_of.setdefault(label, []).append(best[2])
        prev = self.split_of.get(label)
        if prev is None or best[2] < prev[0]:
            self.split_of[label] = (best[2], best[3])
        return best[0]

    def cpu_per_job(self, label, n):
        """Microseconds of CPU per job that the benchmark's own processes
        (client, nats-server, PostgreSQL, mock) spent in label's best tries."""
        v = self.cpu_of.get(label)
        return 1e6 * min(v) / n if v else None

    def size(self, key):
        full, quick = SIZES[key]
        return quick if self.quick else full

    def say(self, text):
        print("  " + text, file=sys.stderr, flush=True)

    # ---- processes ----------------------------------------------------

    def log_path(self, name):
        self.seq += 1
        return os.path.join(self.work, "%02d-%s.log" % (self.seq, name))

    def spawn(self, name, cmd, stdout_to_log=True, env=None):
        path = self.log_path(name)
        f = open(path, "wb")
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                             stdout=f if stdout_to_log else subprocess.PIPE, stderr=f,
                             env=env)
        f.close()
        p.jf_name = name
        p.jf_log = path
        self.procs.append(p)
        return p

    def stop(self, p, timeout=60, sig=signal.SIGTERM, hurry=True):
        """Stops p. A consumer waits on SIGTERM until its open pulls expire
        (pull_expires, 5 s); with hurry, a second SIGTERM after 0.5 s ends
        that wait — the rows stop consumers only once their work is done."""
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=0.5 if hurry else timeout)
            except subprocess.TimeoutExpired:
                if hurry:
                    p.send_signal(sig)
                try:
                    p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def run(self, name, cmd, timeout=600):
        """Runs to completion; returns (seconds, stdout text). Fails on a
        non-zero exit."""
        path = self.log_path(name)
        t0 = time.monotonic()
        with open(path, "wb") as err:
            err.write(("$ " + " ".join(cmd) + "\n").encode())
            err.flush()
            cp = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, timeout=timeout)
        secs = time.monotonic() - t0
        out = cp.stdout.decode(errors="replace")
        with open(path, "ab") as f:
            f.write(b"--- stdout\n" + cp.stdout)
        if cp.returncode != 0:
            raise BenchError("%s exited %d (log %s):\n%s\n%s" % (name, cp.returncode, path,
                                                                  out[-2000:], H.tail(path, 30)))
        return secs, out

    def cleanup(self):
        for p in list(self.procs):
            try:
                self.stop(p, timeout=10)
            except Exception:
                pass
        for m in self.mocks:
            if m.poll() is None:
                m.terminate()
                try:
                    m.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.kill()
        if self.nc is not None:
            self.nc.close()
        if self.nats is not None:
            self.nats.cleanup()
        if self.pg is not None:
            self.pg.cleanup()

    # ---- servers --------------------------------------------------------

    def start_nats(self):
        self.nats = H.NatsServer(tmpdir=os.path.join(self.work, "nats")).start()
        self.nc = H.NatsClient(self.nats.url, name="bench")
        # Streams as the publisher provisions them; then empty.
        self.write_config("provision.ini", {})
        self.run("provision", [self.bin_path("jetfleet-publisher"), "--config",
                               os.path.join(self.work, "provision.ini"), "publish",
                               "--service", "bench", "--type", "t", "{}"])
        self.purge()

    def start_pg(self):
        ok, why = PG.available()
        if not ok:
            raise BenchError("PostgreSQL unavailable: " + why)
        self.pg = PG.PostgresServer()
        self.pg.start()

    def start_mock(self, name, *args):
        port = H.free_port()
        path = self.log_path(name)
        f = open(path, "wb")
        p = subprocess.Popen([self.bin_path("jetfleet-mock"), "--listen", "127.0.0.1:%d" % port]
                             + list(args), stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT)
        f.close()
        p.jf_port = port
        self.mocks.append(p)
        H.wait_for(lambda: ("listening on 127.0.0.1:%d" % port) in open(path).read(), 20,
                   "jetfleet-mock to listen", procs=[p])
        return p

    def stop_mock(self, m):
        m.terminate()
        m.wait(timeout=10)
        self.mocks.remove(m)

    def bin_path(self, name):
        return os.path.join(self.bin, name)

    # ---- NATS helpers ---------------------------------------------------

    def purge(self):
        self.nc.js_api("STREAM.PURGE.JOBS", {})

    def delete_durable(self, name):
        try:
            self.nc.js_api("CONSUMER.DELETE.JOBS." + name)
        except H.JsApiError:
            pass

    def delete_service_durables(self, service):
        for prio in ("high", "normal", "low"):
            self.delete_durable("%s-%s" % (service, prio))

    def consumer_info(self, durable):
        try:
            return self.nc.consumer_info("JOBS", durable)
        except H.JsApiError:
            return None

    def wait_drained(self, durable, procs, timeout, interval=0.01):
        """Seconds from now until durable shows nothing pending and nothing
        unacknowledged (polled every `interval`)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.consumer_info(durable)
            if info and info["num_pending"] == 0 and info["num_ack_pending"] == 0:
                return info
            for p in procs:
                if p.poll() is not None:
                    raise BenchError("%s exited %s while draining (log %s):\n%s" % (
                        p.jf_name, p.returncode, p.jf_log, H.tail(p.jf_log, 30)))
            if time.monotonic() > deadline:
                raise BenchError("%s not drained within %ds: %s" % (
                    durable, timeout, json.dumps({k: info.get(k) for k in (
                        "num_pending", "num_ack_pending", "num_redelivered")} if info else None)))
            time.sleep(interval)

    def wait_waiting(self, durable, procs, timeout=20):
        """Until the durable has an open pull request (the consumer is ready)."""
        H.wait_for(lambda: (self.consumer_info(durable) or {}).get("num_waiting", 0) >= 1,
                   timeout, "an open pull on " + durable, procs=procs)

    # ---- configs and jobs -----------------------------------------------

    def write_config(self, name, services, consumer=None, postgres=None, publisher=None):
        lines = ["[nats]", "url = %s" % self.nats.url, ""]
        if postgres:
            lines += ["[postgres]"] + ["%s = %s" % kv for kv in postgres.items()] + [""]
        if consumer:
            lines += ["[consumer]"] + ["%s = %s" % kv for kv in consumer.items()] + [""]
        if publisher:
            lines += ["[publisher]"] + ["%s = %s" % kv for kv in publisher.items()] + [""]
        for svc, keys in services.items():
            lines += ["[service.%s]" % svc] + ["%s = %s" % kv for kv in keys.items()] + [""]
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def make_jobs(self, name, n, service, id_prefix, payload_extra=None):
        """NDJSON of n valid envelopes (~220 bytes each, an LLM-ish payload)."""
        path = os.path.join(self.work, name)
        created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        extra = ""
        if payload_extra is not None:
            extra = "," + json.dumps(payload_extra)[1:-1]
        with open(path, "w") as f:
            for i in range(n):
                f.write('{"id":"%s%07d","service":"%s","priority":"normal","type":"t",'
                        '"tenant":"acme","created_at":"%s","payload":{"tender_id":%d,'
                        '"title":"Supply of office furniture and equipment, lot %d",'
                        '"lang":"en"%s}}\n' % (id_prefix, i, service, created, i, i % 97, extra))
        return path

    def publish(self, config, path):
        secs, out = self.run("publish", [self.bin_path("jetfleet-publisher"), "--config", config,
                                         "--log-level", "warn", "batch", path])
        return secs, json.loads(out.strip().splitlines()[-1])

    def consumer_cmd(self, config):
        return [self.bin_path("jetfleet-consumer"), "--config", config]

    @staticmethod
    def ready_after(p, wall0):
        """Seconds from wall0 to the consumer's "consumer ready" line."""
        for r in log_records(p.jf_log, "consumer ready"):
            try:
                t = datetime.datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
                return t - wall0
            except (KeyError, ValueError):
                return None
        return None

    def consumer_totals(self, procs):
        acked = dead = retried = 0
        for p in procs:
            for r in log_records(p.jf_log, "consumer stopped"):
                acked += r.get("acked", 0)
                dead += r.get("dead", 0)
                retried += r.get("retried", 0)
        return {"acked": acked, "dead": dead, "retried": retried}

    # ---- row 2: publish -------------------------------------------------

    def row_publish(self):
        n = self.size("publish_jobs")
        reps = self.size("reps_fast")
        cfg = self.write_config("publish.ini", {}, publisher={"max_pending": 1024})
        ours, raw = [], []
        attempt = [0]

        def jobs_file(kind):
            # Distinct ids per try (same length): the duplicate window must
            # not turn a repeat into cheap duplicates.
            attempt[0] += 1
            return self.make_jobs("pub-%s.ndjson" % kind, n, "bench", "%s%02d-" % (kind, attempt[0]))

        def raw_try():
            f = jobs_file("r")
            self.purge()
            snap = self.snapshot()
            secs, out = self.run("raw-publish", [
                self.bin_path("jf-bench-raw-publish"), "--url", self.nats.url, "--subject",
                "jobs.bench.normal.t", "--file", f, "--max-pending", "1024"])
            foreign = self.foreign(snap)
            res = json.loads(out.strip().splitlines()[-1])
            if res["published"] != n:
                raise BenchError("raw publish stored %d of %d" % (res["published"], n))
            return secs, foreign

        def ours_try():
            f = jobs_file("o")
            self.purge()
            snap = self.snapshot()
            secs, res = self.publish(cfg, f)
            foreign = self.foreign(snap)
            if res["published"] != n:
                raise BenchError("jetfleet-publisher stored %d of %d" % (res["published"], n))
            return secs, foreign

        for rep in range(reps):
            raw.append(self.quiet(raw_try, "raw publish"))
            ours.append(self.quiet(ours_try, "publish"))
            self.say("publish try %d: ours %.2fs, raw %.2fs" % (rep + 1, ours[-1], raw[-1]))
        self.cpu_pairs.append(("2", "publish", "raw publish", n))
        # The stream now holds the n jobs of the last try: the drain row's input.
        o, r = n / min(ours), n / min(raw)
        self.results["publish"] = {"jobs": n, "ours_s": ours, "raw_s": raw,
                                   "ours_per_s": o, "raw_per_s": r}
        self.add_row("2. publish: `batch` of %s NDJSON jobs" % human_rate(n),
                     "%s jobs/s" % human_rate(o), "%s msgs/s" % human_rate(r), o / r, "≥ 0.9",
                     o / r >= 0.9)
        return n

    # ---- row 1: noop drain ----------------------------------------------

    def raw_drain_try(self, n, batch, pulls, processes):
        name = "raw-%d-%d-%d" % (batch, pulls, processes)
        self.delete_durable(name)
        cmd = [self.bin_path("jf-bench-raw-drain"), "--url", self.nats.url, "--durable", name,
               "--filter", "jobs.bench.normal.>", "--max-ack-pending", str(NOOP_FLEET_IN_FLIGHT),
               "--batch", str(batch), "--pulls", str(pulls)]
        snap = self.snapshot()
        t0 = time.monotonic()
        procs = [self.spawn("raw-drain", cmd) for _ in range(processes)]
        info = self.wait_drained(name, procs, timeout=600)
        secs = time.monotonic() - t0
        foreign = self.foreign(snap)
        for p in procs:
            self.stop(p)
        acked = 0
        for p in procs:
            with open(p.jf_log) as f:
                for line in f:
                    if line.startswith('{"acked"'):
                        acked += json.loads(line)["acked"]
        self.delete_durable(name)
        if info["delivered"]["stream_seq"] == 0 or acked < n:
            raise BenchError("raw drain acked %d of %d" % (acked, n))
        return secs, foreign

    def ours_drain_try(self, n, processes):
        self.delete_service_durables("bench")
        cfg = self.write_config("drain.ini", {
            "bench": {"kind": "noop", "fleet_in_flight": NOOP_FLEET_IN_FLIGHT}},
            consumer=NOOP_CONSUMER)
        snap = self.snapshot()
        t0, wall0 = time.monotonic(), time.time()
        procs = [self.spawn("consumer", self.consumer_cmd(cfg)) for _ in range(processes)]
        self.wait_drained("bench-normal", procs, timeout=600)
        secs = time.monotonic() - t0
        foreign = self.foreign(snap)
        self.startup.append(self.ready_after(procs[0], wall0))
        for p in procs:
            if self.stop(p) != 0:
                raise BenchError("consumer exited %s (log %s)" % (p.returncode, p.jf_log))
        tot = self.consumer_totals(procs)
        if tot["acked"] < n:
            raise BenchError("consumers acked %d of %d" % (tot["acked"], n))
        self.delete_service_durables("bench")
        return secs, foreign

    def row_drain(self, n):
        reps = self.size("reps_fast")
        tries = [(64, 4), (256, 4), (1024, 2)] if not self.quick else [(256, 4), (1024, 2)]
        raw = {}
        for batch, pulls in tries:
            raw[(batch, pulls)] = min(self.quiet(
                lambda: self.raw_drain_try(n, batch, pulls, 1), "raw drain %dx%d" % (batch, pulls))
                for _ in range(reps))
            self.say("raw drain batch %d x %d pulls: %.2fs" % (batch, pulls, raw[(batch, pulls)]))
        best = min(raw, key=raw.get)
        self.best_raw = best
        ours1 = min(self.quiet(lambda: self.ours_drain_try(n, 1), "drain")
                    for _ in range(reps))
        self.say("ours drain, 1 process: %.2fs" % ours1)
        raw2 = min(self.quiet(lambda: self.raw_drain_try(n, best[0], best[1], 2),
                              "raw drain x2") for _ in range(reps))
        ours2 = min(self.quiet(lambda: self.ours_drain_try(n, 2), "drain x2")
                    for _ in range(reps))
        self.say("2 processes: ours %.2fs, raw %.2fs" % (ours2, raw2))
        self.results["drain"] = {
            "jobs": n, "raw_tries": {"%dx%d" % k: v for k, v in raw.items()},
            "best_raw": "%d x %d" % best, "ours1_s": ours1, "raw1_s": raw[best],
            "ours2_s": ours2, "raw2_s": raw2, "consumer": NOOP_CONSUMER,
            "ours_startup_s": self.startup}
        o1, r1, o2, r2 = n / ours1, n / raw[best], n / ours2, n / raw2
        self.add_row("1a. noop drain of %s jobs, 1 process" % human_rate(n),
                     "%s jobs/s" % human_rate(o1),
                     "%s msgs/s (pull %d x %d)" % (human_rate(r1), best[0], best[1]),
                     o1 / r1, "≥ 0.9", o1 / r1 >= 0.9)
        self.cpu_pairs += [("1a", "drain", "raw drain %dx%d" % best, n),
                           ("1b", "drain x2", "raw drain x2", n)]
        self.add_row("1b. noop drain, 2 processes", "%s jobs/s" % human_rate(o2),
                     "%s msgs/s" % human_rate(r2), o2 / r2, "≥ 1.0", o2 / r2 >= 1.0)
        ready = [x for x in self.startup if x is not None]
        if ready:
            self.notes.append("Row 1: jetfleet-consumer takes %.0f ms from exec to \"consumer "
                              "ready\" (config, connect, provisioning of 2 streams and 3 "
                              "durables); it is inside its figure." % (1000 * min(ready)))

    # ---- row 3: latency -------------------------------------------------

    def latency_probe(self, durable, tag):
        # Ids must be new to the stream's duplicate window: the tag has the
        # log's sequence number in it.
        tag = "%s%d" % (tag, self.seq)
        secs, out = self.run("latency-" + tag, [
            self.bin_path("jf-bench-latency"), "--url", self.nats.url, "--durable", durable,
            "--service", "bench", "--rate", str(self.size("latency_rate")),
            "--seconds", str(self.size("latency_seconds")), "--tag", tag], timeout=120)
        return json.loads(out.strip().splitlines()[-1])

    def row_latency(self):
        rate, seconds = self.size("latency_rate"), self.size("latency_seconds")
        # ours
        self.purge()
        self.delete_service_durables("bench")
        cfg = self.write_config("latency.ini", {
            "bench": {"kind": "noop", "fleet_in_flight": NOOP_FLEET_IN_FLIGHT}},
            consumer=NOOP_CONSUMER)
        p = self.spawn("consumer", self.consumer_cmd(cfg))
        self.wait_waiting("bench-normal", [p])
        snap = self.snapshot()
        ours = self.latency_probe("bench-normal", "o")
        ours["foreign_cpu"] = self.foreign(snap)
        self.stop(p)
        self.delete_service_durables("bench")
        # raw
        self.purge()
        batch, pulls = self.best_raw
        p = self.spawn("raw-drain", [
            self.bin_path("jf-bench-raw-drain"), "--url", self.nats.url, "--durable", "raw-lat",
            "--filter", "jobs.bench.normal.>", "--max-ack-pending", str(NOOP_FLEET_IN_FLIGHT),
            "--batch", str(batch), "--pulls", str(pulls)])
        self.wait_waiting("raw-lat", [p])
        snap = self.snapshot()
        raw = self.latency_probe("raw-lat", "r")
        raw["foreign_cpu"] = self.foreign(snap)
        self.stop(p)
        self.delete_durable("raw-lat")
        self.purge()
        self.results["latency"] = {"rate": rate, "seconds": seconds, "ours": ours, "raw": raw}
        self.say("latency ours p50 %.2f p99 %.2f max %.2f ms; raw p50 %.2f p99 %.2f max %.2f ms" % (
            ours["p50_ms"], ours["p99_ms"], ours["max_ms"], raw["p50_ms"], raw["p99_ms"],
            raw["max_ms"]))
        fmt = "%.2f / %.2f / %.1f ms"
        self.add_row("3. latency publish→ack, %s jobs/s for %d s (p50 / p99 / max)" % (
            human_rate(rate), seconds),
            fmt % (ours["p50_ms"], ours["p99_ms"], ours["max_ms"]),
            fmt % (raw["p50_ms"], raw["p99_ms"], raw["max_ms"]),
            ours["p99_ms"] / raw["p99_ms"] if raw["p99_ms"] > 0 else None, "— (p99 ratio shown)",
            None)

    # ---- row 4: ledger --------------------------------------------------

    def row_ledger(self):
        n = self.size("ledger_jobs")
        reps = self.size("reps")
        self.start_pg()
        dsn = self.pg.dsn()
        cfg = self.write_config("ledger.ini", {
            "led": {"kind": "noop", "fleet_in_flight": NOOP_FLEET_IN_FLIGHT}},
            consumer=NOOP_CONSUMER, postgres={"dsn": dsn})
        # A first start applies the migrations: not part of the figure.
        p = self.spawn("consumer-migrate", self.consumer_cmd(cfg))
        self.wait_waiting("led-normal", [p])
        self.stop(p)
        jobs = self.make_jobs("ledger.ndjson", n, "led", "led-")
        self.publish(cfg, jobs)
        ours, raw = [], {}

        def ours_try():
            self.delete_service_durables("led")
            self.pg.query("TRUNCATE jetfleet_jobs")
            snap = self.snapshot()
            t0 = time.monotonic()
            p = self.spawn("consumer", self.consumer_cmd(cfg))
            self.wait_drained("led-normal", [p], timeout=600)
            secs = time.monotonic() - t0
            foreign = self.foreign(snap)
            self.stop(p)
            rows = int(self.pg.scalar(
                "SELECT count(*) FROM jetfleet_jobs WHERE status = 'succeeded'"))
            if rows != n:
                raise BenchError("ledger has %d succeeded rows of %d" % (rows, n))
            return secs, foreign

        def raw_try(depth):
            self.pg.query("TRUNCATE jetfleet_jobs")
            snap = self.snapshot()
            secs, _ = self.run("raw-ledger", [
                self.bin_path("jf-bench-raw-ledger"), "--dsn", dsn, "--jobs", str(n),
                "--prefix", "led-", "--connections", "2", "--depth", str(depth)])
            return secs, self.foreign(snap)

        for rep in range(reps):
            ours.append(self.quiet(ours_try, "ledger"))
            for depth in (64, 512):
                raw.setdefault(depth, []).append(
                    self.quiet(lambda: raw_try(depth), "raw ledger depth %d" % depth))
            self.say("ledger try %d: ours %.2fs, raw %s" % (
                rep + 1, ours[-1], ", ".join("depth %d %.2fs" % (d, v[-1]) for d, v in raw.items())))
        self.pg.query("TRUNCATE jetfleet_jobs")
        secs1, _ = self.run("raw-ledger-1stmt", [
            self.bin_path("jf-bench-raw-ledger"), "--dsn", dsn, "--jobs", str(n), "--prefix",
            "led-", "--connections", "2", "--depth", "512", "--statements", "1"])
        self.delete_service_durables("led")
        best_depth = min(raw, key=lambda d: min(raw[d]))
        self.cpu_pairs.append(("4", "ledger", "raw ledger depth %d" % best_depth, n))
        o, r = n / min(ours), n / min(raw[best_depth])
        self.results["ledger"] = {"jobs": n, "ours_s": ours, "raw_s": {str(k): v for k, v in raw.items()},
                                  "raw_one_statement_s": secs1, "ours_per_s": o, "raw_per_s": r}
        self.add_row("4. ledger path: noop + PostgreSQL ledger, %s jobs" % human_rate(n),
                     "%s jobs/s" % human_rate(o),
                     "%s jobs/s (2 upserts/job, depth %d)" % (human_rate(r), best_depth),
                     o / r, "≥ 0.8", o / r >= 0.8)
        self.notes.append(
            "Row 4: same PostgreSQL server (fsync off, as the tests run it), same two "
            "connections, same upserts; the raw loop pipelines one statement (its own "
            "transaction) per job and step, jetfleet sends the jobs of one loop turn as one "
            "multi-row statement per step (consumer/ledger.c, \"Batches\"); the raw loop "
            "writes only one upsert per job at %s jobs/s." % human_rate(n / secs1))

    # ---- row 5: HTTP ----------------------------------------------------

    def wrk(self, port, body_path):
        script = os.path.join(self.work, "post.lua")
        with open(body_path) as f:
            body = f.readline().strip()
        with open(script, "w") as f:
            f.write('wrk.method = "POST"\nwrk.body = %s\n'
                    'wrk.headers["Content-Type"] = "application/json"\n'
                    'wrk.headers["Idempotency-Key"] = "wrk"\n' % json.dumps(body))

        def wrk_try(threads, conns):
            snap = self.snapshot()
            _, out = self.run("wrk", ["wrk", "-t%d" % threads, "-c%d" % conns,
                                      "-d%ds" % self.size("wrk_seconds"), "-s", script,
                                      "http://127.0.0.1:%d/call" % port])
            foreign = self.foreign(snap)
            m = re.search(r"Requests/sec:\s*([\d.]+)", out)
            if not m:
                raise BenchError("cannot read wrk's output:\n" + out)
            return 1.0 / float(m.group(1)), foreign  # seconds a request: less is better

        best = min(self.quiet(lambda: wrk_try(t, c), "wrk -t%d -c%d" % (t, c))
                   for t, c in ((1, 32), (2, 64)))
        return 1.0 / best

    def row_http(self):
        n = self.size("http_jobs")
        mock = self.start_mock("mock-http", "--latency", "0")
        url = "http://127.0.0.1:%d/call" % mock.jf_port
        jobs = self.make_jobs("http.ndjson", n, "web", "web-")
        capacity = self.wrk(mock.jf_port, jobs)
        http_json("http://127.0.0.1:%d/_mock/reset" % mock.jf_port, {})
        cfg = self.write_config("http.ini", {"web": {"kind": "http", "url": url, "timeout": "10s"}},
                                consumer={"max_in_flight": 256, "pull_batch": 128, "pulls": 4})
        self.publish(cfg, jobs)
        hwms = []

        def ours_try():
            # A new durable delivers the same jobs again.
            self.delete_service_durables("web")
            snap = self.snapshot()
            t0 = time.monotonic()
            p = self.spawn("consumer", self.consumer_cmd(cfg))
            self.wait_drained("web-normal", [p], timeout=600)
            secs = time.monotonic() - t0
            foreign = self.foreign(snap)
            hwms.append(read_status_kib(p.pid, "VmHWM"))
            self.stop(p)
            tot = self.consumer_totals([p])
            if tot["acked"] < n:
                raise BenchError("http row: %d of %d acked" % (tot["acked"], n))
            return secs, foreign

        secs = min(self.quiet(ours_try, "http") for _ in range(self.size("reps")))
        self.cpu_pairs.append(("5a", "http", None, n))
        hwm = max(hwms)
        stats = http_json("http://127.0.0.1:%d/_mock/stats" % mock.jf_port)
        self.stop_mock(mock)
        self.delete_service_durables("web")
        o = n / secs
        self.results["http"] = {"jobs": n, "ours_s": secs, "wrk_per_s": capacity,
                                "peak_rss_kib": hwm, "mock_requests": stats.get("requests"),
                                "mock_peak_in_flight": stats.get("peak_in_flight")}
        self.say("http: ours %.0f jobs/s, wrk %.0f req/s, RSS %s KiB" % (o, capacity, hwm))
        self.add_row("5a. HTTP path: kind = http to the mock (latency 0), %s jobs" % human_rate(n),
                     "%s jobs/s" % human_rate(o),
                     "%s req/s (wrk, mock capacity)" % human_rate(capacity), o / capacity,
                     "—", None)
        self.add_row("5b. HTTP path: consumer peak RSS", "%.1f MiB" % (hwm / 1024), "—", None,
                     "—", None)

    # ---- row 6: LLM-shaped ---------------------------------------------

    def row_llm(self):
        n = self.size("llm_jobs")
        lat = self.size("llm_latency_s")
        limit = 20
        calls_log = os.path.join(self.work, "llm-calls.ndjson")
        mock = self.start_mock("mock-llm", "--latency", "%dms" % int(lat * 1000), "--log", calls_log)
        url = "http://127.0.0.1:%d/analyze" % mock.jf_port
        cfg = self.write_config("llm.ini", {"llm": {
            "kind": "http", "url": url, "timeout": "30s", "fleet_in_flight": limit}},
            consumer={"max_in_flight": 64})
        jobs = self.make_jobs("llm.ndjson", n, "llm", "llm-")
        self.publish(cfg, jobs)
        self.delete_service_durables("llm")
        t0 = time.monotonic()
        procs = [self.spawn("consumer", self.consumer_cmd(cfg)) for _ in range(2)]
        self.wait_drained("llm-normal", procs, timeout=n * lat / limit * 3 + 60, interval=0.05)
        secs = time.monotonic() - t0
        for p in procs:
            self.stop(p)
        stats = http_json("http://127.0.0.1:%d/_mock/stats" % mock.jf_port)
        self.stop_mock(mock)
        self.delete_service_durables("llm")
        ideal = n * lat / limit
        peak = stats.get("peak_in_flight")
        arrivals = [r["ts_ms"] for r in log_records(calls_log) if "ts_ms" in r]
        span = (max(arrivals) - min(arrivals)) / 1000.0 + lat if arrivals else None
        self.results["llm"] = {"jobs": n, "latency_s": lat, "makespan_s": secs, "ideal_s": ideal,
                               "calls_span_s": span, "mock_peak_in_flight": peak,
                               "mock_requests": stats.get("requests")}
        self.say("llm: makespan %.1fs (ideal %.0fs; first call to last answer %.1fs), peak %s" % (
            secs, ideal, span or -1, peak))
        if span is not None:
            self.notes.append(
                "Row 6: from the first call's arrival at the mock to the last answer: %.1f s "
                "(%.3f x ideal); the rest of the makespan is start-up (connect, provision, "
                "first pulls) and the final ack." % (span, span / ideal))
        self.add_row("6a. LLM-shaped: %s jobs x %g s, fleet_in_flight %d, 2 processes" % (
            human_rate(n), lat, limit), "%.1f s makespan" % secs, "%.0f s ideal" % ideal,
            secs / ideal, "≤ 1.05", secs / ideal <= 1.05)
        self.add_row("6b. LLM-shaped: highest concurrency at the mock", "%s" % peak,
                     "limit %d" % limit, None, "≤ 20", peak is not None and peak <= limit)

    # ---- row 7: memory --------------------------------------------------

    def row_memory(self):
        n = self.size("memory_jobs")
        mock = self.start_mock("mock-slow", "--latency", "30s")
        url = "http://127.0.0.1:%d/slow" % mock.jf_port
        cfg = self.write_config("memory.ini", {"slow": {
            "kind": "http", "url": url, "timeout": "60s", "fleet_in_flight": n,
            "ack_wait": "90s"}},
            # room for the probe pulls of the two idle durables (high, low)
            consumer={"max_in_flight": n + 64, "shutdown_grace": "1s"})
        jobs = self.make_jobs("slow.ndjson", n, "slow", "slow-")
        self.publish(cfg, jobs)
        self.delete_service_durables("slow")
        p = self.spawn("consumer", self.consumer_cmd(cfg))
        mock_stats = "http://127.0.0.1:%d/_mock/stats" % mock.jf_port
        t0 = time.monotonic()
        H.wait_for(lambda: http_json(mock_stats).get("in_flight", 0) >= n, 28,
                   "%d calls in flight at the mock" % n, interval=0.2, procs=[p])
        ramp = time.monotonic() - t0
        time.sleep(1.0)
        hwm = read_status_kib(p.pid, "VmHWM")
        rss = read_status_kib(p.pid, "VmRSS")
        self.stop(p, sig=signal.SIGTERM)
        self.stop_mock(mock)
        self.delete_service_durables("slow")
        self.results["memory"] = {"jobs": n, "ramp_s": ramp, "peak_rss_kib": hwm, "rss_kib": rss}
        self.say("memory: %d in flight after %.1fs, VmHWM %d KiB" % (n, ramp, hwm))
        self.add_row("7. memory: %s HTTP calls in flight (mock latency 30 s), 1 process" %
                     human_rate(n), "%.1f MiB peak RSS" % (hwm / 1024), "—", None, "≤ 64 MiB",
                     hwm <= 64 * 1024)

    # ---- table ------------------------------------------------------------

    def save(self, head):
        with open(os.path.join(self.work, "results.json"), "w") as f:
            json.dump({"header": head, "results": self.results, "rows": self.rows,
                       "tries": self.tries}, f, indent=2)

    def add_row(self, name, ours, base, ratio, goal, ok):
        self.rows.append((name, ours, base, "%.2f" % ratio if ratio is not None else "—", goal,
                          "—" if ok is None else ("met" if ok else "**missed**")))

    def header(self):
        model = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        memtotal = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memtotal = int(line.split()[1])

        def ver(cmd, pat=r"([\d.]+)"):
            try:
                out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     timeout=10).stdout.decode()
                m = re.search(pat, out)
                return m.group(1) if m else out.strip()
            except OSError:
                return "?"
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": "%d CPUs (%s), %.1f GiB RAM, Linux %s" % (
                os.cpu_count(), model, memtotal / 1024 / 1024, platform.release()),
            "nats-server": ver(["/usr/sbin/nats-server", "--version"], r"v([\d.]+)"),
            "nats.c": ver(["pkg-config", "--modversion", "libnats"]),
            "libcurl": ver(["pkg-config", "--modversion", "libcurl"]),
            "PostgreSQL": ver([os.path.join(PG_BIN, "postgres"), "--version"], r"([\d.]+)\s*\("),
            "libpq": ver(["pkg-config", "--modversion", "libpq"]),
            "load": os.getloadavg()[0],
        }

    def table(self, head, seconds):
        out = []
        out.append("Benchmarks (%s run) — %s" % ("quick" if self.quick else "full", head["date"]))
        out.append("")
        out.append("Machine: %s. 1-minute load %.2f at the start, %.2f at the end; the run "
                   "took %.0f s." % (head["machine"], head["load"], os.getloadavg()[0], seconds))
        out.append("Versions: nats-server %s, nats.c %s, libcurl %s, PostgreSQL %s (libpq %s); "
                   "jetfleet built Release." % (head["nats-server"], head["nats.c"],
                                                head["libcurl"], head["PostgreSQL"], head["libpq"]))
        out.append("")
        cols = ("row", "jetfleet", "baseline", "ratio", "goal", "verdict")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        for r in sorted(self.rows, key=lambda r: r[0]):  # "1a." < "1b." < "2." …
            out.append("| " + " | ".join(r) + " |")
        out.append("")
        out.append("How each figure is taken (each is the best of %d tries, %d for rows 1 "
                   "and 2):" % (self.size("reps"), self.size("reps_fast")))
        out += ["- " + n for n in self.method_notes() + self.notes]
        def split(label, n):
            got = self.split_of.get(label)
            if got is None:
                return "?"
            parts = sorted(got[1].items(), key=lambda kv: -kv[1])
            return "%.0f (%s)" % (1e6 * got[0] / n, ", ".join(
                "%s %.0f" % (k, 1e6 * v / n) for k, v in parts if 1e6 * v / n >= 0.5))

        cpu = []
        for row, mine, base, n in self.cpu_pairs:
            if mine in self.split_of:
                cpu.append("%s: %s%s" % (row, split(mine, n),
                                         " vs %s" % split(base, n) if base else ""))
        if cpu:
            out.append("- CPU time per job in µs, all the run's own processes together and by "
                       "process (\"exited children\": programs that ran to completion, e.g. the "
                       "publisher; \"driver\": this script's polling) — what bounds throughput "
                       "when every CPU is busy, and steadier than wall time on a shared machine; "
                       "jetfleet vs baseline: " + "; ".join(cpu) + ".")
        retried = sum(1 for t in self.tries if len(t["tries"]) > 1)
        out.append("- The machine is shared: a try during which other processes (or the "
                   "hypervisor's steal) kept more than %.2f CPU busy was repeated (up to %d "
                   "times); %d of %d measurements needed a repeat.%s" % (
                       FOREIGN_MAX, QUIET_RETRIES, retried, len(self.tries),
                       " No quiet try at all (the best is used): %s." % ", ".join(
                           "%s (%d of %d)" % (k, v, sum(1 for t in self.tries if t["what"] == k))
                           for k, v in sorted(self.noisy.items())) if self.noisy else ""))
        return "\n".join(out)

    def method_notes(self):
        return [
            "Ratios are jetfleet / baseline (rows 1, 2, 4, 5: higher is better), "
            "makespan / ideal (row 6) and p99 / baseline p99 (row 3).",
            "Rows 1, 4, 5: wall time from starting the process(es) until the durable shows "
            "num_pending 0 and num_ack_pending 0 (consumer info polled every 10 ms). "
            "jetfleet-consumer runs kind = noop with max_in_flight %d, pull_batch %d, pulls %d, "
            "stats off; the baseline bench/raw_drain.c keeps pulls open on "
            "$JS.API.CONSUMER.MSG.NEXT and publishes +ACK from nats.c's delivery callback; "
            "its best batch x pulls of those tried is used, also for two processes." % (
                NOOP_CONSUMER["max_in_flight"], NOOP_CONSUMER["pull_batch"],
                NOOP_CONSUMER["pulls"]),
            "Row 2: wall time of the process; bench/raw_publish.c sends the same lines "
            "with js_PublishMsgAsync and Nats-Msg-Id, max_pending 1024 for both.",
            "Row 3: bench/latency.c publishes at a fixed rate and subscribes to "
            "$JS.ACK.JOBS.<durable>.> — each +ACK is an ordinary NATS message, so the probe "
            "sees it when the server does; the PubAck's sequence joins publish and ack; one "
            "clock. Baseline: the raw loop of row 1.",
            "Row 5: the mock's capacity is the best of wrk -t1 -c32 and -t2 -c64 POSTing the "
            "same envelope; peak RSS is VmHWM of /proc/PID/status after the drain.",
            "Row 6: from starting the two consumers until the durable is drained; the mock "
            "answers every call after the fixed latency; highest concurrency is the mock's "
            "peak_in_flight.",
            "Row 7: VmHWM one second after the mock reports all calls in flight.",
        ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rows", default="1,2,3,4,5,6,7",
                    help="comma-separated rows to run (2 always runs when 1 does)")
    ap.add_argument("--out", help="also write the table (Markdown) to this file")
    args = ap.parse_args()
    rows = set(args.rows.split(","))

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)
    b = Bench(args)
    head = b.header()
    t0 = time.monotonic()
    try:
        b.start_nats()
        if "2" in rows or "1" in rows or "3" in rows:
            n = b.row_publish()
            if "1" in rows:
                b.row_drain(n)
            else:
                b.best_raw = (256, 4)
            if "3" in rows:
                b.row_latency()
        if "4" in rows:
            b.row_ledger()
        if "5" in rows:
            b.row_http()
        if "6" in rows:
            b.row_llm()
        if "7" in rows:
            b.row_memory()
    except (BenchError, AssertionError, H.JsApiError, H.NatsTimeout, PG.PostgresError,
            OSError, subprocess.SubprocessError) as e:
        print("bench: %s" % e, file=sys.stderr)
        b.cleanup()
        if b.rows:
            print(b.table(head, time.monotonic() - t0))
        b.save(head)
        return 1
    except BaseException:
        b.cleanup()
        raise
    b.cleanup()
    text = b.table(head, time.monotonic() - t0)
    print(text)
    b.save(head)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
