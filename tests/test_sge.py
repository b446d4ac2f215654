"""
The Grid Engine handler (L{everest_agent.handlers.sge}).

 - parsers and the state table on real output (C{tests/data/sge_*}, captured
   from the single-node Son of Grid Engine of C{.ci/setup-sge.sh});
 - the handler on a fake clock against a fake C{qsub}/C{qstat}/C{qacct}/C{qdel};
 - L{RealSgeTests}: the handler against the real Grid Engine, its commands
   taken from C{SGE_BIN} (default C{/opt/gridengine/bin}); skipped, saying
   why, where there is none.
"""

import os
import subprocess
import uuid
from types import SimpleNamespace

from twisted.application.service import IService
from twisted.internet import defer, reactor as global_reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from everest_agent.handlers import sge
from everest_agent.handlers.batch import ENDED, QUEUED, RUNNING, UNKNOWN
from everest_agent.handlers.sge import SgeTaskHandler
from everest_agent.interfaces import IJob, ITaskHandler, JobRequest, JobResult
from tests import test_slurm as helpers

data = helpers.data
write_exit_code = helpers.write_exit_code


class ParserTests(SynchronousTestCase):
    def test_running_pending_array(self):
        jobs = sge.parse_qstat_xml(data("sge_qstat_running_pending_array.xml"))
        self.assertEqual(jobs["5"], ("r", "evtest1", "root"))
        self.assertEqual(jobs["6"], ("qw", "evtest2", "root"))
        self.assertEqual(jobs["7"][0], "r")  # one task runs, two wait: running
        self.assertEqual(jobs["8"][0], "hqw")
        self.assertEqual(sorted(jobs), ["5", "6", "7", "8", "9"])

    def test_errors_win_for_an_array(self):
        jobs = sge.parse_qstat_xml(data("sge_qstat_errors.xml"))
        self.assertEqual(jobs["3"][0], "Eqw")
        self.assertEqual(jobs["1"][0], "Eqw")
        self.assertEqual(jobs["4"][0], "hqw")

    def test_state_table(self):
        phases = {s: sge.sge_status("1", s).phase for s in
                  ("qw", "hqw", "hRwq", "r", "t", "Rr", "s", "S", "T", "Eqw", "dr", "dt", "zz", "", "rq")}
        self.assertEqual(phases, {
            "qw": QUEUED, "hqw": QUEUED, "hRwq": QUEUED, "r": RUNNING, "t": RUNNING, "Rr": RUNNING,
            "s": RUNNING, "S": RUNNING, "T": RUNNING, "Eqw": ENDED, "dr": ENDED, "dt": ENDED,
            "zz": UNKNOWN, "": UNKNOWN, "rq": QUEUED,
        })
        self.assertEqual(sge.sge_status("1", "Eqw").failure, "EXEC_FAILED")
        self.assertEqual(sge.sge_status("1", "dr").failure, "CANCELLED")

    def test_eqw_reason(self):
        errors = sge.parse_job_errors(data("sge_qstat_j_eqw.xml"))
        self.assertIn("can't open output file", errors["42"])

    def test_qacct_h_rt(self):
        records = sge.parse_qacct(data("sge_qacct_h_rt.txt"))
        self.assertEqual(len(records), 1)
        status = sge.qacct_status(records[0], time_limit=3)
        self.assertEqual((status.phase, status.failure), (ENDED, "TIMEOUT"))
        self.assertIn("exit_status 137", status.detail)

    def test_qacct_plain_exit_and_qdel(self):
        done = sge.qacct_status({"jobnumber": "9", "failed": "0", "exit_status": "3"})
        self.assertEqual((done.failure, done.exit_code), (None, 3))
        killed = sge.qacct_status({"jobnumber": "9", "failed": "100 : assumedly after job",
                                   "exit_status": "137", "ru_wallclock": "4s"}, time_limit=60)
        self.assertEqual(killed.failure, "KILLED")

    def test_cluster_queues(self):
        queues = sge.parse_cluster_queues(data("sge_qstat_g_c.txt"))
        self.assertEqual([q["queue"] for q in queues], ["all.q"])
        self.assertEqual(queues[0]["total"], 8)

    def test_entities_are_refused(self):
        bomb = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
                "<job_info><job_list><JB_job_number>1</JB_job_number><JB_name>&b;</JB_name>"
                "<state>r</state></job_list></job_info>")
        self.assertRaises(ValueError, sge.parse_qstat_xml, bomb)
        self.assertRaises(ValueError, sge.parse_qstat_xml, "<job_info><job_list>")
        self.assertRaises(ValueError, sge.parse_qstat_xml, "<job_info><job_list><state>r</state></job_list></job_info>")


class FakeSge:
    """A fake qsub/qstat/qacct/qdel answering from fields a test sets."""

    def __init__(self):
        self.run = helpers.FakeRun()
        self.xml = "<job_info><queue_info/><job_info/></job_info>"
        self.accounting = {}
        self.qstat_code = 0
        self.next_id = 100
        self.run.programs.update(qsub=self.qsub, qstat=self.qstat, qacct=self.qacct,
                                 qdel=lambda argv, stdin: ("", "", 0))

    def qsub(self, argv, stdin):
        self.next_id += 1
        return f"{self.next_id}\n", "", 0

    def qstat(self, argv, stdin):
        if "-j" in argv:
            return data("sge_qstat_j_eqw.xml"), "", 0
        if "-g" in argv:
            return data("sge_qstat_g_c.txt"), "", 0
        if self.qstat_code:
            return "", "error: commlib error: got select error (Connection refused)", self.qstat_code
        return self.xml, "", 0

    def qacct(self, argv, stdin):
        text = self.accounting.get(argv[-1])
        if text is None:
            return "", f"error: job id {argv[-1]} not found\n", 1
        return text, "", 0


def job_list(job_id, state, name):
    return (f"<job_list><JB_job_number>{job_id}</JB_job_number><JB_name>{name}</JB_name>"
            f"<JB_owner>everest</JB_owner><state>{state}</state></job_list>")


class HandlerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.fake = FakeSge()
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.handler = SgeTaskHandler(self.clock, run=self.fake.run, poll_interval=10, user="everest",
                                      command_dir="/opt/ge/bin")
        self.handler.startService()
        self.addCleanup(self.handler.stopService)

    def request(self, task_id="t1", command="true", **requirements):
        directory = os.path.join(self.base, task_id)
        os.makedirs(directory, exist_ok=True)
        return JobRequest(task_id, directory, command, {}, requirements)

    def listing(self, *entries):
        self.fake.xml = "<job_info><queue_info/><job_info>" + "".join(entries) + "</job_info></job_info>"

    def test_provides(self):
        verifyObject(ITaskHandler, self.handler)
        verifyObject(IService, self.handler)
        job = self.successResultOf(self.handler.submit(self.request()))
        verifyObject(IJob, job)
        self.assertEqual(job.job_id, "101")

    def test_submit_options(self):
        handler = SgeTaskHandler(self.clock, run=self.fake.run, pe="mpi", memory_complex="mem_free",
                                 queue="all.q", project="p1", extra_args=["-V"], command_dir="/opt/ge/bin")
        request = self.request("t2", nodes=1, coresPerNode=4, memoryPerCore=999.5, timeLimit=90)
        self.successResultOf(handler.submit(request))
        argv = self.fake.run.of("qsub")[-1]
        out = os.path.join(request.directory, ".everest", "job.out")
        self.assertEqual(argv, [
            "/opt/ge/bin/qsub", "-terse", "-N", "et2", "-S", "/bin/sh", "-j", "y", "-o", out,
            "-wd", request.directory, "-pe", "mpi", "4", "-l", "h_rt=00:01:30", "-l", "mem_free=1000M",
            "-q", "all.q", "-P", "p1", "-V", os.path.join(request.directory, ".everest", "job.sh"),
        ])

    def test_from_config(self):
        h = SimpleNamespace(type="sge", poll_interval=5.0, command_timeout=20.0, max_submit=3, extra_args=[],
                            command_dir="/opt/gridengine/bin", pe="smp", memory_complex="h_vmem",
                            queue="", project="")
        handler = SgeTaskHandler.from_config(SimpleNamespace(handler=h), self.clock)
        self.assertEqual(handler.command("status"), "/opt/gridengine/bin/qstat")
        self.assertEqual(handler.pe, "smp")

    def test_one_qstat_per_poll_and_success(self):
        jobs = [self.successResultOf(self.handler.submit(self.request(f"t{i}"))) for i in range(5)]
        self.listing(*(job_list(j.job_id, "r", "e" + j.task_id) for j in jobs))
        self.clock.advance(10)
        self.assertEqual(len(self.fake.run.of("qstat")), 1)
        self.assertTrue(all(j.running.called for j in jobs))
        write_exit_code(jobs[0].request.directory, 0)
        write_exit_code(jobs[1].request.directory, 3)
        self.listing(*(job_list(j.job_id, "r", "e" + j.task_id) for j in jobs[2:]))
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(jobs[0].result), JobResult(0))
        self.assertEqual(self.successResultOf(jobs[1].result), JobResult(3, "exit code 3"))
        self.assertEqual(self.fake.run.of("qacct"), [])  # the exit-code files decided

    def test_eqw_fails_with_reason_and_is_deleted(self):
        job = self.successResultOf(self.handler.submit(self.request()))
        self.listing(job_list(job.job_id, "Eqw", "et1"))
        self.fake.run.programs["qstat"] = lambda argv, stdin: (
            (data("sge_qstat_j_eqw.xml").replace("<JB_job_number>42<", f"<JB_job_number>{job.job_id}<"), "", 0)
            if "-j" in argv else (self.fake.xml, "", 0))
        self.clock.advance(10)
        result = self.successResultOf(job.result)
        self.assertIn("EXEC_FAILED", result.reason)
        self.assertIn("can't open output file", result.reason)
        self.assertEqual(self.fake.run.of("qdel")[-1][1:], [job.job_id])

    def test_deleted_by_someone_else(self):
        job = self.successResultOf(self.handler.submit(self.request()))
        self.listing(job_list(job.job_id, "dr", "et1"))
        self.clock.advance(10)
        self.assertIn("CANCELLED", self.successResultOf(job.result).reason)

    def test_gone_without_exit_code_asks_qacct(self):
        job = self.successResultOf(self.handler.submit(self.request(timeLimit=3)))
        self.fake.accounting[job.job_id] = data("sge_qacct_h_rt.txt")
        self.clock.advance(10)
        result = self.successResultOf(job.result)
        self.assertIn("TIMEOUT", result.reason)

    def test_qstat_failing_changes_nothing(self):
        job = self.successResultOf(self.handler.submit(self.request()))
        self.fake.qstat_code = 1
        self.clock.advance(10)
        self.assertFalse(job.done)
        self.assertEqual(self.handler.poll_failures, 1)
        self.fake.qstat_code = 0
        self.listing(job_list(job.job_id, "r", "et1"))
        self.clock.advance(10)
        self.assertTrue(job.running.called)

    def test_reattach_by_name(self):
        request = self.request("t9")
        self.listing(job_list("77", "qw", "et9"), job_list("78", "r", "other"))
        job = self.successResultOf(self.handler.reattach(request, None))
        self.assertEqual(job.job_id, "77")

    def test_resource_info(self):
        info = self.successResultOf(self.handler.resource_info())
        self.assertEqual(info["queues"][0]["queue"], "all.q")
        self.assertEqual(self.fake.run.of("qstat")[-1][1:], ["-g", "c"])


# ----------------------------------------------------------------------
# For real.

SGE_BIN = os.environ.get("SGE_BIN", "/opt/gridengine/bin")


def _real_sge_problem():
    qstat = os.path.join(SGE_BIN, "qstat")
    if not os.access(qstat, os.X_OK):
        return f"no Grid Engine client in {SGE_BIN} (run .ci/setup-sge.sh as root, or set SGE_BIN)"
    try:
        done = subprocess.run([qstat, "-g", "c"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{qstat} -g c does not answer: {e}"
    if done.returncode != 0:
        return f"Grid Engine does not answer: {done.stderr.strip()[:200]}"
    return None


REAL_SGE_PROBLEM = _real_sge_problem()


class RealSgeTests(TestCase):
    timeout = 120
    if REAL_SGE_PROBLEM:
        skip = REAL_SGE_PROBLEM

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.job_ids = []
        self.handlers = []

    def tearDown(self):
        for handler in self.handlers:
            if handler.running:
                handler.stopService()
        if self.job_ids:
            subprocess.run([os.path.join(SGE_BIN, "qdel")] + self.job_ids, capture_output=True)

    def handler(self, **kwargs):
        kwargs.setdefault("poll_interval", 0.5)
        kwargs.setdefault("command_timeout", 20)
        handler = SgeTaskHandler(global_reactor, command_dir=SGE_BIN, **kwargs)
        handler.startService()
        self.handlers.append(handler)
        return handler

    def request(self, name, command, **requirements):
        task_id = f"{name}-{uuid.uuid4().hex[:10]}"
        directory = os.path.join(self.base, task_id)
        os.makedirs(directory)
        return JobRequest(task_id, directory, command, {"EVEREST_TASK_ID": task_id}, requirements)

    @defer.inlineCallbacks
    def submit(self, handler, request):
        job = yield handler.submit(request)
        self.job_ids.append(job.job_id)
        return job

    @defer.inlineCallbacks
    def test_success_and_non_zero_exit_on_two_cores(self):
        handler = self.handler()
        good = self.request("ge-ok", "echo hi", coresPerNode=2, timeLimit=300)
        bad = self.request("ge-bad", "exit 3")
        jobs = [(yield self.submit(handler, good)), (yield self.submit(handler, bad))]
        self.assertEqual((yield jobs[0].result), JobResult(0))
        self.assertEqual((yield jobs[1].result), JobResult(3, "exit code 3"))
        with open(os.path.join(good.directory, "stdout")) as f:
            self.assertEqual(f.read(), "hi\n")

    @defer.inlineCallbacks
    def test_time_limit(self):
        # Accounting is written about a second after the end: wait longer
        # than two fast polls for it.
        handler = self.handler(exit_code_polls=10)
        job = yield self.submit(handler, self.request("ge-hrt", "sleep 60", timeLimit=2))
        result = yield job.result
        self.assertIsNone(result.exit_code)
        self.assertIn("TIMEOUT", result.reason)

    @defer.inlineCallbacks
    def test_cancel(self):
        handler = self.handler()
        job = yield self.submit(handler, self.request("ge-cancel", "sleep 300"))
        yield job.running
        yield job.cancel()
        self.assertTrue((yield job.result).canceled)

    @defer.inlineCallbacks
    def test_eqw(self):
        handler = self.handler(extra_args=["-o", "no/such/dir/out"])
        job = yield self.submit(handler, self.request("ge-eqw", "true"))
        result = yield job.result
        self.assertIn("EXEC_FAILED", result.reason)
        self.assertIn("no/such/dir/out", result.reason)

    @defer.inlineCallbacks
    def test_finished_before_first_poll_and_restart(self):
        first = self.handler(poll_interval=30)
        quick = self.request("ge-quick", "exit 5")
        slow = self.request("ge-slow", "sleep 3")
        job_q = yield self.submit(first, quick)
        job_s = yield self.submit(first, slow)
        yield first.stopService()
        second = self.handler()
        again_s = yield second.reattach(slow, None)  # by name
        again_q = yield second.reattach(quick, job_q.job_id)  # by id
        self.assertEqual(again_s.job_id, job_s.job_id)
        self.assertEqual((yield again_q.result), JobResult(5, "exit code 5"))
        self.assertEqual((yield again_s.result), JobResult(0))

    @defer.inlineCallbacks
    def test_qstat_failing_or_hanging(self):
        bin_dir = os.path.abspath(self.mktemp())
        os.makedirs(bin_dir)
        for name in ("qsub", "qacct", "qdel"):
            os.symlink(os.path.join(SGE_BIN, name), os.path.join(bin_dir, name))
        with open(os.path.join(bin_dir, "qstat"), "w") as f:
            f.write(f"#!/bin/sh\n[ -e {bin_dir}/hang ] && sleep 60\n[ -e {bin_dir}/fail ] && exit 1\n"
                    f"exec {SGE_BIN}/qstat \"$@\"\n")
        os.chmod(os.path.join(bin_dir, "qstat"), 0o755)
        open(os.path.join(bin_dir, "hang"), "w").close()
        handler = SgeTaskHandler(global_reactor, command_dir=bin_dir, poll_interval=0.3, command_timeout=1)
        handler.startService()
        self.handlers.append(handler)
        job = yield self.submit(handler, self.request("ge-flaky", "sleep 1"))
        yield helpers_sleep(2.5)
        os.rename(os.path.join(bin_dir, "hang"), os.path.join(bin_dir, "fail"))
        yield helpers_sleep(1)
        self.assertGreaterEqual(handler.poll_failures, 2)
        self.assertFalse(job.done)
        os.remove(os.path.join(bin_dir, "fail"))
        self.assertEqual((yield job.result), JobResult(0))

    @defer.inlineCallbacks
    def test_resource_info(self):
        info = yield self.handler(queue="all.q").resource_info()
        self.assertEqual(info["queue"], "all.q")
        self.assertGreater(info["total"], 0)


def helpers_sleep(seconds):
    from twisted.internet.task import deferLater

    return deferLater(global_reactor, seconds, lambda: None)
