"""Fault suite B: a three-node nats-server cluster on loopback (deploy/nats/
cluster/n1..n3.conf as they are) with JOBS and JOBS_DLQ at three replicas.

  test_leader_kill_then_quorum_loss
      1. a paced publisher (`batch -`) and two consumers, all given the three
         URLs, are working when the JOBS stream leader is killed (-9); the
         killed node comes back. Whatever the publisher reports failed is
         published again by id (the duplicate window keeps each job once).
      2. with a fresh backlog, two of the three nodes go (the new leader is
         stopped, a follower killed -9): no quorum. A publish must fail; the
         consumers keep running, lose nothing and dead-letter nothing that
         was not doomed anyway; both nodes come back, the job refused
         meanwhile is published again, and the run completes with
         faultlib's invariants.

Jobs: kind = noop with a delay ("work", expected to succeed at the first
attempt unless a fault interferes) and a poison service (every attempt
fails: dead after max_deliver = 2, reason max_deliveries), so dead letters
are written while the stream leaders move.

JETFLEET_FAULTS_QUICK=1 scales the sizes down. Run from tests/faults:
  JETFLEET_BIN=<build>/bin /usr/bin/python3 -m unittest -v test_cluster
"""

import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultlib  # noqa: E402
from cluster import NatsCluster  # noqa: E402
from faultlib import FaultTestCase, Job, size  # noqa: E402

jh = faultlib.jh


def cluster_jobs(n, prefix, poison_every):
    """n jobs: every poison_every-th (from index 5) on the poison service."""
    jobs = []
    for i in range(n):
        jid = "%s-%06d" % (prefix, i)
        prio = faultlib.PRIORITIES[i % 3]
        if poison_every and i % poison_every == 5:
            jobs.append(Job(jid, "poison", prio, payload={"n": i}, expect="dead", attempts=2,
                            reason="max_deliveries"))
        else:
            jobs.append(Job(jid, "work", prio, payload={"n": i}))
    return jobs


class TestCluster(FaultTestCase):

    def count_logs(self, procs, msg, pred=None):
        return sum(1 for p in procs for l in jh.log_msgs(p, msg) if pred is None or pred(l))

    def republish_until_clean(self, run, jobs, deadline_s, what):
        """Publishes jobs again (the same ids) until one batch is clean:
        nothing failed, every line published or a duplicate. Returns the
        number of batches it took."""
        deadline = time.monotonic() + deadline_s
        tries = 0
        while True:
            tries += 1
            summary = run.publish(jobs, name="%s-%d.ndjson" % (what, tries), check=False,
                                  timeout=120)
            if summary and summary["failed"] == 0 and \
                    summary["published"] + summary["duplicates"] == len(jobs):
                return tries, summary
            if time.monotonic() >= deadline:
                self.fail("%s: no clean re-publish within %.0fs, last %r" % (
                    what, deadline_s, summary))
            time.sleep(1.0)

    def test_leader_kill_then_quorum_loss(self):
        n1, n2 = size(3000, 600), size(4000, 1200)
        poison_every = 50
        # Longer than nats-server 2.9's lost-quorum detection (~10 s): a
        # leader cut off from its followers keeps serving that long.
        outage_s = size(20.0, 12.0)
        run = self.fault_run("cluster-leader-kill-quorum-loss")
        cl = NatsCluster(self.tmp)
        self._cleanups_last.append(cl.stop_all)
        self.progs.logs.extend(cl.log_paths())
        cl.start()
        run.use_nats(cl.urls)
        run.start_postgres()
        cfg = run.write_config(
            services={
                # ack_wait 5s: acks lost with a leader come back soon as
                # redeliveries, which the ledger turns into acks without a call.
                "work": run.noop_service(delay="100ms", max_deliver=5, ack_wait="5s"),
                # Every poison call fails: its breaker would open for longer
                # and longer (5s doubling) and keep the last poison jobs
                # waiting; the faults here are the servers', so it stays shut.
                "poison": run.noop_service(fail_attempts=1000, max_deliver=2, backoff="100ms",
                                           ack_wait="5s", breaker_window=1000,
                                           breaker_min_calls=1000),
            },
            consumer={"max_in_flight": 16},
            stream={"replicas": 3},
            nats={"reconnect_wait": "250ms", "request_timeout": "2s"},
            publisher={"timeout": "2s", "max_pending": 256})
        procs = run.start_consumers(2)
        nc = run.client()
        self.assertEqual(nc.stream_info("JOBS")["config"]["num_replicas"], 3)
        self.assertEqual(nc.stream_info("JOBS_DLQ")["config"]["num_replicas"], 3)
        cl.wait_stream_leader("JOBS", 60, current=True)
        problems = []

        # ---- 1. kill -9 the JOBS leader while a publisher streams jobs in
        jobs1 = cluster_jobs(n1, "c1", poison_every)
        pub = run.publish_paced(jobs1, size(400, 200), name="publisher-paced")
        jh.wait_for(lambda: pub.written >= len(jobs1) // 3, 120,
                    "a third of the jobs written to the publisher", procs=procs)
        busy = sum(run.pending())
        leader = cl.stream_leader("JOBS")
        dlq_leader = cl.stream_leader("JOBS_DLQ")
        t_kill = time.monotonic()
        cl.kill9(leader)
        new_leader = cl.wait_stream_leader("JOBS", 60, exclude=(leader,))
        elect_s = time.monotonic() - t_kill
        if busy == 0:
            problems.append("nothing was pending or in flight when the leader was killed")
        # The killed node comes back and catches up (a later quorum loss
        # must take two nodes, not one).
        cl.start_node(leader)
        cl.wait_stream_leader("JOBS", 120, current=True)
        pub.join(300)
        if pub.is_alive():
            self.fail("the paced publisher did not finish")
        cp, summary = pub.result
        pub_rc = cp.returncode
        pub_failed = summary["failed"] if summary else len(jobs1)
        # The publisher names only its first failures: publish the whole
        # batch again by id; the duplicate window keeps every job once.
        republish_tries = 0
        if pub_rc != 0 or pub_failed:
            republish_tries, _ = self.republish_until_clean(run, jobs1, 120, "republish1")

        # ---- 2. a fresh backlog, then two of three nodes stop: no quorum
        jobs2 = cluster_jobs(n2, "c2", poison_every)
        run.publish(jobs2)
        pend, ack_pend = run.pending()
        if pend == 0:
            problems.append("no backlog when the quorum was lost (pending %d, ack pending %d)"
                            % (pend, ack_pend))
        leader2 = cl.stream_leader("JOBS")
        down = [leader2] + [n for n in ("n1", "n2", "n3") if n != leader2][:1]
        survivor = next(n for n in ("n1", "n2", "n3") if n not in down)
        dead_before = run.ledger_counts()["dead"]
        t_down = time.monotonic()
        cl.stop(down[0])   # the leader, gracefully (it hands leadership on first)
        cl.kill9(down[1])  # and a follower crashes
        run.close_client()
        c = run.ledger_counts()
        left_at_outage = len(run.jobs) - c["succeeded"] - c["dead"]
        if left_at_outage <= 0:
            problems.append("every job was settled before the quorum was lost")
        # A publish without quorum must fail (exit 1), not be half stored.
        nq = Job("nq-000001", "work", "normal", payload={"n": -1})
        env = {"JETFLEET_NATS_URL": cl.nodes[survivor].url}
        try:
            nq_cp = self.progs.run_publisher(
                ["--config", cfg, "--no-provision", "publish", "--service", "work", "--type", "t",
                 "--id", nq.id, '{"n":-1}'], timeout=60, env=env)
            nq_rc = nq_cp.returncode
        except subprocess.TimeoutExpired:
            nq_rc = "timeout"
        if nq_rc != 1:
            problems.append("a publish without quorum exited %r, expected 1" % nq_rc)

        # The consumers ride it out: running, nothing dead-lettered that is
        # not poison, nothing acknowledged meanwhile is lost (checked at the end).
        def work_dead_letters():
            return self.count_logs(procs, "dead-lettered", lambda l: l.get("service") != "poison")
        deadline = t_down + outage_s
        while time.monotonic() < deadline:
            gone = [p.jf_name for p in procs if p.poll() is not None]
            if gone:
                problems.append("consumers exited during the quorum loss: %s" % gone)
                break
            time.sleep(0.2)
        dl_work = work_dead_letters()
        if dl_work:
            problems.append("%d non-poison jobs dead-lettered during the quorum loss" % dl_work)
        c = run.ledger_counts()
        settled_in_outage = c["succeeded"] + c["dead"] - (len(run.jobs) - left_at_outage)
        for n in down:
            cl.start_node(n)
        t_up = time.monotonic()
        cl.wait_formed(120)
        cl.wait_stream_leader("JOBS", 120)
        cl.wait_stream_leader("JOBS_DLQ", 120)
        regain_s = time.monotonic() - t_up
        nq_tries, _ = self.republish_until_clean(run, [nq], 120, "nq")

        settled = run.wait_settled(size(300, 180), procs=procs)
        recovered_s = time.monotonic() - t_up
        if settled:
            dead_work = run.pg.scalar("SELECT count(*) FROM jetfleet_jobs WHERE status = 'dead' "
                                      "AND service <> 'poison'")
            if int(dead_work):
                problems.append("%s work jobs dead in the ledger" % dead_work)
        reconnects = self.count_logs(procs, "nats reconnected")
        run.finish(extra={
            "leader_killed": leader, "dlq_leader": dlq_leader, "new_leader": new_leader,
            "elect_s": elect_s, "pub_failed": pub_failed, "republish": republish_tries,
            "quorum_down": "+".join(down), "outage_s": outage_s, "nq_refused": int(nq_rc == 1),
            "nq_republish": nq_tries,
            "regain_s": regain_s, "recovered_s": recovered_s, "dead_before_outage": dead_before,
            "left_at_outage": left_at_outage, "settled_in_outage": settled_in_outage,
            "reconnects": reconnects}, problems=problems)


if __name__ == "__main__":
    unittest.main()
