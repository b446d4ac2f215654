"""
The local handler, with real child processes.
"""

import os
import signal

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from everest_agent.handlers.local import LocalTaskHandler
from everest_agent.interfaces import IJob, ITaskHandler, JobLost, JobRequest


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


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
        job = yield self.handler.submit(self.request("kill -SEGV $$"))
        result = yield job.result
        self.assertIsNone(result.exit_code)
        self.assertEqual(result.reason, f"killed by signal {int(signal.SIGSEGV)} (SIGSEGV)")

    def test_missing_directory(self):
        d = self.handler.submit(JobRequest("t3", os.path.join(self.dir, "nope"), "true"))
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
