"""
Task directories made and retired off the reactor (everest_agent/taskdirs.py):
in the agent's threads, and in the directory process (a real child process,
everest_agent/dirworker.py).
"""

import errno
import io
import json
import os
import socket
import stat
import sys

from twisted.internet import defer, reactor
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from everest_agent import dirworker, paths
from everest_agent.fsio import InlineFileIO
from everest_agent.spares import SPARE_DIR
from everest_agent.dirworker import decode_error
from everest_agent.taskdirs import ITaskDirs, ProcessTaskDirs, ThreadTaskDirs
from tests.support import eventually, watch_reactor_lag


def _task(work_dir, name, text=b"out"):
    os.makedirs(os.path.join(work_dir, name, ".everest"))
    with open(os.path.join(work_dir, name, "stdout"), "wb") as f:
        f.write(text)
    with open(os.path.join(work_dir, name, "result.dat"), "wb") as f:
        f.write(b"x" * 1000)


class _Dirs:
    """A work_dir, and the directory process over it (stopped at the end)."""

    def __init__(self, test):
        self.work_dir = os.path.abspath(test.mktemp())
        os.makedirs(self.work_dir)
        self.events = []
        self.fallback = ThreadTaskDirs(self.work_dir, InlineFileIO())
        self.dirs = ProcessTaskDirs(reactor, self.work_dir, self.fallback)
        self.dirs.log = Logger(observer=self.events.append)
        test.addCleanup(self.stop)

    def stop(self):
        if self.dirs.running:
            return self.dirs.stopService()

    def path(self, name):
        return os.path.join(self.work_dir, name)

    def python_running(self, code):
        """Have the directory process be C{python -c CODE} (its arguments after), not dirworker's main."""
        script = os.path.join(self.work_dir, "..", "python-running")
        with open(script, "w") as f:
            f.write(f"#!/bin/sh\nexec {sys.executable} -c '{code}' \"$@\"\n")
        os.chmod(script, stat.S_IRWXU)
        self.dirs._python = script

    def formats(self):
        return [e.get("log_format", "") for e in self.events]

    def texts(self):
        return [formatEvent(e) for e in self.events]


class InterfaceTests(unittest.TestCase):
    def test_both_provide_ITaskDirs(self):
        work_dir = self.mktemp()
        threads = ThreadTaskDirs(work_dir, InlineFileIO())
        self.assertTrue(verifyObject(ITaskDirs, threads))
        self.assertTrue(verifyObject(ITaskDirs, ProcessTaskDirs(reactor, work_dir, threads)))


class ErrorTests(unittest.TestCase):
    """What an error becomes on its way back from the process."""

    def test_os_error_keeps_its_errno_and_class(self):
        e = decode_error(dirworker.encode_error(PermissionError(errno.EACCES, "Permission denied")))
        self.assertIsInstance(e, PermissionError)
        self.assertEqual((e.errno, e.strerror), (errno.EACCES, "Permission denied"))

    def test_path_escape_stays_one(self):
        e = decode_error(dirworker.encode_error(paths.PathEscape("task directory name '..' is bad")))
        self.assertIsInstance(e, paths.PathEscape)
        self.assertEqual(str(e), "task directory name '..' is bad")

    def test_anything_else_is_a_runtime_error_naming_it(self):
        e = decode_error(dirworker.encode_error(KeyError("op")))
        self.assertIsInstance(e, RuntimeError)
        self.assertIn("KeyError", str(e))


class ServeTests(unittest.TestCase):
    """dirworker.serve itself, in this process (its threads, a pipe for its answers)."""

    def serve(self, work_dir, requests):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        ours.sendall(b"".join(requests))
        ours.shutdown(socket.SHUT_WR)
        self.err = io.StringIO()
        try:
            dirworker.serve(theirs, work_dir, err=self.err)
        finally:
            theirs.close()
        data = b""
        while True:
            chunk = ours.recv(65536)
            if not chunk:
                break
            data += chunk
        return [json.loads(line) for line in data.splitlines()]

    def test_answers_each_request_and_ignores_an_unreadable_one(self):
        work_dir = os.path.abspath(self.mktemp())
        _task(work_dir, "a")
        answers = self.serve(work_dir, [
            b'{"id": 1, "op": "make", "work_dir": "%s", "name": "b"}\n' % work_dir.encode(),
            b"not json\n",
            b'{"id": 2, "op": "nothing"}\n',
            b'{"id": 3, "op": "retire", "work_dir": "%s", "name": "a", "reuse": true}\n' % work_dir.encode(),
        ])
        by_id = {a["id"]: a for a in answers}
        self.assertEqual(sorted(by_id), [1, 3])  # (3 may come first: two threads)
        self.assertTrue(os.path.isdir(os.path.join(work_dir, "b")))
        self.assertEqual(by_id[1]["ok"], None)
        self.assertIs(by_id[3]["ok"], True)
        self.assertFalse(os.path.exists(os.path.join(work_dir, "a")))
        self.assertEqual(by_id[3]["given"], 1)  # kept as a spare (which "b" may have taken meanwhile)
        said = self.err.getvalue().splitlines()
        self.assertEqual(len(said), 2)
        self.assertTrue(all("unreadable request" in line for line in said))


class ProcessTaskDirsTests(unittest.TestCase):
    """The directory process, for real."""

    @defer.inlineCallbacks
    def test_make_retire_and_use_again(self):
        d = _Dirs(self)
        d.dirs.startService()
        yield d.dirs.make(d.path("t1"))
        self.assertTrue(os.path.isdir(d.path("t1")))
        _task(d.work_dir, "t2")
        self.assertIs((yield d.dirs.retire("t2", True)), True)
        self.assertFalse(os.path.exists(d.path("t2")))
        yield d.dirs.make(d.path("t3"))  # the spare, renamed into place
        self.assertEqual((d.dirs.taken, d.dirs.given), (1, 1))
        self.assertEqual(sorted(os.listdir(d.path("t3"))), [".everest.spare", "stdout"])
        with open(os.path.join(d.path("t3"), "stdout"), "rb") as f:
            self.assertEqual(f.read(), b"")  # nothing of t2 is left
        self.assertIs((yield d.dirs.retire("gone", True)), False)
        self.assertTrue(d.dirs.in_process)
        self.assertGreaterEqual(d.dirs.calls, 4)

    @defer.inlineCallbacks
    def test_a_task_that_left_processes_is_removed_not_kept(self):
        d = _Dirs(self)
        d.dirs.startService()
        _task(d.work_dir, "t")
        self.assertIs((yield d.dirs.retire("t", False)), True)
        self.assertEqual(os.listdir(d.work_dir), [])
        self.assertEqual(d.dirs.given, 0)

    @defer.inlineCallbacks
    def test_asked_before_the_start_waits_for_it(self):
        d = _Dirs(self)
        made = d.dirs.make(d.path("early"))
        self.assertFalse(made.called)
        d.dirs.startService()
        yield made
        self.assertTrue(os.path.isdir(d.path("early")))

    @defer.inlineCallbacks
    def test_a_planted_link_is_moved_aside_and_logged_here(self):
        d = _Dirs(self)
        d.dirs.startService()
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, d.path("t"))
        yield d.dirs.make(d.path("t"))
        self.assertFalse(os.path.islink(d.path("t")))
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(sorted(os.listdir(os.path.join(d.work_dir, paths.QUARANTINE))), ["t.1"])
        self.assertIn("Task directory {name} in {work_dir} moved aside to {aside}: {why}", d.formats())

    @defer.inlineCallbacks
    def test_errors_come_back_as_what_they_were(self):
        d = _Dirs(self)
        d.dirs.startService()
        with open(d.path("file"), "w"):
            pass
        f = yield self.assertFailure(d.dirs.make(os.path.join(d.path("file"), "t")), OSError)
        self.assertIn(f.errno, (errno.ENOTDIR, errno.EEXIST))
        yield self.assertFailure(d.dirs.make(d.path("..")), paths.PathEscape)
        yield d.dirs.make(d.path("after"))  # and the process goes on
        self.assertTrue(d.dirs.in_process)

    @defer.inlineCallbacks
    def test_the_process_dying_hands_its_work_to_the_threads(self):
        d = _Dirs(self)
        d.dirs.startService()
        yield d.dirs.make(d.path("first"))
        # Asked while it dies: answered all the same, by the threads.
        d.dirs._process.signalProcess("KILL")
        pending = [d.dirs.make(d.path(f"t{i}")) for i in range(5)]
        _task(d.work_dir, "done")
        pending.append(d.dirs.retire("done", True))
        yield eventually(lambda: not d.dirs.in_process, timeout=10, what="the threads taking over")
        yield defer.gatherResults(pending)
        for i in range(5):
            self.assertTrue(os.path.isdir(d.path(f"t{i}")))
        self.assertFalse(os.path.exists(d.path("done")))
        yield d.dirs.make(d.path("later"))
        self.assertTrue(os.path.isdir(d.path("later")))
        self.assertTrue(any("the directory process ended" in t and "agent's threads" in t for t in d.texts()),
                        d.texts())

    @defer.inlineCallbacks
    def test_stop_waits_for_what_was_asked(self):
        d = _Dirs(self)
        d.dirs.startService()
        for i in range(20):
            _task(d.work_dir, f"t{i}")
        retired = [d.dirs.retire(f"t{i}", True) for i in range(20)]
        yield d.dirs.stopService()
        self.assertEqual([r.called for r in retired], [True] * 20)
        self.assertEqual(sorted(os.listdir(d.work_dir)), [SPARE_DIR])
        self.assertEqual(d.dirs.given, 20)

    @defer.inlineCallbacks
    def test_an_unreadable_answer_ends_the_process_and_nothing_waits(self):
        for bad in (b"{not json", b'{"id": 999999, "ok": null}', b'{"ok": null}', b"[1, 2]"):
            d = _Dirs(self)
            d.dirs.startService()
            _task(d.work_dir, "old")
            asked = [d.dirs.make(d.path("t")), d.dirs.retire("old", True)]
            d.dirs.answered(bad)  # as if the process had said it
            self.assertTrue(any("unreadable" in t for t in d.texts()), bad)
            yield defer.gatherResults(asked)  # answered all the same, by the threads
            self.assertTrue(os.path.isdir(d.path("t")))
            self.assertFalse(os.path.exists(d.path("old")))
            self.assertFalse(d.dirs.in_process)
            yield d.stop()

    def test_not_wanted_before_the_start(self):
        d = _Dirs(self)
        made = d.dirs.make(d.path("early"))
        d.dirs.use_threads("not wanted here")
        self.assertTrue(made.called)
        d.dirs.startService()
        self.assertIsNone(d.dirs._process)
        self.assertTrue(os.path.isdir(d.path("early")))
        return d.dirs.make(d.path("t")).addCallback(lambda _: self.assertTrue(os.path.isdir(d.path("t"))))

    def test_a_python_that_cannot_start_means_threads(self):
        d = _Dirs(self)
        d.dirs._python = os.path.join(d.work_dir, "no-such-python")
        d.dirs.startService()
        made = d.dirs.make(d.path("t"))
        # spawnProcess of a missing program fails in the child: the process
        # ends at once, and its work goes to the threads.
        return made.addCallback(lambda _: self.assertTrue(os.path.isdir(d.path("t"))))


class SlowProcessTests(unittest.TestCase):
    """A directory process on a file system that takes a second a call: the reactor never waits."""

    @defer.inlineCallbacks
    def test_the_reactor_goes_on_meanwhile(self):
        d = _Dirs(self)
        d.python_running(
            "import sys, time; from everest_agent import dirworker as w; make = w.make_task_dir; "
            "w.make_task_dir = lambda *a, **k: (time.sleep(1), make(*a, **k))[1]; "
            "sys.exit(w.main(sys.argv[-1:]))")
        d.dirs.startService()
        lag = watch_reactor_lag(self)
        start = reactor.seconds()
        yield defer.gatherResults([d.dirs.make(d.path(f"t{i}")) for i in range(2)])
        self.assertGreaterEqual(reactor.seconds() - start, 2.0)  # it did stall
        self.assertTrue(d.dirs.in_process)
        self.assertLess(max(lag), 0.1)


class StuckProcessTests(unittest.TestCase):
    """A directory process that will not end (stuck in a hung file system): the agent still stops."""

    @defer.inlineCallbacks
    def test_stop_gives_up_on_it(self):
        d = _Dirs(self)
        d.python_running("import time; time.sleep(60)")
        d.dirs.STOP_TIMEOUT = d.dirs.KILL_WAIT = 0.2
        d.dirs.startService()
        process = d.dirs._process

        def kill_it():
            if process.pid:
                process.signalProcess("KILL")
            return defer.Deferred.fromCoroutine(
                eventually(lambda: d.dirs._channel is None, what="the stuck process gone"))

        self.addCleanup(kill_it)
        asked = d.dirs.make(d.path("t"))
        self.patch(d.dirs, "_end_it", lambda: None)  # as if SIGKILL could not end it yet
        start = reactor.seconds()
        yield d.dirs.stopService()
        self.assertLess(reactor.seconds() - start, 5)
        self.assertFalse(asked.called)  # done again at the next start
        self.assertTrue(any("does not end" in t for t in d.texts()), d.texts())
