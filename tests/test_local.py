"""
The local handler, with real child processes.
"""

import os
import signal

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from everest_agent.handlers.local import LocalTaskHandler, group_alive
from everest_agent.interfaces import IJob, ITaskHandler, JobLost, JobRequest


class LocalHandlerTests(TestCase):
    timeout = 30

    def setUp(self):
        self.handler = LocalTaskHandler(reactor, slots=4, kill_grace=0.5)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def request(self, command, **requirements):
        return JobRequest("t1", self.dir, command, {"EVEREST_TASK_ID": "t1", "QUOTED": "a'b\"$c"}, requirements)

    def read(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    @defer.inlineCallbacks
    def test_runs_in_task_dir_with_files_and_env(self):
        verifyObject(ITaskHandler, self.handler)
        job = yield self.handler.submit(
            self.request('pwd; echo "$EVEREST_TASK_ID $QUOTED"; echo oops >&2; exit 0')
        )
        verifyObject(IJob, job)
        self.assertFalse(job.batch)
        self.assertTrue(job.running.called)
        result = yield job.result
        self.assertTrue(result.succeeded)
        self.assertEqual(self.read("stdout"), f"{os.path.realpath(self.dir)}\nt1 a'b\"$c\n")
        self.assertEqual(self.read("stderr"), "oops\n")

    @defer.inlineCallbacks
    def test_clean_start_descriptors_and_signals(self):
        """
        A task gets standard input, output and error and nothing else (not
        a descriptor the agent inherited), and every signal at its default
        action although Python ignores SIGPIPE.
        """
        self.assertEqual(signal.getsignal(signal.SIGPIPE), signal.SIG_IGN)
        leaked = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, leaked)
        os.set_inheritable(leaked, True)
        job = yield self.handler.submit(
            self.request("sh -c 'ls /proc/$$/fd; grep SigIgn /proc/$$/status'")
        )
        result = yield job.result
        self.assertTrue(result.succeeded)
        fds, ignored = self.read("stdout").rsplit("\n", 2)[:2]
        self.assertEqual(fds, "0\n1\n2")
        # Bits 0-30 are signals 1-31 (SIGPIPE is bit 12); higher ones are
        # glibc's own real-time signals, which a program cannot change.
        self.assertEqual(int(ignored.split()[1], 16) & 0x7FFFFFFF, 0, ignored)

    @defer.inlineCallbacks
    def test_end_found_even_without_sigchld(self):
        """If SIGCHLD never reaches the handler, its safety poll still sees the end, with the status."""
        from twisted.internet import process

        job = yield self.handler.submit(self.request("sleep 0.2; exit 9"))
        process.unregisterReapProcessHandler(job.pid, job)  # as if the signal were lost
        result = yield job.result
        self.assertEqual(result.exit_code, 9)

    @defer.inlineCallbacks
    def test_exit_code(self):
        job = yield self.handler.submit(self.request("exit 7"))
        result = yield job.result
        self.assertEqual((result.exit_code, result.reason, result.canceled), (7, "exit code 7", False))

    @defer.inlineCallbacks
    def test_own_process_group(self):
        job = yield self.handler.submit(self.request("ps -o pgid= -p $$; ps -o sid= -p $$"))
        yield job.result
        pgid, sid = (int(x) for x in self.read("stdout").split())
        self.assertEqual(pgid, job.pid)
        self.assertEqual(sid, job.pid)
        self.assertNotEqual(pgid, os.getpgrp())

    @defer.inlineCallbacks
    def test_cancel_kills_whole_group(self):
        job = yield self.handler.submit(self.request("sleep 60 & sleep 60 & echo started; wait"))
        yield self._wait_for_output("started")
        self.assertTrue(group_alive(job.pid))
        job.cancel()
        result = yield job.result
        self.assertTrue(result.canceled)
        self.assertEqual(result.reason, "canceled")
        yield self._wait_group_gone(job.pid)

    @defer.inlineCallbacks
    def test_term_ignored_then_kill(self):
        job = yield self.handler.submit(
            self.request("trap '' TERM; sleep 60 & echo started; wait; wait", timeLimit=0.3)
        )
        yield self._wait_for_output("started")
        result = yield job.result
        self.assertEqual(result.reason, "time limit of 0.3 s exceeded")
        self.assertFalse(result.succeeded)
        yield self._wait_group_gone(job.pid)

    @defer.inlineCallbacks
    def test_killed_by_signal(self):
        job = yield self.handler.submit(self.request("sh -c 'kill -SEGV $$'"))
        result = yield job.result
        code = 128 + int(signal.SIGSEGV)
        self.assertEqual(result.exit_code, code)
        self.assertEqual(
            result.reason,
            f"exit code {code} (the shell's code for a command killed by signal {int(signal.SIGSEGV)}, SIGSEGV)",
        )

    def test_unusable_directory(self):
        blocker = os.path.join(self.dir, "a-file")
        open(blocker, "w").close()
        d = self.handler.submit(JobRequest("t3", os.path.join(blocker, "task"), "true"))
        return self.assertFailure(d, RuntimeError)

    def test_reattach_is_honest(self):
        return self.assertFailure(self.handler.reattach(self.request("true"), "123"), JobLost)

    @defer.inlineCallbacks
    def _wait_group_gone(self, pgid):
        # Killed processes are reaped by init a moment after they die.
        for _ in range(100):
            if not group_alive(pgid):
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"process group {pgid} is still alive")

    @defer.inlineCallbacks
    def _wait_for_output(self, text):
        for _ in range(200):
            if text in self.read("stdout"):
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{text!r} never appeared")


class SlotsTests(SynchronousTestCase):
    def test_slots_needed(self):
        handler = LocalTaskHandler(reactor, slots=4)
        self.assertEqual(handler.slots_needed({}), 1)
        self.assertEqual(handler.slots_needed({"coresPerNode": 3}), 3)
        self.assertIn("this agent has 4 slots", str(self.assertRaises(ValueError, handler.slots_needed, {"coresPerNode": 5})))
        self.assertIn("2 nodes", str(self.assertRaises(ValueError, handler.slots_needed, {"nodes": 2})))


class ReattachTests(TestCase):
    """
    After a restart the agent finds its local tasks again.  Here a second
    handler stands for the restarted agent; the first one's processes keep
    running, as they do when the agent dies.
    """

    timeout = 30

    def setUp(self):
        self.first = LocalTaskHandler(reactor, slots=4, kill_grace=0.5)
        self.second = LocalTaskHandler(reactor, slots=4, kill_grace=0.5)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def request(self, command, **requirements):
        return JobRequest("t1", self.dir, command, {}, requirements)

    @defer.inlineCallbacks
    def test_running_task_found_by_id(self):
        go = os.path.join(self.dir, "go")
        request = self.request(f"echo started; while [ ! -e {go} ]; do sleep 0.02; done; exit 4")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))  # a restart takes longer than an exec
        job = yield self.second.reattach(request, original.job_id)
        verifyObject(IJob, job)
        self.assertEqual(job.job_id, original.job_id)
        self.assertFalse(job.result.called)
        open(go, "w").close()
        result = yield job.result
        self.assertEqual((result.exit_code, result.reason), (4, "exit code 4"))
        yield original.result

    @defer.inlineCallbacks
    def test_task_ended_while_away(self):
        request = self.request("exit 3")
        original = yield self.first.submit(request)
        yield original.result
        job = yield self.second.reattach(request, original.job_id)
        result = yield job.result
        self.assertEqual(result.exit_code, 3)

    @defer.inlineCallbacks
    def test_older_job_ids_with_a_start_time(self):
        """Job ids recorded as "<pid>:<start ticks>" are still honoured, start time included."""
        from everest_agent.handlers.local import process_start

        go = os.path.join(self.dir, "go")
        request = self.request(f"echo started; while [ ! -e {go} ]; do sleep 0.02; done; exit 5")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))
        start = process_start(original.pid)
        # Another start time: another process, so this task's wrapper is gone
        # (and left no exit status).
        yield self.assertFailure(self.second.reattach(request, f"{original.pid}:{start + 1}"), JobLost)
        job = yield self.second.reattach(request, f"{original.pid}:{start}")
        self.assertEqual(job.pid, original.pid)
        self.assertFalse(job.result.called)
        open(go, "w").close()
        result = yield job.result
        self.assertEqual(result.exit_code, 5)
        yield original.result

    @defer.inlineCallbacks
    def test_reused_pid_is_not_taken_for_the_task(self):
        request = self.request("exit 0")
        original = yield self.first.submit(request)
        yield original.result
        # Our own pid: alive, but not this task's wrapper (a reused pid).
        job = yield self.second.reattach(request, str(os.getpid()))
        result = yield job.result
        self.assertEqual(result.exit_code, 0)
        self.assertNotEqual(job.pid, os.getpid())

    @defer.inlineCallbacks
    def test_found_by_command_line_when_id_was_not_recorded(self):
        go = os.path.join(self.dir, "go")
        request = self.request(f"echo started; while [ ! -e {go} ]; do sleep 0.02; done")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))
        job = yield self.second.reattach(request, None)
        self.assertEqual(job.pid, original.pid)
        open(go, "w").close()
        result = yield job.result
        self.assertTrue(result.succeeded)
        yield original.result

    @defer.inlineCallbacks
    def test_the_subshell_is_not_taken_for_the_wrapper(self):
        """The command's subshell has the wrapper's command line, but it is not the task's leader."""
        from everest_agent.handlers.local import _find_wrapper, _is_wrapper

        request = self.request("echo started; sleep 60")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))
        with open(f"/proc/{original.pid}/task/{original.pid}/children") as f:
            (subshell,) = (int(pid) for pid in f.read().split())
        self.assertTrue(_is_wrapper(original.pid, self.dir))
        self.assertFalse(_is_wrapper(subshell, self.dir))
        self.assertEqual(_find_wrapper(self.dir), original.pid)
        original.cancel()
        yield original.result

    def test_never_started(self):
        from everest_agent.interfaces import JobNeverStarted

        return self.assertFailure(self.second.reattach(self.request("true"), None), JobNeverStarted)

    @defer.inlineCallbacks
    def test_readied_but_never_spawned_is_started(self):
        """
        The agent killed between readying the directory (its C{.everest}
        made, a used-again one's status emptied) and the spawn: a restart
        starts the task instead of taking it for lost.
        """
        from everest_agent import spares
        from everest_agent.interfaces import JobNeverStarted

        request = self.request("exit 4")
        earlier = yield self.first.submit(request)  # an earlier run left a status here
        self.assertEqual((yield earlier.result).exit_code, 4)
        for fd in spares.open_for_spawn(self.dir):
            os.close(fd)
        yield self.assertFailure(self.second.reattach(request, None), JobNeverStarted)
        yield self.assertFailure(self.second.reattach(request, str(earlier.pid)), JobNeverStarted)
        again = yield self.second.submit(request)  # what the worker does then
        self.assertEqual((yield again.result).exit_code, 4)

    @defer.inlineCallbacks
    def test_started_then_killed_before_its_id_was_recorded_is_lost(self):
        """Once the spawn's marker is there, a task without a wrapper or an exit status is lost, not restarted."""
        request = self.request("echo started; sleep 60")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))
        os.killpg(original.pid, signal.SIGKILL)
        yield original.result
        yield self.assertFailure(self.second.reattach(request, None), JobLost)
        self.assertFalse(self.flushLoggedErrors())

    @defer.inlineCallbacks
    def test_killed_while_away_is_lost(self):
        request = self.request("echo started; sleep 60")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))
        os.killpg(original.pid, signal.SIGKILL)
        yield original.result
        yield self.assertFailure(self.second.reattach(request, original.job_id), JobLost)

    @defer.inlineCallbacks
    def test_cancel_reattached(self):
        request = self.request("sleep 60 & sleep 60 & echo started; wait")
        original = yield self.first.submit(request)
        yield _wait_for_file(os.path.join(self.dir, "stdout"))
        job = yield self.second.reattach(request, original.job_id)
        job.cancel()
        result = yield job.result
        self.assertTrue(result.canceled)
        yield original.result
        for _ in range(100):
            if not group_alive(original.pid):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(group_alive(original.pid))

    @defer.inlineCallbacks
    def test_time_limit_counts_from_the_real_start(self):
        request = self.request("sleep 60", timeLimit=1.0)
        original = yield self.first.submit(request)
        original._cancel_limit()  # the first agent "died": only the second enforces it
        yield task.deferLater(reactor, 0.5, lambda: None)
        job = yield self.second.reattach(request, original.job_id)
        started = reactor.seconds()
        result = yield job.result
        self.assertEqual(result.reason, "time limit of 1 s exceeded")
        self.assertLess(reactor.seconds() - started, 0.9)
        yield original.result


@defer.inlineCallbacks
def _wait_for_file(path):
    for _ in range(200):
        if os.path.exists(path) and os.path.getsize(path):
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{path} never appeared")
