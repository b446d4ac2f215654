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


