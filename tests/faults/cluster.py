"""cluster — a three-node nats-server JetStream cluster on loopback for the
fault suite, run from deploy/nats/cluster/n1..n3.conf as they are (ports and
store directories from the environment, as cluster.env sets them).

Built on tests/integration/test_deploy.py (Server, deploy_path), imported,
not copied. Nodes can be stopped (SIGTERM), killed (-9) and started again on
the same ports and store.

    cl = NatsCluster(tmpdir).start()
    cl.urls                       # "nats://127.0.0.1:p1,nats://…:p2,nats://…:p3"
    cl.stream_leader("JOBS")      # "n2"
    cl.kill9("n2"); cl.start_node("n2")
    cl.stop_all()
"""

import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.join(HERE, "..", "integration")
if INTEGRATION not in sys.path:
    sys.path.insert(0, INTEGRATION)

import jfharness as jh  # noqa: E402
from test_deploy import Server, deploy_path  # noqa: E402

NODES = ("n1", "n2", "n3")


class NatsCluster:

    def __init__(self, tmpdir):
        self.tmpdir = tmpdir
        ports = {}
        for n in (1, 2, 3):
            ports[n] = {"PORT": jh.free_port(), "CLUSTER_PORT": jh.free_port(),
                        "MONITOR_PORT": jh.free_port()}
        routes = "[%s]" % ", ".join("nats-route://127.0.0.1:%d" % ports[n]["CLUSTER_PORT"]
                                   for n in (1, 2, 3))
        env = {"JF_NATS_ROUTES": routes}
        for n in (1, 2, 3):
            for k, v in ports[n].items():
                env["JF_NATS_N%d_%s" % (n, k)] = str(v)
            env["JF_NATS_N%d_STORE_DIR" % n] = os.path.join(tmpdir, "n%d" % n)
        self.nodes = {}
        for n in (1, 2, 3):
            name = "n%d" % n
            self.nodes[name] = Server(name, deploy_path("nats", "cluster", "%s.conf" % name),
                                      tmpdir, env, ports[n]["PORT"], ports[n]["MONITOR_PORT"])

    @property
    def urls(self):
        return ",".join(self.nodes[n].url for n in NODES)

    def log_paths(self):
        return [("nats-%s" % n, self.nodes[n].log_path) for n in NODES]

    def running(self, name):
        p = self.nodes[name].proc
        return p is not None and p.poll() is None

    def procs(self):
        return [s.proc for s in self.nodes.values() if s.proc is not None and s.proc.poll() is None]

    # ---- life cycle

    def start(self, timeout=60):
        for n in NODES:
            self.nodes[n].start()
        self.wait_formed(timeout)
        return self

    def wait_formed(self, timeout=60):
        """All three routed, one JetStream meta leader known to each."""
        def formed():
            for s in self.nodes.values():
                if s.monitor("/routez").get("num_routes") != 2:
                    return False
                meta = s.monitor("/jsz").get("meta_cluster") or {}
                if not meta.get("leader") or meta.get("cluster_size") != 3:
                    return False
            return True
        jh.wait_for(formed, timeout, "three routed nodes with a JetStream meta leader",
                    interval=0.2, procs=self.procs())

    def kill9(self, name):
        s = self.nodes[name]
        if s.proc is not None and s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait(timeout=30)

    def stop(self, name, timeout=15):
        self.nodes[name].stop(timeout)

    def start_node(self, name, timeout=60):
        s = self.nodes[name]
        if s.proc is not None and s.proc.poll() is None:
            return s
        s.start()
        jh.wait_for(s.healthy, timeout, "node %s to be healthy again" % name, interval=0.2,
                    procs=[s.proc])
        return s

    def stop_all(self):
        for n in NODES:
            try:
                self.nodes[n].stop()
            except Exception as e:  # cleanup goes on
                sys.stderr.write("stopping %s: %s\n" % (n, e))

    # ---- what the servers say

    def _any_monitor(self, path, prefer=None):
        order = ([prefer] if prefer else []) + [n for n in NODES if n != prefer]
        last = None
        for n in order:
            if not self.running(n):
                continue
            try:
                return self.nodes[n].monitor(path)
            except (OSError, ValueError) as e:
                last = e
        raise ConnectionError("no node answers %s: %s" % (path, last))

    def stream_cluster(self, stream, via=None):
        """{"leader": name or None, "replicas": [{name, current, …}]} as a
        running node (via, else any) reports it through /jsz."""
        j = self._any_monitor("/jsz?accounts=true&streams=true", prefer=via)
        for acc in j.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                if st.get("name") == stream:
                    return st.get("cluster") or {}
        return {}

    def stream_leader(self, stream, via=None):
        return (self.stream_cluster(stream, via).get("leader") or None)

    def wait_stream_leader(self, stream, timeout, exclude=(), current=False):
        """Waits for a leader of stream (not one of exclude); with current,
        also for every replica to be running and caught up. Returns the
        leader's name."""
        def ok():
            leader = self.stream_leader(stream)
            if not leader or leader in exclude or not self.running(leader):
                return None
            # Only the leader knows how far its followers are (a follower's
            # view of the other follower is stale).
            c = self.stream_cluster(stream, via=leader)
            if c.get("leader") != leader:
                return None
            if current:
                reps = c.get("replicas") or []
                if len(reps) != 2 or not all(r.get("current") and not r.get("offline")
                                             and self.running(r.get("name")) for r in reps):
                    return None
            return leader
        return jh.wait_for(ok, timeout, "a leader for %s%s" % (
            stream, " with current replicas" if current else ""), interval=0.2)
