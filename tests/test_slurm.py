"""
The SLURM handler and what it is built on (L{everest_agent.handlers.command},
L{everest_agent.handlers.batch}).

 - Unit tests: a fake clock (L{MemoryReactorClock}) and a fake command
   runner that plays SLURM (L{FakeSlurm}); no real time, no real process.
 - Parser tests on output samples in C{tests/data}.
 - L{RealSlurmTests}: the handler against the real single-node SLURM that
   C{.ci/setup-slurm.sh} starts; skipped (saying why) when there is none.
"""

import os
import shutil
import subprocess
import sys
import uuid
from types import SimpleNamespace

from twisted.application.service import IService
from twisted.internet import defer, error, reactor as global_reactor, task
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from everest_agent import jobscript
from everest_agent.handlers import batch, command, slurm
from everest_agent.handlers.batch import QUEUED, RUNNING, SubmitError
from everest_agent.handlers.command import CommandError, CommandTimeout, run_command
from everest_agent.handlers.slurm import SlurmTaskHandler
from everest_agent.interfaces import IJob, ITaskHandler, JobRequest, JobResult

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def data(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return f.read()


class FakeRun:
    """
    Stands in for L{run_command}: records every command and answers by the
    program's name from C{self.programs} (name -> function(argv, stdin)
    returning C{(out, err, code)} or a Deferred, or raising
    L{CommandError}).  A program it does not know is "not found".
    """

    def __init__(self):
        self.calls = []
        self.programs = {}

    def __call__(self, reactor, argv, stdin=None, timeout=None, env=None):
        self.calls.append(list(argv))
        program = self.programs.get(os.path.basename(argv[0]))
        if program is None:
            return defer.fail(CommandError(argv, f"{argv[0]}: command not found"))
        try:
            answer = program(list(argv), stdin)
        except CommandError as e:
            return defer.fail(e)
        return answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

    def of(self, name):
        return [argv for argv in self.calls if os.path.basename(argv[0]) == name]


def option(argv, name):
    """The value of C{--name=value} or C{name value} in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


class FakeSlurm:
    """
    A SLURM controller in memory, behind L{FakeRun}: C{sbatch}, C{squeue},
    C{sacct}, C{scancel}, C{sinfo}, with the quirks the real one has (a
    single forgotten id makes squeue fail; several are left out).

    @ivar jobs: job id -> dict(name, state, reason, user, directory).
    @ivar forgotten: ids squeue no longer knows (accounting may).
    @ivar accounting: None (no database: plain sacct fails), or "db".
    @ivar completion: True if C{sacct --completion} works.
    """

    def __init__(self, run):
        self.run = run
        self.jobs = {}
        self.forgotten = set()
        self.next_id = 100
        self.accounting = None
        self.completion = True
        self.sinfo_out = "debug*|up|1/3/0/4|8/24/0/32\n"
        run.programs.update(
            sbatch=self.sbatch, squeue=self.squeue, sacct=self.sacct, scancel=self.scancel, sinfo=self.sinfo
        )

    def add(self, name, state="PENDING", user="everest", directory=None, reason="None"):
        job_id = str(self.next_id)
        self.next_id += 1
        self.jobs[job_id] = dict(name=name, state=state, reason=reason, user=user, directory=directory)
        return job_id

    def set(self, job_id, state, exit_code=None, reason="None"):
        job = self.jobs[job_id]
        job["state"] = state
        job["reason"] = reason
        if exit_code is not None:
            write_exit_code(job["directory"], exit_code)

    def forget(self, job_id):
        self.forgotten.add(job_id)

    def sbatch(self, argv, stdin):
        job_id = self.add(option(argv, "--job-name"), directory=option(argv, "--chdir"))
        return f"{job_id}\n", "", 0

    def line(self, job_id):
        job = self.jobs[job_id]
        return f"{job_id}|{job['state']}|{job['reason']}|{job['name']}\n"

    def squeue(self, argv, stdin):
        ids = option(argv, "-j")
        name = option(argv, "--name")
        user = option(argv, "-u")
        if ids is not None:
            ids = ids.split(",")
            known = [i for i in ids if i in self.jobs and i not in self.forgotten]
            if len(ids) == 1 and not known:
                return "", "slurm_load_jobs error: Invalid job id specified\n", 1
            return "".join(self.line(i) for i in known), "", 0
        out = ""
        for job_id, job in self.jobs.items():
            if job_id in self.forgotten or (name and job["name"] != name) or (user and job["user"] != user):
                continue
            out += self.line(job_id)
        return out, "", 0

    def sacct(self, argv, stdin):
        completion = "--completion" in argv
        if completion and not self.completion:
            return "", "sacct: error: no job completion log\n", 1
        if not completion and self.accounting != "db":
            return "", "Slurm accounting storage is disabled\n", 1
        ids = option(argv, "-j")
        name = option(argv, "--name")
        out = ""
        for job_id, job in self.jobs.items():
            if ids is not None and job_id not in ids.split(","):
                continue
            if name and not completion and job["name"] != name:
                continue  # the completion log ignores --name
            if job["state"] in ("PENDING", "RUNNING"):
                continue
            state = job["state"] + (" by 0" if job["state"] == "CANCELLED" and not completion else "")
            out += f"{job_id}|{state}|0:0|{job['name']}\n"
        return out, "", 0

    def scancel(self, argv, stdin):
        for job_id in argv[1:]:
            if job_id in self.jobs:
                self.jobs[job_id]["state"] = "CANCELLED"
        return "", "", 0

    def sinfo(self, argv, stdin):
        return self.sinfo_out, "", 0


def write_exit_code(directory, code):
    os.makedirs(os.path.join(directory, jobscript.STATE_DIR), exist_ok=True)
    with open(os.path.join(directory, jobscript.EXIT_CODE_FILE), "w") as f:
        f.write(f"{code}\n")


class HandlerTestMixin:
    """A SLURM handler on a fake clock and a fake SLURM."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.run = FakeRun()
        self.slurm = FakeSlurm(self.run)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.handler = self.make_handler()
        self.handler.startService()
        self.addCleanup(self.handler.stopService)

    def make_handler(self, **kwargs):
        kwargs.setdefault("poll_interval", 10)
        kwargs.setdefault("user", "everest")
        return SlurmTaskHandler(self.clock, run=self.run, **kwargs)

    def request(self, task_id="t1", command="true", environment=None, **requirements):
        directory = os.path.join(self.base, task_id)
        os.makedirs(directory, exist_ok=True)
        return JobRequest(task_id, directory, command, environment or {"EVEREST_TASK_ID": task_id}, requirements)

    def submit(self, task_id="t1", **requirements):
        return self.successResultOf(self.handler.submit(self.request(task_id, **requirements)))

    def poll(self):
        self.clock.advance(self.handler.poll_interval)


class InterfaceTests(HandlerTestMixin, SynchronousTestCase):
    def test_provides(self):
        verifyObject(ITaskHandler, self.handler)
        verifyObject(IService, self.handler)
        self.assertEqual(self.handler.name, "slurm")
        job = self.submit()
        verifyObject(IJob, job)
        self.assertTrue(job.batch)
        self.assertEqual(job.job_id, "100")

    def test_slots_needed(self):
        self.assertEqual(self.handler.slots_needed({}), 1)
        self.assertEqual(self.handler.slots_needed({"nodes": 4, "coresPerNode": 32, "timeLimit": 3600}), 1)
        for bad in ({"nodes": 0}, {"coresPerNode": -1}, {"timeLimit": "60"}, {"nodes": 1.5}, {"memoryPerCore": True}):
            self.assertRaises(ValueError, self.handler.slots_needed, bad)

    def test_from_config(self):
        config = SimpleNamespace(
            agent=SimpleNamespace(work_dir=self.base),
            handler=SimpleNamespace(
                type="slurm",
                poll_interval=7.0,
                command_timeout=30.0,
                max_submit=4,
                extra_args=["--exclusive"],
                partition="long",
                account="proj1",
                qos="high",
                cores_as="cpus",
            ),
        )
        handler = SlurmTaskHandler.from_config(config, self.clock)
        self.assertEqual(
            (handler.poll_interval, handler.command_timeout, handler.max_submit, handler.extra_args),
            (7.0, 30.0, 4, ["--exclusive"]),
        )
        self.assertEqual((handler.partition, handler.account, handler.qos, handler.cores_as), ("long", "proj1", "high", "cpus"))
        self.assertIs(handler.reactor, self.clock)

    def test_from_config_file(self):
        from everest_agent import config as config_module
        from everest_agent.handlers import make_handler

        path = os.path.join(self.base, "agent.ini")
        with open(path, "w") as f:
            f.write(
                "[platform]\nurl = ws://127.0.0.1:1/agent\ntoken = secret\n"
                "[handler]\ntype = slurm\npartition = long\ncores_as = cpus\nextra_args = --exclusive -C ib\n"
            )
        os.chmod(path, 0o600)
        handler = make_handler(config_module.load(path), self.clock)
        self.assertIsInstance(handler, SlurmTaskHandler)
        self.assertEqual((handler.partition, handler.cores_as, handler.extra_args), ("long", "cpus", ["--exclusive", "-C", "ib"]))
        self.assertEqual((handler.poll_interval, handler.max_submit), (10.0, 16))

    def test_commands_configurable(self):
        handler = self.make_handler(commands={"status": "/opt/fake/squeue"})
        self.assertEqual(handler.commands["status"], "/opt/fake/squeue")
        self.assertEqual(handler.commands["submit"], "sbatch")
        self.assertRaises(ValueError, self.make_handler, commands={"nonsense": "x"})


class SubmitTests(HandlerTestMixin, SynchronousTestCase):
    def test_options(self):
        handler = self.make_handler(partition="long", account="proj1", qos="high", extra_args=["--exclusive"])
        request = self.request("t-9", nodes=2, coresPerNode=4, memoryPerCore=1000.5, timeLimit=90)
        job = self.successResultOf(handler.submit(request))
        argv = self.run.of("sbatch")[0]
        script = os.path.join(request.directory, ".everest", "job.sh")
        output = os.path.join(request.directory, ".everest", "job.out")
        self.assertEqual(
            argv,
            [
                "sbatch",
                "--parsable",
                "--job-name=t-9",
                f"--chdir={request.directory}",
                f"--output={output}",
                f"--error={output}",
                "--nodes=2",
                "--ntasks-per-node=4",
                "--mem-per-cpu=1001M",
                "--time=2",
                "--partition=long",
                "--account=proj1",
                "--qos=high",
                "--exclusive",
                script,
            ],
        )
        with open(script) as f:
            self.assertEqual(f.read(), jobscript.job_script(request))
        self.assertEqual(job.job_id, "100")
        self.assertEqual(handler.jobs, {"100": job})

    def test_cores_as_cpus(self):
        handler = self.make_handler(cores_as="cpus")
        self.successResultOf(handler.submit(self.request(coresPerNode=8)))
        argv = self.run.of("sbatch")[0]
        self.assertIn("--ntasks-per-node=1", argv)
        self.assertIn("--cpus-per-task=8", argv)

    def test_minimal(self):
        self.submit()
        argv = self.run.of("sbatch")[0]
        self.assertFalse([a for a in argv if a.startswith(("--nodes", "--time", "--mem", "--partition"))])

    def test_parsable_output(self):
        parse = self.handler.parse_submit_output
        self.assertEqual(parse("4242\n"), "4242")
        self.assertEqual(parse("4242;cluster2\n"), "4242")
        self.assertEqual(parse("sbatch: warning: something\n77\n"), "77")
        for bad in ("", "Submitted batch job\n", "abc\n"):
            self.assertRaises(ValueError, parse, bad)

    def test_refused(self):
        self.run.programs["sbatch"] = lambda argv, stdin: (
            "",
            "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
            1,
        )
        failure = self.failureResultOf(self.handler.submit(self.request()), SubmitError)
        self.assertEqual(
            str(failure.value),
            "submission failed: sbatch exited with status 1: sbatch: error: Batch job submission failed: "
            "Invalid partition name specified",
        )
        # It looked for a job of that name before giving up.
        self.assertEqual(len(self.run.of("squeue")), 1)
        self.assertEqual(self.handler.jobs, {})

    def test_timeout_but_submitted(self):
        """sbatch hung and was killed, but the controller had taken the job."""

        def hung(argv, stdin):
            self.slurm.add(option(argv, "--job-name"), directory=option(argv, "--chdir"))
            raise CommandTimeout(argv, "sbatch did not finish within 60 s; killed it")

        self.run.programs["sbatch"] = hung
        job = self.successResultOf(self.handler.submit(self.request()))
        self.assertEqual(job.job_id, "100")
        self.assertEqual(job.phase, QUEUED)
        self.assertIn("100", self.handler.jobs)

    def test_no_job_id_printed(self):
        self.run.programs["sbatch"] = lambda argv, stdin: ("\n", "", 0)
        failure = self.failureResultOf(self.handler.submit(self.request()), SubmitError)
        self.assertIn("printed no job id", str(failure.value))

    def test_bad_environment(self):
        request = self.request(environment={"A=B": "x"})
        failure = self.failureResultOf(self.handler.submit(request), SubmitError)
        self.assertIn("cannot write the job script", str(failure.value))
        self.assertEqual(self.run.of("sbatch"), [])

    def test_max_submit(self):
        handler = self.make_handler(max_submit=2)
        pending = []
        self.run.programs["sbatch"] = lambda argv, stdin: pending.append(defer.Deferred()) or pending[-1]
        results = [handler.submit(self.request(f"t{i}")) for i in range(5)]
        self.assertEqual(len(pending), 2)
        pending[0].callback(("500\n", "", 0))
        self.assertEqual(len(pending), 3)
        for i, d in enumerate(pending[1:], start=501):
            d.callback((f"{i}\n", "", 0))
        self.assertEqual(len(pending), 5)
        pending[3].callback(("503\n", "", 0))
        pending[4].callback(("504\n", "", 0))
        self.assertEqual([self.successResultOf(d).job_id for d in results], ["500", "501", "502", "503", "504"])


class PollTests(HandlerTestMixin, SynchronousTestCase):
    def test_polls_are_timed_from_their_start(self):
        """A slow poll does not stretch the interval between polls."""
        self.submit("t0")
        slow = self.run.programs["squeue"]

        def takes_three_seconds(argv, stdin):
            self.clock.advance(3)
            return slow(argv, stdin)

        self.run.programs["squeue"] = takes_three_seconds
        self.poll()
        (call,) = [c for c in self.clock.getDelayedCalls() if c.active()]
        self.assertEqual(call.getTime() - self.clock.seconds(), 10 - 3)

    def test_one_timer_one_squeue_per_chunk(self):
        self.handler.chunk_size = 300  # small chunks, to see several
        jobs = [self.submit(f"t{i}") for i in range(650)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.poll()
        calls = self.run.of("squeue")
        self.assertEqual(len(calls), 3)
        self.assertEqual([len(option(argv, "-j").split(",")) for argv in calls], [300, 300, 50])
        self.assertEqual(sorted(i for argv in calls for i in option(argv, "-j").split(",")), sorted(j.job_id for j in jobs))
        self.assertEqual(calls[0][:5], ["squeue", "-h", "-t", "all", "-j"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.poll()
        self.assertEqual(len(self.run.of("squeue")), 6)

    def test_no_jobs_no_query(self):
        self.poll()
        self.poll()
        self.assertEqual(self.run.calls, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_queued_running_done(self):
        job = self.submit()
        self.poll()
        self.assertEqual(job.phase, QUEUED)
        self.assertNoResult(job.running)
        self.slurm.set(job.job_id, "RUNNING")
        self.poll()
        self.assertEqual(job.phase, RUNNING)
        self.successResultOf(job.running)
        self.assertNoResult(job.result)
        self.slurm.set(job.job_id, "COMPLETED", exit_code=0)
        self.poll()
        self.assertEqual(self.successResultOf(job.result), JobResult(0))
        self.assertEqual(self.handler.jobs, {})
        self.poll()
        self.assertEqual(len(self.run.of("squeue")), 3)

    def test_exit_code_file_decides(self):
        cases = [("COMPLETED", 0, JobResult(0)), ("FAILED", 3, JobResult(3, "exit code 3")),
                 ("COMPLETED", 2, JobResult(2, "exit code 2"))]
        jobs = []
        for i, (state, code, _) in enumerate(cases):
            job = self.submit(f"t{i}")
            self.slurm.set(job.job_id, state, exit_code=code)
            jobs.append(job)
        self.poll()
        for job, (_, _, expected) in zip(jobs, cases):
            self.assertEqual(self.successResultOf(job.result), expected)
            # It ran: running fired before the result.
            self.successResultOf(job.running)

    def test_failure_states(self):
        expected = {
            "TIMEOUT": "TIMEOUT: time limit of 60 s exceeded",
            "OUT_OF_MEMORY": "OUT_OF_MEMORY: the job exceeded its memory limit",
            "NODE_FAIL": "NODE_FAIL: a node running the job failed (reason: NodeDown)",
            "PREEMPTED": "PREEMPTED: the scheduler preempted the job",
            "BOOT_FAIL": "BOOT_FAIL: a node allocated to the job failed to boot",
            "DEADLINE": "DEADLINE: the job reached its deadline before it could finish",
            "CANCELLED": "CANCELLED by someone else (scancel outside the agent)",
            "REVOKED": "REVOKED: the job was revoked (it runs on another cluster of a federation)",
            "SPECIAL_EXIT": "SPECIAL_EXIT: the scheduler held the job after a special exit",
        }
        jobs = {}
        for state in expected:
            job = self.submit(f"t-{state}", timeLimit=60)
            reason = "NodeDown" if state == "NODE_FAIL" else "None"
            # A killed command may even have left an exit code (137 after SIGKILL).
            self.slurm.set(job.job_id, state, exit_code=137 if state == "OUT_OF_MEMORY" else None, reason=reason)
            jobs[state] = job
        self.poll()
        results = {state: self.successResultOf(job.result) for state, job in jobs.items()}
        for state, reason in expected.items():
            self.assertEqual(results[state].reason, reason)
            self.assertFalse(results[state].canceled)
            self.assertFalse(results[state].succeeded)
        self.assertEqual(results["OUT_OF_MEMORY"].exit_code, 137)
        self.assertIsNone(results["TIMEOUT"].exit_code)

    def test_timeout_without_time_limit(self):
        job = self.submit()
        self.slurm.set(job.job_id, "TIMEOUT")
        self.poll()
        self.assertEqual(
            self.successResultOf(job.result).reason,
            "TIMEOUT: the job's time limit (the scheduler's default) was exceeded",
        )

    def test_active_states(self):
        for state in sorted(slurm.QUEUED_STATES | slurm.RUNNING_STATES):
            job = self.submit(f"t-{state}")
            self.slurm.set(job.job_id, state)
            self.poll()
            self.assertNoResult(job.result)
            if state in slurm.RUNNING_STATES:
                self.assertEqual(job.phase, RUNNING, state)
                self.successResultOf(job.running)
            else:
                self.assertEqual(job.phase, QUEUED, state)
                self.assertNoResult(job.running)

    def test_unknown_state_logged_and_active(self):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        job = self.submit()
        self.slurm.set(job.job_id, "WEIRD_NEW_STATE")
        self.poll()
        self.assertNoResult(job.result)
        self.assertIn(job.job_id, self.handler.jobs)
        warned = [e for e in events if e.get("state") == "WEIRD_NEW_STATE"]
        self.assertEqual(len(warned), 1)
        self.assertEqual((warned[0]["job_id"], warned[0]["task_id"]), (job.job_id, "t1"))
        self.slurm.set(job.job_id, "COMPLETED", exit_code=0)
        self.poll()
        self.assertTrue(self.successResultOf(job.result).succeeded)

    def test_left_queue_before_first_poll(self):
        job = self.submit()
        write_exit_code(job.request.directory, 0)
        self.slurm.set(job.job_id, "COMPLETED")
        self.slurm.forget(job.job_id)
        ran = []
        job.running.addCallback(lambda _: ran.append(job.result.called))
        self.poll()
        self.assertEqual(self.successResultOf(job.result), JobResult(0))
        self.assertEqual(ran, [False])  # running fired first
        # squeue failed for the single forgotten id; that was an answer.
        self.assertEqual(len(self.run.of("squeue")), 1)

    def test_left_queue_accounting_says_why(self):
        self.slurm.accounting = "db"
        job = self.submit(timeLimit=120)
        self.slurm.set(job.job_id, "TIMEOUT")
        self.slurm.forget(job.job_id)
        self.poll()
        self.assertEqual(self.successResultOf(job.result).reason, "TIMEOUT: time limit of 120 s exceeded")
        self.assertEqual(self.run.of("sacct")[0][:6], ["sacct", "-n", "-P", "-X", "-j", job.job_id])

    def test_sacct_falls_back_to_completion_log_and_remembers(self):
        first, second = self.submit("a"), self.submit("b")
        self.slurm.set(first.job_id, "NODE_FAIL")
        self.slurm.forget(first.job_id)
        self.poll()
        self.slurm.set(second.job_id, "NODE_FAIL")
        self.assertEqual(self.successResultOf(first.result).reason, "NODE_FAIL: a node running the job failed")
        self.assertEqual([argv[1] for argv in self.run.of("sacct")], ["-n", "--completion"])
        self.slurm.forget(second.job_id)
        self.poll()
        self.assertEqual(self.successResultOf(second.result).reason, "NODE_FAIL: a node running the job failed")
        self.assertEqual([argv[1] for argv in self.run.of("sacct")], ["-n", "--completion", "--completion"])

    def test_left_queue_without_trace_waits_then_fails(self):
        self.slurm.completion = False
        job = self.submit()
        self.slurm.forget(job.job_id)
        self.poll()
        self.poll()
        self.assertNoResult(job.result)  # the file may be late on a shared file system
        self.poll()
        result = self.successResultOf(job.result)
        self.assertIsNone(result.exit_code)
        self.assertEqual(
            result.reason,
            "the job left the queue without recording an exit status, and the scheduler keeps no record "
            "of why (see .everest/job.out)",
        )

    def test_late_exit_code_file(self):
        job = self.submit()
        self.slurm.set(job.job_id, "COMPLETED")
        self.poll()
        self.assertNoResult(job.result)
        write_exit_code(job.request.directory, 0)
        self.poll()
        self.assertTrue(self.successResultOf(job.result).succeeded)

    def test_cd_failed(self):
        self.slurm.accounting = "db"
        job = self.submit()
        self.slurm.set(job.job_id, "FAILED")
        self.slurm.forget(job.job_id)
        self.run.programs["sacct"] = lambda argv, stdin: (f"{job.job_id}|FAILED|90:0|t1\n", "", 0)
        for _ in range(3):
            self.poll()
        result = self.successResultOf(job.result)
        self.assertEqual(result.exit_code, 90)
        self.assertEqual(result.reason, "the job could not enter the task directory (see .everest/job.out)")

    def test_garbage_exit_code_file(self):
        job = self.submit()
        os.makedirs(os.path.join(job.request.directory, ".everest"), exist_ok=True)
        with open(os.path.join(job.request.directory, jobscript.EXIT_CODE_FILE), "w") as f:
            f.write("what\n")
        self.slurm.set(job.job_id, "COMPLETED")
        self.poll()
        result = self.successResultOf(job.result)
        self.assertIsNone(result.exit_code)
        self.assertIn("exit status is unreadable", result.reason)

    def test_squeue_failing_changes_nothing(self):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        running, done = self.submit("a"), self.submit("b")
        self.slurm.set(running.job_id, "RUNNING")
        self.poll()
        self.assertEqual(running.phase, RUNNING)
        self.slurm.set(done.job_id, "COMPLETED", exit_code=0)
        self.slurm.set(running.job_id, "TIMEOUT")
        real = self.run.programs["squeue"]
        failures = iter(
            [
                lambda argv, stdin: ("", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", 1),
                lambda argv, stdin: (_ for _ in ()).throw(CommandTimeout(argv, "squeue did not finish within 60 s; killed it")),
                lambda argv, stdin: ("garbage without bars\n", "", 0),
            ]
        )
        for fail in failures:
            self.run.programs["squeue"] = fail
            self.poll()
            self.assertNoResult(done.result)
            self.assertNoResult(running.result)
            self.assertEqual((running.phase, done.phase), (RUNNING, QUEUED))
            self.assertEqual(len(self.handler.jobs), 2)
        self.assertEqual(len([e for e in events if "Status query" in e.get("log_format", "")]), 3)
        self.run.programs["squeue"] = real
        self.poll()
        self.assertTrue(self.successResultOf(done.result).succeeded)
        self.assertTrue(self.successResultOf(running.result).reason.startswith("TIMEOUT"))

    def test_one_chunk_failing_leaves_the_others(self):
        self.handler.chunk_size = 300
        jobs = [self.submit(f"t{i}") for i in range(400)]
        for job in jobs:
            self.slurm.set(job.job_id, "COMPLETED", exit_code=0)
        real = self.run.programs["squeue"]
        calls = []

        def second_chunk_fails(argv, stdin):
            calls.append(argv)
            if len(calls) == 2:
                return "", "slurm_load_jobs error: Socket timed out on send/recv operation\n", 1
            return real(argv, stdin)

        self.run.programs["squeue"] = second_chunk_fails
        self.poll()
        done = [job for job in jobs if job.result.called]
        self.assertEqual(len(done), 300)
        self.assertEqual(len(self.handler.jobs), 100)
        self.poll()
        self.assertEqual(self.handler.jobs, {})

    def test_squeue_failing_for_several_ids_is_a_failure(self):
        a, b = self.submit("a"), self.submit("b")
        self.slurm.forget(a.job_id)
        self.slurm.forget(b.job_id)
        self.run.programs["squeue"] = lambda argv, stdin: ("", "slurm_load_jobs error: Invalid job id specified\n", 1)
        self.poll()
        self.assertEqual(self.run.of("sacct"), [])
        self.assertEqual(len(self.handler.jobs), 2)

    def test_stop_keeps_jobs(self):
        job = self.submit()
        self.successResultOf(self.handler.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.run.of("scancel"), [])
        self.assertNoResult(job.result)
        self.assertEqual(self.slurm.jobs[job.job_id]["state"], "PENDING")


class FileWorkOffTheReactorTests(HandlerTestMixin, SynchronousTestCase):
    """Job scripts and exit-code files go through the handler's IFileIO."""

    def setUp(self):
        super().setUp()
        from everest_agent.fsio import StallingFileIO, reactor_thread_guard

        self.files = StallingFileIO(self.clock, delay=2.0)
        self.handler.use_files(self.files)
        guard = reactor_thread_guard(self.files)
        self.patch(jobscript, "write_job_script", guard(jobscript.write_job_script))
        self.patch(jobscript, "read_exit_code", guard(jobscript.read_exit_code))
        self.patch(jobscript, "job_started", guard(jobscript.job_started))
        self.handler.use_files(self.files)  # again, to take the guarded functions

    def test_burst_of_submissions_one_hop(self):
        ds = [self.handler.submit(self.request(f"t{i}")) for i in range(10)]
        self.clock.advance(0)
        self.assertEqual(self.files.calls, 1)
        for d in ds:
            self.assertNoResult(d)
        self.clock.advance(2.0)
        jobs = [self.successResultOf(d) for d in ds]
        self.assertEqual(len({job.job_id for job in jobs}), 10)

    def test_exit_codes_of_one_poll_in_one_hop(self):
        ds = [self.handler.submit(self.request(f"t{i}")) for i in range(50)]
        for _ in range(4):  # max_submit at a time
            self.clock.advance(0)
            self.clock.advance(2.0)
        jobs = [self.successResultOf(d) for d in ds]
        for n, job in enumerate(jobs):
            self.slurm.set(job.job_id, "COMPLETED", exit_code=n % 3)
            write_exit_code(job.request.directory, n % 3)
        calls = self.files.calls
        self.poll()
        self.assertEqual(self.files.calls, calls + 1)  # fifty files, one hop
        self.assertNoResult(jobs[0].result)
        self.clock.advance(2.0)
        self.assertEqual([self.successResultOf(job.result).exit_code for job in jobs],
                         [n % 3 for n in range(50)])


class CancelTests(HandlerTestMixin, SynchronousTestCase):
    def test_cancel(self):
        job = self.submit()
        self.slurm.set(job.job_id, "RUNNING")
        self.poll()
        d = job.cancel()
        self.successResultOf(d)
        self.assertEqual(self.run.of("scancel"), [["scancel", job.job_id]])
        self.assertNoResult(job.result)
        self.clock.advance(0)  # a poll comes at once
        self.assertEqual(self.successResultOf(job.result), JobResult(None, "canceled", canceled=True))

    def test_cancel_of_queued_job_that_is_then_forgotten(self):
        job = self.submit()
        job.cancel()
        self.slurm.forget(job.job_id)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(job.result), JobResult(None, "canceled", canceled=True))

    def test_cancel_retried_until_it_works(self):
        job = self.submit()
        self.run.programs["scancel"] = lambda argv, stdin: ("", "scancel: error: Unable to contact slurm controller\n", 1)
        self.successResultOf(job.cancel())
        self.poll()
        self.poll()
        self.assertEqual(len(self.run.of("scancel")), 3)
        self.assertNoResult(job.result)
        self.run.programs["scancel"] = self.slurm.scancel
        self.poll()
        self.assertEqual(len(self.run.of("scancel")), 4)
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(job.result).canceled)
        self.poll()
        self.assertEqual(len(self.run.of("scancel")), 4)

    def test_cancel_says_gone(self):
        job = self.submit()
        self.run.programs["scancel"] = lambda argv, stdin: ("", f"scancel: error: Kill job error on job id {job.job_id}: Invalid job id specified\n", 1)
        job.cancel()
        self.slurm.forget(job.job_id)
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(job.result).canceled)
        self.assertEqual(len(self.run.of("scancel")), 1)

    def test_cancel_after_end(self):
        job = self.submit()
        self.slurm.set(job.job_id, "COMPLETED", exit_code=0)
        self.poll()
        self.successResultOf(job.cancel())
        self.assertEqual(self.run.of("scancel"), [])
        self.assertTrue(self.successResultOf(job.result).succeeded)

    def test_completed_after_cancel_counts_as_canceled(self):
        job = self.submit()
        job.cancel()
        self.slurm.set(job.job_id, "COMPLETED", exit_code=0)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(job.result), JobResult(0, "canceled", canceled=True))


class ReattachTests(HandlerTestMixin, SynchronousTestCase):
    def test_by_id(self):
        request = self.request()
        job_id = self.slurm.add("t1", "RUNNING", directory=request.directory)
        job = self.successResultOf(self.handler.reattach(request, job_id))
        verifyObject(IJob, job)
        self.assertEqual(job.job_id, job_id)
        self.clock.advance(0)  # polls at once
        self.successResultOf(job.running)
        self.slurm.set(job_id, "COMPLETED", exit_code=4)
        self.poll()
        self.assertEqual(self.successResultOf(job.result), JobResult(4, "exit code 4"))
        self.assertEqual(self.run.of("sbatch"), [])

    def test_by_id_ended_while_away(self):
        request = self.request()
        job_id = self.slurm.add("t1", "COMPLETED", directory=request.directory)
        write_exit_code(request.directory, 0)
        self.slurm.forget(job_id)
        job = self.successResultOf(self.handler.reattach(request, job_id))
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(job.result).succeeded)

    def test_by_name(self):
        request = self.request()
        self.slurm.add("t1", "COMPLETED", user="someone-else")
        old = self.slurm.add("t1", "COMPLETED")
        job_id = self.slurm.add("t1", "RUNNING", directory=request.directory)
        self.slurm.add("t10", "RUNNING")
        job = self.successResultOf(self.handler.reattach(request, None))
        self.assertEqual(job.job_id, job_id)
        self.assertNotEqual(job.job_id, old)
        self.successResultOf(job.running)
        argv = self.run.of("squeue")[0]
        self.assertEqual((option(argv, "--name"), option(argv, "-u")), ("t1", "everest"))
        self.assertEqual(self.run.of("sbatch"), [])
        self.slurm.set(job_id, "COMPLETED", exit_code=0)
        self.clock.advance(0)
        self.poll()
        self.assertTrue(self.successResultOf(job.result).succeeded)

    def test_by_name_in_accounting_only(self):
        request = self.request()
        job_id = self.slurm.add("t1", "COMPLETED", directory=request.directory)
        self.slurm.add("other", "COMPLETED")  # the completion log ignores --name
        self.slurm.forget(job_id)
        write_exit_code(request.directory, 0)
        job = self.successResultOf(self.handler.reattach(request, None))
        self.assertEqual(job.job_id, job_id)
        self.assertTrue(self.successResultOf(job.result).succeeded)
        self.assertEqual(self.run.of("sbatch"), [])
        sacct = self.run.of("sacct")[-1]
        self.assertIn("--name=t1", sacct)
        self.assertIn("--completion", sacct)

    def test_by_name_forgotten_but_ran(self):
        request = self.request()
        self.slurm.completion = False
        write_exit_code(request.directory, 5)
        job = self.successResultOf(self.handler.reattach(request, None))
        self.assertIsNone(job.job_id)
        self.assertEqual(self.successResultOf(job.result), JobResult(5, "exit code 5"))
        self.assertEqual(self.run.of("sbatch"), [])

    def test_by_name_never_submitted(self):
        request = self.request()
        job = self.successResultOf(self.handler.reattach(request, None))
        self.assertEqual(len(self.run.of("sbatch")), 1)
        self.assertEqual(job.job_id, "100")
        self.assertIn("100", self.handler.jobs)

    def test_by_name_retries_while_scheduler_is_down(self):
        request = self.request()
        job_id = self.slurm.add("t1", "RUNNING", directory=request.directory)
        self.run.programs["squeue"] = lambda argv, stdin: ("", "slurm_load_jobs error: Unable to contact slurm controller\n", 1)
        d = self.handler.reattach(request, None)
        self.assertNoResult(d)
        self.clock.advance(10)
        self.assertNoResult(d)
        self.run.programs["squeue"] = self.slurm.squeue
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(d).job_id, job_id)
        self.assertEqual(self.run.of("sbatch"), [])


class ResourceInfoTests(HandlerTestMixin, SynchronousTestCase):
    def test_info(self):
        a = self.submit("a")
        self.submit("b")
        self.slurm.set(a.job_id, "RUNNING")
        self.poll()
        info = self.successResultOf(self.handler.resource_info())
        self.assertEqual(
            info,
            {
                "partition": "debug",
                "state": "up",
                "nodes": {"allocated": 1, "idle": 3, "other": 0, "total": 4},
                "cpus": {"allocated": 8, "idle": 24, "other": 0, "total": 32},
                "agentJobs": {"queued": 1, "running": 1},
            },
        )
        self.assertEqual(self.run.of("sinfo"), [["sinfo", "-h", "-o", "%P|%a|%F|%C"]])

    def test_one_call_per_poll_interval(self):
        for _ in range(5):
            self.successResultOf(self.handler.resource_info())
            self.clock.advance(1)
        self.assertEqual(len(self.run.of("sinfo")), 1)
        self.clock.advance(10)
        self.successResultOf(self.handler.resource_info())
        self.assertEqual(len(self.run.of("sinfo")), 2)

    def test_concurrent_calls_share_one_command(self):
        pending = defer.Deferred()
        self.run.programs["sinfo"] = lambda argv, stdin: pending
        first, second = self.handler.resource_info(), self.handler.resource_info()
        self.assertEqual(len(self.run.of("sinfo")), 1)
        pending.callback(("debug*|up|0/1/0/1|0/2/0/2\n", "", 0))
        self.assertEqual(self.successResultOf(first)["partition"], "debug")
        self.assertEqual(self.successResultOf(second)["partition"], "debug")

    def test_partition(self):
        handler = self.make_handler(partition="long")
        self.slurm.sinfo_out = data("slurm_sinfo.txt")
        info = self.successResultOf(handler.resource_info())
        self.assertEqual(info["partition"], "long")
        self.assertEqual(self.run.of("sinfo")[0][-2:], ["-p", "long"])

    def test_failure_is_reported_not_raised(self):
        self.run.programs["sinfo"] = lambda argv, stdin: ("", "sinfo: error: Unable to contact slurm controller\n", 1)
        info = self.successResultOf(self.handler.resource_info())
        self.assertEqual(info["error"], "sinfo exited with status 1: sinfo: error: Unable to contact slurm controller")
        self.assertEqual(info["agentJobs"], {"queued": 0, "running": 0})


class ParserTests(SynchronousTestCase):
    def test_squeue_sample(self):
        statuses = slurm.parse_squeue(data("slurm_squeue.txt"))
        phases = {job_id: (s.phase, s.failure) for job_id, s in statuses.items()}
        self.assertEqual(phases["14"], (QUEUED, None))
        self.assertEqual(phases["15"], (RUNNING, None))
        self.assertEqual(phases["16"], (QUEUED, None))
        self.assertEqual(phases["17"], (RUNNING, None))
        self.assertEqual(phases["18"], (batch.ENDED, None))
        self.assertEqual(phases["19"], (batch.ENDED, None))
        for job_id, state in [("20", "TIMEOUT"), ("21", "OUT_OF_MEMORY"), ("22", "NODE_FAIL"), ("23", "PREEMPTED"),
                              ("24", "BOOT_FAIL"), ("25", "DEADLINE"), ("26", "CANCELLED"), ("29", "SPECIAL_EXIT"),
                              ("31", "REVOKED")]:
            self.assertEqual(phases[job_id], (batch.ENDED, state))
        for job_id in ("27", "30", "32", "33", "35"):
            self.assertEqual(phases[job_id][0], RUNNING)
        for job_id in ("28", "34", "36", "37"):
            self.assertEqual(phases[job_id][0], QUEUED)
        self.assertEqual(phases["38"][0], batch.UNKNOWN)
        self.assertEqual(statuses["38"].name, "name|with|bars")
        self.assertEqual(statuses["40_3"].phase, RUNNING)
        self.assertEqual(statuses["22"].detail, "reason: NodeDown")
        self.assertIsNone(statuses["20"].detail)  # TimeLimit says no more than TIMEOUT
        self.assertEqual(statuses["14"].name, "sample-pend")

    def test_sacct_database_sample(self):
        statuses = slurm.parse_sacct(data("slurm_sacct_db.txt"))
        self.assertEqual(sorted(statuses), ["1001", "1002", "1003", "1004", "1005", "1006", "1007"])
        self.assertEqual((statuses["1001"].phase, statuses["1001"].exit_code), (batch.ENDED, 0))
        self.assertEqual((statuses["1002"].failure, statuses["1002"].exit_code), (None, 3))
        self.assertEqual((statuses["1003"].failure, statuses["1003"].detail), ("TIMEOUT", "killed by signal 15"))
        self.assertEqual((statuses["1004"].failure, statuses["1004"].state), ("CANCELLED", "CANCELLED"))
        self.assertEqual(statuses["1005"].failure, "OUT_OF_MEMORY")
        self.assertEqual(statuses["1006"].failure, "NODE_FAIL")
        self.assertEqual(statuses["1007"].phase, QUEUED)
        self.assertEqual(statuses["1004"].name, "task-d")

    def test_sacct_completion_sample(self):
        statuses = slurm.parse_sacct(data("slurm_sacct_completion.txt"))
        # Job 2 is listed twice (ids restarted after a purge): the last wins.
        self.assertEqual((statuses["2"].state, statuses["2"].exit_code), ("COMPLETED", 0))
        self.assertEqual(statuses["3"].failure, "TIMEOUT")
        self.assertEqual(statuses["6"].exit_code, 2)

    def test_exit_code_field(self):
        self.assertEqual(slurm.parse_exit_code("0:0"), (0, None))
        self.assertEqual(slurm.parse_exit_code("3:0"), (3, None))
        self.assertEqual(slurm.parse_exit_code("0:9"), (None, 9))
        self.assertEqual(slurm.parse_exit_code(""), (None, None))

    def test_sinfo_sample(self):
        text = data("slurm_sinfo.txt")
        self.assertEqual(slurm.parse_sinfo(text)["partition"], "debug")
        long = slurm.parse_sinfo(text, "long")
        self.assertEqual(long["nodes"], {"allocated": 12, "idle": 30, "other": 2, "total": 44})
        self.assertEqual(long["cpus"]["total"], 1504)
        self.assertEqual(slurm.parse_sinfo(text, "gpu")["state"], "down")
        self.assertRaises(ValueError, slurm.parse_sinfo, text, "nope")
        self.assertRaises(ValueError, slurm.parse_sinfo, "")


class FakeProcess:
    def __init__(self, proto, pid=4321):
        self.proto = proto
        self.pid = pid
        self.written = []
        self.stdin_closed = False
        self.signals = []

    def write(self, data):
        self.written.append(data)

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    """A clock whose spawnProcess records the call and returns a L{FakeProcess}."""

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.spawned = []

    def spawnProcess(self, proto, executable, args=(), env=None, path=None, **kwargs):
        process = FakeProcess(proto)
        self.spawned.append((executable, list(args), env, path, process))
        proto.makeConnection(process)
        return process


def ended(process, code=0, signal=None):
    if code == 0 and signal is None:
        reason = error.ProcessDone(0)
    else:
        reason = error.ProcessTerminated(code, signal)
    process.proto.processEnded(Failure(reason))


class RunCommandTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}

    def test_output_and_status(self):
        d = run_command(self.reactor, ["sh", "-c", "x"], stdin="input", timeout=5, env=self.env)
        executable, args, env, path, process = self.reactor.spawned[0]
        if command._SETSID:
            self.assertEqual(args[0], command._SETSID)
            args = args[1:]
        self.assertEqual(args, [shutil.which("sh"), "-c", "x"])
        self.assertEqual(env, self.env)
        self.assertEqual(process.written, [b"input"])
        self.assertTrue(process.stdin_closed)
        process.proto.outReceived(b"out\xff")
        process.proto.errReceived(b"err")
        self.assertNoResult(d)
        ended(process, 3)
        self.assertEqual(self.successResultOf(d), ("out\ufffd", "err", 3))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_default_env_is_explicit(self):
        run_command(self.reactor, ["sh"], timeout=5)
        self.assertEqual(self.reactor.spawned[0][2], dict(os.environ))

    def test_timeout_kills(self):
        d = run_command(self.reactor, ["sh"], timeout=5, env=self.env)
        process = self.reactor.spawned[0][4]
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(d, CommandTimeout)
        self.assertEqual(str(failure.value), "sh did not finish within 5 s; killed it")
        self.assertEqual(process.signals, ["KILL"])
        ended(process, None, 9)  # late end: ignored

    def test_killed_by_signal(self):
        d = run_command(self.reactor, ["sh"], timeout=5, env=self.env)
        ended(self.reactor.spawned[0][4], None, 15)
        self.assertEqual(str(self.failureResultOf(d, CommandError).value), "sh was killed by signal 15")

    def test_not_found(self):
        d = run_command(self.reactor, ["no-such-program-here"], timeout=5, env=self.env)
        failure = self.failureResultOf(d, CommandError)
        self.assertIn("no-such-program-here: command not found", str(failure.value))
        self.assertEqual(self.reactor.spawned, [])

    def test_check(self):
        self.assertEqual(command.check(["x"], ("o", "e", 0)), ("o", "e"))
        e = self.assertRaises(CommandError, command.check, ["/usr/bin/squeue"], ("", "boom\nbang\n", 2))
        self.assertEqual(str(e), "squeue exited with status 2: boom bang")
        self.assertEqual(e.code, 2)


class RealRunCommandTests(TestCase):
    """run_command with real processes."""

    timeout = 20

    @defer.inlineCallbacks
    def test_real(self):
        out, err, code = yield run_command(global_reactor, ["sh", "-c", "cat; echo err >&2; exit 3"], stdin=b"hello", timeout=10)
        self.assertEqual((out, err, code), ("hello", "err\n", 3))

    @defer.inlineCallbacks
    def test_timeout_kills_the_whole_group(self):
        if command._SETSID is None:
            raise self.skipTest("no setsid program")
        pidfile = os.path.abspath(self.mktemp())
        d = run_command(global_reactor, ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
        yield self.assertFailure(d, CommandTimeout)
        with open(pidfile) as f:
            child = int(f.read())
        for _ in range(50):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            yield task.deferLater(global_reactor, 0.05, lambda: None)
        else:
            self.fail("the command's child survived the timeout")


# ----------------------------------------------------------------------
# The real SLURM.


def _real_slurm_problem():
    """Why the real SLURM tests cannot run here, or None."""
    for tool in ("sbatch", "squeue", "scancel", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"no SLURM here ({tool} not found); run .ci/setup-slurm.sh as root"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld does not answer (scontrol ping: {ping.stdout.strip() or ping.stderr.strip()})"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if not any(state.rstrip("*~#") in ("idle", "mixed", "allocated") for state in nodes):
        return f"no SLURM node takes jobs (node states: {' '.join(nodes) or 'none'})"
    return None


REAL_SLURM_PROBLEM = _real_slurm_problem()


def write_wrapper(path, body):
    """A little executable Python script standing in for a SLURM command."""
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport os, sys, time\n{body}")
    os.chmod(path, 0o755)
    return path


@defer.inlineCallbacks
def wait_for(predicate, timeout=60.0, step=0.1):
    for _ in range(int(timeout / step)):
        if predicate():
            return
        yield task.deferLater(global_reactor, step, lambda: None)
    raise AssertionError("timed out waiting")


class RealSlurmTests(TestCase):
    """
    The handler against the real SLURM (C{.ci/setup-slurm.sh}).  Polls
    every 0.2 s; every test waits for real jobs.
    """

    timeout = 120
    if REAL_SLURM_PROBLEM:
        skip = REAL_SLURM_PROBLEM

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.handlers = []
        self.job_ids = []

    def tearDown(self):
        for handler in self.handlers:
            if handler.running:
                handler.stopService()
        if self.job_ids:
            subprocess.run(["scancel"] + self.job_ids, capture_output=True)

    def handler(self, start=True, **kwargs):
        kwargs.setdefault("poll_interval", 0.2)
        kwargs.setdefault("command_timeout", 20)
        handler = SlurmTaskHandler(global_reactor, **kwargs)
        if start:
            handler.startService()
        self.handlers.append(handler)
        return handler

    def request(self, name, command, environment=None, **requirements):
        # Task ids are unique (SLURM remembers finished jobs for a while,
        # and earlier runs of these tests used the same names).
        task_id = f"{name}-{uuid.uuid4().hex[:10]}"
        directory = os.path.join(self.base, task_id)
        os.makedirs(directory, exist_ok=True)
        return JobRequest(task_id, directory, command, dict(environment or {}, EVEREST_TASK_ID=task_id), requirements)

    @defer.inlineCallbacks
    def submit(self, handler, request):
        job = yield handler.submit(request)
        self.job_ids.append(job.job_id)
        return job

    def read(self, request, name):
        with open(os.path.join(request.directory, name)) as f:
            return f.read()

    def squeue_names(self, name):
        out = subprocess.run(["squeue", "-h", "-t", "all", f"--name={name}", "-o", "%i"], capture_output=True, text=True).stdout
        return out.split()

    @defer.inlineCallbacks
    def test_success_with_quoting(self):
        handler = self.handler()
        value = "it's \"$HOME\" `date` \\n\nline two"
        request = self.request("ok", 'printf "%s|%s" "$EVEREST_TASK_ID" "$TRICKY"; pwd >&2', {"TRICKY": value})
        job = yield self.submit(handler, request)
        verifyObject(IJob, job)
        result = yield job.result
        self.assertEqual(result, JobResult(0))
        self.assertTrue(job.running.called)
        self.assertEqual(self.read(request, "stdout"), f"{request.task_id}|{value}")
        self.assertEqual(os.path.realpath(self.read(request, "stderr").strip()), os.path.realpath(request.directory))
        self.assertEqual(self.squeue_names(request.task_id), [job.job_id])

    @defer.inlineCallbacks
    def test_non_zero_exit(self):
        handler = self.handler()
        job = yield self.submit(handler, self.request("bad", "echo no >&2; exit 3", coresPerNode=1, memoryPerCore=10))
        result = yield job.result
        self.assertEqual(result, JobResult(3, "exit code 3"))

    @defer.inlineCallbacks
    def test_cancel(self):
        handler = self.handler()
        request = self.request("cancel-me", "sleep 300")
        job = yield self.submit(handler, request)
        yield job.running
        yield job.cancel()
        result = yield job.result
        self.assertTrue(result.canceled)
        self.assertEqual(result.reason, "canceled")
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", job.job_id, "-o", "%T"], capture_output=True, text=True).stdout
        self.assertIn(state.strip(), ("CANCELLED", ""))

    @defer.inlineCallbacks
    def test_cancelled_by_someone_else(self):
        handler = self.handler()
        job = yield self.submit(handler, self.request("victim", "sleep 300"))
        yield job.running
        subprocess.run(["scancel", job.job_id], check=True)
        result = yield job.result
        self.assertEqual(result.reason, "CANCELLED by someone else (scancel outside the agent)")
        self.assertFalse(result.canceled)

    @defer.inlineCallbacks
    def test_left_the_queue_before_the_first_poll(self):
        """
        The job ran and left squeue's view before the handler polled: its
        exit-code file and sacct (here the completion log) decide.  A
        squeue wrapper hides finished jobs (as squeue does after MinJobAge).
        """
        wrapper = write_wrapper(
            os.path.join(self.base, "squeue-no-history"),
            "args = sys.argv[1:]\n"
            "while '-t' in args:\n"
            "    i = args.index('-t'); del args[i:i + 2]\n"
            "os.execvp('squeue', ['squeue'] + args)\n",
        )
        calls = []

        def recording(reactor, argv, **kwargs):
            calls.append(argv)
            return run_command(reactor, argv, **kwargs)

        handler = self.handler(start=False, commands={"status": wrapper}, run=recording)
        good = self.request("quick-ok", "echo done")
        bad = self.request("quick-bad", "exit 7")
        jobs = [(yield self.submit(handler, good)), (yield self.submit(handler, bad))]
        yield wait_for(lambda: all(jobscript.read_exit_code(r.directory) is not None for r in (good, bad)))
        yield wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(j.job_id for j in jobs)],
                                                  capture_output=True, text=True).stdout.strip())
        yield handler.poll_now()
        self.assertEqual(self.successResultOf(jobs[0].result), JobResult(0))
        self.assertEqual(self.successResultOf(jobs[1].result), JobResult(7, "exit code 7"))
        # squeue had forgotten them, so accounting was asked (the completion log here).
        self.assertTrue([argv for argv in calls if argv[0] == "sacct"])

    @defer.inlineCallbacks
    def test_restart_reattaches_by_id_and_by_name(self):
        first = self.handler()
        by_id = self.request("re-id", "sleep 2; echo id")
        by_name = self.request("re-name", "sleep 2; exit 5")
        job_a = yield self.submit(first, by_id)
        job_b = yield self.submit(first, by_name)
        yield first.stopService()  # the agent stops; the jobs go on
        second = self.handler()
        again_a = yield second.reattach(by_id, job_a.job_id)
        again_b = yield second.reattach(by_name, None)
        self.assertEqual((again_a.job_id, again_b.job_id), (job_a.job_id, job_b.job_id))
        self.assertEqual((yield again_a.result), JobResult(0))
        self.assertEqual((yield again_b.result), JobResult(5, "exit code 5"))
        self.assertEqual(self.read(by_id, "stdout"), "id\n")
        # Nothing ran twice.
        self.assertEqual(self.squeue_names(by_id.task_id), [job_a.job_id])
        self.assertEqual(self.squeue_names(by_name.task_id), [job_b.job_id])
        self.assertNoResult(job_a.result)  # the stopped handler no longer polls

    @defer.inlineCallbacks
    def test_reattach_by_name_when_never_submitted(self):
        handler = self.handler()
        request = self.request("never-submitted", "echo fresh")
        job = yield handler.reattach(request, None)
        self.job_ids.append(job.job_id)
        self.assertEqual((yield job.result), JobResult(0))
        self.assertEqual(self.squeue_names(request.task_id), [job.job_id])

    @defer.inlineCallbacks
    def test_squeue_failing_then_recovering(self):
        flag = os.path.join(self.base, "fail")
        wrapper = write_wrapper(
            os.path.join(self.base, "squeue-flaky"),
            f"if os.path.exists({flag!r}):\n"
            "    if open(%r).read() == 'hang':\n" % flag
            + "        time.sleep(30)\n"
            "    sys.stderr.write('slurm_load_jobs error: Unable to contact slurm controller\\n')\n"
            "    sys.exit(1)\n"
            "os.execvp('squeue', ['squeue'] + sys.argv[1:])\n",
        )
        handler = self.handler(commands={"status": wrapper}, command_timeout=1)
        with open(flag, "w") as f:
            f.write("fail")
        request = self.request("flaky", "echo hi")
        job = yield self.submit(handler, request)
        yield wait_for(lambda: jobscript.read_exit_code(request.directory) is not None)
        polls = handler.polls
        yield wait_for(lambda: handler.polls >= polls + 3)
        self.assertNoResult(job.result)
        self.assertIsNone(job.phase)
        self.assertNoResult(job.running)
        with open(flag, "w") as f:
            f.write("hang")
        polls = handler.polls
        yield wait_for(lambda: handler.polls >= polls + 2)
        self.assertNoResult(job.result)
        os.unlink(flag)
        self.assertEqual((yield job.result), JobResult(0))

    @defer.inlineCallbacks
    def test_resource_info(self):
        handler = self.handler()
        info = yield handler.resource_info()
        self.assertIn(info["state"], ("up", "UP"))
        self.assertGreaterEqual(info["nodes"]["total"], 1)
        self.assertEqual(info["agentJobs"], {"queued": 0, "running": 0})


class RealSlurmTimeoutTests(TestCase):
    """
    timeLimit -> --time -> SLURM kills the job: slow (SLURM counts whole
    minutes and checks limits about every 30 s), hence a class of its own.
    """

    timeout = 240
    if REAL_SLURM_PROBLEM:
        skip = REAL_SLURM_PROBLEM

    @defer.inlineCallbacks
    def test_time_limit(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        handler = SlurmTaskHandler(global_reactor, poll_interval=0.5)
        handler.startService()
        self.addCleanup(handler.stopService)
        request = JobRequest("too-slow", base, "sleep 600", {"EVEREST_TASK_ID": "too-slow"}, {"timeLimit": 30})
        job = yield handler.submit(request)
        self.addCleanup(subprocess.run, ["scancel", job.job_id], capture_output=True)
        self.assertIn("--time=1", handler.submit_argv(request, "x"))
        result = yield job.result
        self.assertEqual(result.reason, "TIMEOUT: time limit of 30 s exceeded")
        self.assertFalse(result.canceled)
