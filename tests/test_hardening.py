"""
Issue 11, the file-system side: what an earlier run of a reused task id or
another local user leaves in the agent's directories.  Real links, real
FIFOs, real directories of the user C{nobody} (when running as root).
"""

import os
import pwd

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from everest_agent import check, config as agent_config, jobscript
from everest_agent.handlers.local import LocalTaskHandler
from everest_agent.interfaces import JobLost, JobRequest
from everest_agent.registry import SMALL_RECORD_KEYS


def _nobody():
    if os.geteuid() != 0:
        raise SkipTest("needs root, to make directories owned by another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise SkipTest("there is no user nobody") from None


class LeftoverLinksTests(TestCase):
    """Item 9: stdout, stderr, .everest and its exitcode planted as links."""

    timeout = 30

    def setUp(self):
        self.dir = os.path.realpath(self.mktemp())
        os.makedirs(self.dir)
        self.outside = os.path.realpath(self.mktemp())
        os.makedirs(self.outside)
        self.victim = os.path.join(self.outside, "victim")
        with open(self.victim, "w") as f:
            f.write("precious\n")
        self.handler = LocalTaskHandler(reactor, slots=2)

    def request(self, command):
        return JobRequest("t1", self.dir, command, {}, {})

    @defer.inlineCallbacks
    def test_planted_stdout_stderr_and_state_links_are_not_followed(self):
        os.symlink(self.victim, os.path.join(self.dir, "stdout"))
        os.symlink(self.victim, os.path.join(self.dir, "stderr"))
        os.symlink(self.outside, os.path.join(self.dir, ".everest"))
        job = yield self.handler.submit(self.request("echo out; echo err >&2; exit 3"))
        result = yield job.result
        self.assertEqual(result.exit_code, 3)
        with open(self.victim) as f:
            self.assertEqual(f.read(), "precious\n")
        self.assertEqual(sorted(os.listdir(self.outside)), ["victim"])
        for name, text in [("stdout", "out\n"), ("stderr", "err\n")]:
            path = os.path.join(self.dir, name)
            self.assertFalse(os.path.islink(path))
            with open(path) as f:
                self.assertEqual(f.read(), text)
        self.assertFalse(os.path.islink(os.path.join(self.dir, ".everest")))
        self.assertEqual(jobscript.read_exit_code(self.dir), 3)

    @defer.inlineCallbacks
    def test_planted_exitcode_link_is_not_read(self):
        # A task that ended while the agent was away, and a link that
        # would say it succeeded.
        os.makedirs(os.path.join(self.dir, ".everest"))
        fake = os.path.join(self.outside, "zero")
        with open(fake, "w") as f:
            f.write("0\n")
        os.symlink(fake, os.path.join(self.dir, jobscript.EXIT_CODE_FILE))
        yield self.assertFailure(self.handler.reattach(self.request("true"), None), JobLost)

    def test_fifo_exitcode_does_not_hang(self):
        os.makedirs(os.path.join(self.dir, ".everest"))
        fifo = os.path.join(self.dir, jobscript.EXIT_CODE_FILE)
        os.mkfifo(fifo)
        import threading

        outcome = []

        def read():
            try:
                outcome.append(jobscript.read_exit_code(self.dir))
            except ValueError as e:
                outcome.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)
        if reader.is_alive():  # it blocked in open(): let it go, and fail
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            reader.join()
            self.fail("reading the exit code of a FIFO blocked")
        self.assertIsInstance(outcome[0], ValueError)

    def test_job_script_written_through_no_link(self):
        os.symlink(self.outside, os.path.join(self.dir, ".everest"))
        path = jobscript.write_job_script(self.request("true"))
        self.assertEqual(sorted(os.listdir(self.outside)), ["victim"])
        self.assertTrue(os.path.isfile(path) and not os.path.islink(os.path.dirname(path)))
        with open(path) as f:
            self.assertIn("rm -f stdout stderr", f.read())

    def test_task_directory_replaced_by_a_link_is_refused(self):
        os.rmdir(self.dir)
        os.symlink(self.outside, self.dir)
        d = self.handler.submit(self.request("echo x > y"))
        failure = self.failureResultOf(d, RuntimeError)
        self.assertIn("not a directory", str(failure.value))
        self.assertEqual(sorted(os.listdir(self.outside)), ["victim"])


class DirectoryOwnershipTests(SynchronousTestCase):
    """Item 6: a work_dir or state_dir another user owns or may write in."""

    def setUp(self):
        self.base = os.path.realpath(self.mktemp())
        os.makedirs(self.base)
        self.work = os.path.join(self.base, "work")
        self.state = os.path.join(self.base, "state")

    def ini(self):
        path = os.path.join(self.base, "agent.ini")
        with open(path, "w") as f:
            f.write(f"[platform]\nurl = ws://127.0.0.1:1/\ntoken = x\n"
                    f"[agent]\nwork_dir = {self.work}\nstate_dir = {self.state}\n")
        os.chmod(path, 0o600)
        return path

    def test_world_writable_work_dir_of_another_user(self):
        nobody = _nobody()
        os.makedirs(self.work)
        os.chown(self.work, nobody.pw_uid, nobody.pw_gid)
        os.chmod(self.work, 0o777)
        problem = agent_config.check_directories(agent_config.load(self.ini()))
        self.assertIn(f"[agent] work_dir {self.work}: owned by nobody", problem)
        self.assertIn("chown", problem)
        self.assertEqual(len(problem.splitlines()), 1)

    def test_mode_0777_refused_with_chmod_fix(self):
        os.makedirs(self.state)
        os.chmod(self.state, 0o777)
        problem = agent_config.directory_problem("state_dir", self.state)
        self.assertEqual(problem, f"[agent] state_dir {self.state}: writable by group or others "
                                  f"(mode 0777); fix: chmod 700 {self.state}")

    def test_parent_writable_by_others_refused(self):
        os.chmod(self.base, 0o777)
        self.addCleanup(os.chmod, self.base, 0o755)
        problem = agent_config.directory_problem("work_dir", self.work)
        self.assertIn(f"the directory above it, {self.base}, is writable", problem)
        os.chmod(self.base, 0o1777)  # sticky, like /tmp: others cannot swap it
        self.assertIsNone(agent_config.directory_problem("work_dir", self.work))

    def test_parent_owned_by_another_user_refused(self):
        nobody = _nobody()
        os.chown(self.base, nobody.pw_uid, nobody.pw_gid)
        problem = agent_config.directory_problem("work_dir", self.work)
        self.assertIn("is owned by nobody", problem)

    def test_twistd_refuses_to_start_with_one_line(self):
        from everest_agent.tap import Options

        os.makedirs(self.work)
        os.chmod(self.work, 0o777)
        options = Options()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--config", self.ini()])
        message = str(caught.exception.code)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertIn(f"chmod 700 {self.work}", message)

    def test_agent_refuses_to_start(self):
        from everest_agent.agent import EverestAgent, UnsafeDirectory
        from everest_agent.testing import FakeTaskHandler
        from twisted.internet.task import Clock

        os.makedirs(self.state)
        os.chmod(self.state, 0o770)
        agent = EverestAgent(agent_config.load(self.ini()), Clock(), handler=FakeTaskHandler(), fsync=False)
        self.assertRaises(UnsafeDirectory, agent.startService)

    def test_check_says_the_same(self):
        os.makedirs(self.work)
        os.chmod(self.work, 0o757)
        result = check.check_ownership(agent_config.load(self.ini()))
        self.assertIs(result.ok, False)
        self.assertEqual(result.fix, f"chmod 700 {self.work}")
        self.assertTrue(result.line().startswith("FAIL  ownership: [agent] work_dir"))
        os.chmod(self.work, 0o700)
        self.assertIs(check.check_ownership(agent_config.load(self.ini())).ok, True)




class RetentionTests(SynchronousTestCase):
    """Item 8: task directories of finished, acknowledged tasks are removed in time."""

    def harness(self, policy):
        from tests.test_manager import Harness

        h = Harness(self)
        h.manager.retention.policy = policy
        self.addCleanup(h.stop)
        return h

    def task_dirs(self, h):
        """The task directories in work_dir (the spares' .spare aside)."""
        return sorted(n for n in os.listdir(h.work_dir) if n != ".spare")

    def run_task(self, h, name):
        from tests.test_manager import spec

        h.submit(name, spec())
        with open(os.path.join(h.work_dir, name, "stdout"), "w") as f:
            f.write("x")
        h.handler.jobs[name].finish(0)
        h.pump()

    def test_count_keeps_the_newest_after_ack_only(self):
        h = self.harness(("count", 2))
        for name in ("a", "b", "c"):
            self.run_task(h, name)
        # Not acknowledged yet: nothing goes.
        self.assertEqual(sorted(os.listdir(h.work_dir)), ["a", "b", "c"])
        h.sender.ack(h.outbox.last_seq)
        h.pump()
        self.assertEqual(self.task_dirs(h), ["b", "c"])
        # a's directory is a spare now, holding nothing of a.
        (spare,) = os.listdir(os.path.join(h.work_dir, ".spare"))
        with open(os.path.join(h.work_dir, ".spare", spare, "stdout")) as f:
            self.assertEqual(f.read(), "")
        self.assertTrue(h.registry.get("a")["dir_removed"])
        self.assertEqual((h.manager.retention.kept, h.manager.retention.removed), (2, 1))

    def test_age(self):
        h = self.harness(("age", 3600))
        self.run_task(h, "old")
        h.sender.ack(h.outbox.last_seq)
        h.clock.advance(1800)
        self.run_task(h, "new")
        h.sender.ack(h.outbox.last_seq)
        h.clock.advance(1801)
        self.assertEqual(self.task_dirs(h), ["new"])
        h.clock.advance(1800)
        self.assertEqual(self.task_dirs(h), [])

    def test_links_inside_are_not_followed(self):
        h = self.harness(("count", 0))
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        with open(os.path.join(outside, "precious"), "w") as f:
            f.write("keep me")
        from tests.test_manager import spec

        h.submit("t", spec())
        os.symlink(outside, os.path.join(h.work_dir, "t", "link"))
        os.symlink(os.path.join(outside, "precious"), os.path.join(h.work_dir, "t", "file-link"))
        h.handler.jobs["t"].finish(0)
        h.pump()
        h.sender.ack(h.outbox.last_seq)
        h.pump()
        self.assertEqual(self.task_dirs(h), [])
        self.assertEqual(os.listdir(outside), ["precious"])
        with open(os.path.join(outside, "precious")) as f:
            self.assertEqual(f.read(), "keep me")
        (spare,) = os.listdir(os.path.join(h.work_dir, ".spare"))
        self.assertNotIn("link", os.listdir(os.path.join(h.work_dir, ".spare", spare)))

    def test_a_directory_with_processes_left_is_not_used_again(self):
        """A task whose background processes outlived it: its directory is deleted, not kept as a spare."""
        h = self.harness(("count", 0))
        from tests.test_manager import spec

        h.submit("t", spec())
        h.handler.jobs["t"].leftover = True
        h.handler.jobs["t"].finish(0)
        h.pump()
        self.assertTrue(h.registry.get("t")["leftover"])
        h.sender.ack(h.outbox.last_seq)
        h.pump()
        self.assertEqual(self.task_dirs(h), [])
        self.assertFalse(os.path.exists(os.path.join(h.work_dir, ".spare")))
        self.assertEqual(h.manager.retention.removed, 1)
        self.run_task(h, "u")  # one without: kept as a spare
        h.sender.ack(h.outbox.last_seq)
        h.pump()
        self.assertEqual(len(os.listdir(os.path.join(h.work_dir, ".spare"))), 1)

    def test_removal_runs_through_the_injected_pool(self):
        """Off the reactor, through the agent's file I/O: the removals of one turn in one hop."""
        from twisted.internet.task import Clock

        from everest_agent.fsio import StallingFileIO
        from everest_agent.retention import TaskDirRetention
        from everest_agent.taskdirs import ThreadTaskDirs

        class Registry(dict):
            def update(self, task_id, **fields):
                self[task_id].update(fields)

        clock = Clock()
        work_dir = os.path.abspath(self.mktemp())
        registry = Registry()
        for name in ("a", "b", "c"):
            os.makedirs(os.path.join(work_dir, name))
            registry[name] = {}
        files = StallingFileIO(clock, delay=None)
        retention = TaskDirRetention(work_dir, ("count", 0), ThreadTaskDirs(work_dir, files), registry,
                                     clock, clock.seconds)
        for name in ("a", "b", "c"):
            retention.finished(name)
        clock.advance(0)
        self.assertEqual((files.calls, files.pending), (1, 1))
        self.assertEqual(sorted(os.listdir(work_dir)), ["a", "b", "c"])  # nothing on this thread
        files.release()
        self.assertEqual(os.listdir(work_dir), [".spare"])  # emptied to be used again
        self.assertEqual(len(os.listdir(os.path.join(work_dir, ".spare"))), 3)
        self.assertEqual(retention.removed, 3)
        self.assertTrue(all(r["dir_removed"] for r in registry.values()))

    def test_status_reports_what_is_kept(self):
        from everest_agent import status

        h = self.harness(("count", 1))
        for name in ("a", "b"):
            self.run_task(h, name)
        h.sender.ack(h.outbox.last_seq)
        h.pump()
        h.registry.stop()
        state = status.read_state(h.state_dir)
        self.assertEqual(state["task_dirs"]["kept"], 1)
        self.assertEqual(state["task_dirs"]["removed"], 1)
        self.assertIn("task directories: 1 of finished tasks kept, 1 removed",
                      "\n".join(status.format_state(state)))

    def test_config(self):
        parse = agent_config.SCHEMA["agent"]["keep_task_dirs"].parse
        self.assertEqual(parse("1000"), ("count", 1000))
        self.assertEqual(parse("7d"), ("age", 7 * 86400))
        self.assertIsNone(parse("all"))
        self.assertRaises(ValueError, parse, "7 days")


class SmallRecordTests(SynchronousTestCase):
    """Item 8: a finished task keeps a small record; inline data leaves memory once staged."""

    def test_finished_task_keeps_no_spec_in_memory_or_file(self):
        from tests.test_manager import Harness, spec

        h = Harness(self)
        h.registry.compact_bytes = 1 << 20
        big = "x" * (200 << 10)  # with the command, ~800 KiB a spec
        for n in range(4):
            h.submit(f"t{n}", spec("true " + "y" * (600 << 10), environment={"BIG": big}))
            h.handler.jobs[f"t{n}"].finish(0)
            h.pump()
        for n in range(4):
            record = h.registry.get(f"t{n}")
            self.assertIsNone(record["spec"])
            self.assertLessEqual(set(record), SMALL_RECORD_KEYS | {"spec"})
        h.pump()
        h.stop()
        # The dropped specs made the journal compact while running.
        self.assertLess(os.path.getsize(os.path.join(h.state_dir, "tasks.jsonl")), 1 << 20)

    def test_inline_data_dropped_once_staged(self):
        import base64

        from tests.test_manager import Harness, spec

        h = Harness(self)
        data = base64.b64encode(b"y" * 60000).decode()
        h.handler.hold_submit = True
        h.submit("t", spec("true", inputs=[{"path": "in", "data": data}]))
        record = h.registry.get("t")
        self.assertEqual(record["phase"], "submitting")
        self.assertEqual(record["spec"]["inputs"][0]["data"], "")
        h.stop()
