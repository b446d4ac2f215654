"""
Task directories used again (everest_agent/spares.py), on the real file
system, with real task processes for the local handler's part.
"""

import os
import stat
import threading

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from everest_agent import jobscript, spares
from everest_agent.handlers.local import LocalTaskHandler
from everest_agent.interfaces import JobNeverStarted, JobRequest
from everest_agent.retention import remove_task_dir
from everest_agent.spares import IDLE_STATE_DIR, SPARE_DIR, SpareDirs


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def tree(top):
    """Every path under C{top}, relative, links shown as links (not followed)."""
    found = []
    for here, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(here, name)
            rel = os.path.relpath(path, top)
            found.append(rel + ("@" if os.path.islink(path) else ""))
    return sorted(found)


class Dirs:
    """A work_dir with a root descriptor, as retention and the manager use them."""

    def __init__(self, test, limit=spares.LIMIT):
        self.work_dir = os.path.abspath(test.mktemp())
        os.makedirs(self.work_dir)
        self.outside = os.path.abspath(test.mktemp())
        os.makedirs(self.outside)
        self.root = os.open(self.work_dir, os.O_RDONLY | os.O_DIRECTORY)
        test.addCleanup(os.close, self.root)
        self.spares = SpareDirs(self.work_dir, limit=limit)

    def path(self, *parts):
        return os.path.join(self.work_dir, *parts)

    def finished_task(self, name, stdout="out\n"):
        """A directory as a finished local task leaves it."""
        write(self.path(name, "stdout"), stdout)
        write(self.path(name, "stderr"), "err\n")
        write(self.path(name, "input.dat"), "x" * 1000)
        write(self.path(name, "results", "deep", "r.txt"), "r")
        write(self.path(name, ".everest", "exitcode"), "0\n")
        write(self.path(name, ".everest", "job.sh"), "#!/bin/sh\n")
        return self.path(name)

    def spare_paths(self):
        if not os.path.isdir(self.path(SPARE_DIR)):
            return []
        return [self.path(SPARE_DIR, n) for n in sorted(os.listdir(self.path(SPARE_DIR)), key=int)]


class GiveTests(SynchronousTestCase):
    """A finished task's directory becomes a spare that holds nothing of it."""

    def test_emptied_to_the_three_files(self):
        d = Dirs(self)
        d.finished_task("t")
        self.assertTrue(d.spares.give(d.root, "t"))
        self.assertFalse(os.path.lexists(d.path("t")))
        (spare,) = d.spare_paths()
        self.assertEqual(tree(spare), [IDLE_STATE_DIR, f"{IDLE_STATE_DIR}/exitcode", "stderr", "stdout"])
        for name in ("stdout", "stderr", f"{IDLE_STATE_DIR}/exitcode"):
            self.assertEqual(os.stat(os.path.join(spare, name)).st_size, 0, name)
        self.assertEqual((d.spares.count, d.spares.given), (1, 1))

    def test_nothing_the_task_left_is_followed_or_truncated_through(self):
        d = Dirs(self)
        precious = os.path.join(d.outside, "precious")
        write(precious, "keep me")
        linked = os.path.join(d.outside, "linked")
        write(linked, "keep me too")
        os.makedirs(d.path("t", ".everest"))
        os.symlink(precious, d.path("t", "stdout"))  # a link
        os.link(linked, d.path("t", "stderr"))  # a second name of a file elsewhere
        os.mkfifo(d.path("t", ".everest", "exitcode"))  # would block an open for writing
        os.symlink(d.outside, d.path("t", "dirlink"))
        os.symlink("loop", d.path("t", "loop"))
        self.assertTrue(d.spares.give(d.root, "t"))
        self.assertEqual(read(precious), "keep me")
        self.assertEqual(read(linked), "keep me too")
        self.assertEqual(sorted(os.listdir(d.outside)), ["linked", "precious"])
        (spare,) = d.spare_paths()
        self.assertEqual(tree(spare), [IDLE_STATE_DIR])

    def test_a_link_in_place_of_everest_is_removed_not_followed(self):
        d = Dirs(self)
        write(os.path.join(d.outside, "exitcode"), "0\n")
        write(d.path("t", "stdout"), "out")
        os.symlink(d.outside, d.path("t", ".everest"))
        self.assertTrue(d.spares.give(d.root, "t"))
        self.assertEqual(read(os.path.join(d.outside, "exitcode")), "0\n")
        (spare,) = d.spare_paths()
        self.assertEqual(tree(spare), ["stdout"])

    def test_limit_then_the_caller_removes(self):
        d = Dirs(self, limit=1)
        d.finished_task("a")
        d.finished_task("b")
        self.assertTrue(remove_task_dir(d.work_dir, "a", d.spares))
        self.assertTrue(remove_task_dir(d.work_dir, "b", d.spares))
        self.assertEqual(sorted(os.listdir(d.work_dir)), [SPARE_DIR])
        self.assertEqual(len(d.spare_paths()), 1)
        self.assertEqual(d.spares.given, 1)

    def test_not_a_directory_of_ours_is_not_taken(self):
        d = Dirs(self)
        os.symlink(d.outside, d.path("t"))
        self.assertFalse(d.spares.give(d.root, "t"))
        self.assertEqual(d.spare_paths(), [])
        self.assertTrue(os.path.islink(d.path("t")))


class TakeTests(SynchronousTestCase):
    """A new task's directory is a spare renamed into place."""

    def test_taken_only_where_nothing_is(self):
        d = Dirs(self)
        self.assertFalse(d.spares.take(d.root, "new"))  # no spare yet
        d.finished_task("old")
        d.spares.give(d.root, "old")
        os.makedirs(d.path("busy"))
        write(d.path("busy", "input"), "i")
        self.assertFalse(d.spares.take(d.root, "busy"))
        self.assertEqual(d.spares.count, 1)  # kept for the next one
        self.assertEqual(os.listdir(d.path("busy")), ["input"])
        self.assertTrue(d.spares.take(d.root, "new"))
        self.assertEqual(tree(d.path("new")), [IDLE_STATE_DIR, f"{IDLE_STATE_DIR}/exitcode", "stderr", "stdout"])
        self.assertEqual((d.spares.count, d.spares.taken), (0, 1))

    def test_a_restarted_agent_uses_the_spares_left(self):
        d = Dirs(self)
        for name in ("a", "b"):
            d.finished_task(name)
            d.spares.give(d.root, name)
        again = SpareDirs(d.work_dir)
        d.finished_task("c")
        self.assertTrue(again.give(d.root, "c"))  # numbered after the two left
        self.assertEqual(len(d.spare_paths()), 3)
        for name in ("x", "y", "z"):
            self.assertTrue(again.take(d.root, name))
        self.assertFalse(again.take(d.root, "w"))

    def test_threads_never_share_a_spare(self):
        d = Dirs(self)
        for i in range(40):
            d.finished_task(f"old{i}")
            d.spares.give(d.root, f"old{i}")
        taken = []

        def take(k):
            for i in range(20):
                if d.spares.take(d.root, f"new{k}-{i}"):
                    taken.append(f"new{k}-{i}")

        threads = [threading.Thread(target=take, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(taken), 40)
        self.assertEqual(d.spare_paths(), [])
        for name in taken:
            self.assertTrue(os.path.isdir(d.path(name, IDLE_STATE_DIR)))


class StartTests(SynchronousTestCase):
    """What the local handler's spawn does in a task directory before the job starts."""

    def setUp(self):
        self.d = Dirs(self)
        self.d.finished_task("old")
        self.d.spares.give(self.d.root, "old")
        self.d.spares.take(self.d.root, "t")
        self.fd = os.open(self.d.path("t"), os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, self.fd)

    def test_idle_state_dir_renamed_into_place(self):
        before = os.stat(self.d.path("t", IDLE_STATE_DIR)).st_ino
        state = spares.open_state_dir(self.fd)
        os.close(state)
        self.assertEqual(os.stat(self.d.path("t", ".everest")).st_ino, before)
        self.assertFalse(os.path.lexists(self.d.path("t", IDLE_STATE_DIR)))

    def test_an_earlier_start_keeps_its_state_dir(self):
        write(self.d.path("t", ".everest", "job.sh"), "x")
        os.close(spares.open_state_dir(self.fd))
        self.assertEqual(os.listdir(self.d.path("t", ".everest")), ["job.sh"])
        self.assertFalse(os.path.lexists(self.d.path("t", IDLE_STATE_DIR)))

    def test_made_when_there_is_none(self):
        fd = os.open(self.d.outside, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        os.close(spares.open_state_dir(fd))
        self.assertTrue(os.path.isdir(os.path.join(self.d.outside, ".everest")))

    def test_a_planted_idle_link_is_not_followed(self):
        os.rename(self.d.path("t", IDLE_STATE_DIR), self.d.path("t", "gone"))
        os.symlink(self.d.outside, self.d.path("t", IDLE_STATE_DIR))
        os.close(spares.open_state_dir(self.fd))
        self.assertFalse(os.path.islink(self.d.path("t", ".everest")))
        self.assertTrue(os.path.isdir(self.d.path("t", ".everest")))
        self.assertEqual(os.listdir(self.d.outside), [])

    def test_exit_code_emptied_or_removed(self):
        state = spares.open_state_dir(self.fd)
        self.addCleanup(os.close, state)
        code = self.d.path("t", ".everest", "exitcode")
        write(code, "3\n")
        self.assertEqual(jobscript.read_exit_code(self.d.path("t")), 3)
        spares.empty_exit_code(state)
        self.assertIsNone(jobscript.read_exit_code(self.d.path("t")))
        self.assertEqual(os.stat(code).st_size, 0)
        os.unlink(code)
        target = os.path.join(self.d.outside, "code")
        write(target, "5\n")
        os.symlink(target, code)
        spares.empty_exit_code(state)
        self.assertFalse(os.path.lexists(code))
        self.assertEqual(read(target), "5\n")
        os.mkfifo(code)
        spares.empty_exit_code(state)  # does not block
        self.assertFalse(os.path.lexists(code))
        spares.empty_exit_code(state)  # nothing there: nothing to do

    def test_outputs_used_again_only_when_fit(self):
        stdout = self.d.path("t", "stdout")
        write(stdout, "old output")
        os.chmod(stdout, 0o666)
        before = os.stat(stdout).st_ino
        fd = spares.open_output(self.fd, "stdout")
        os.write(fd, b"new")
        os.close(fd)
        st = os.stat(stdout)
        self.assertEqual((st.st_ino, stat.S_IMODE(st.st_mode), read(stdout)), (before, 0o644, "new"))
        other = os.path.join(self.d.outside, "other")
        write(other, "not yours")
        os.unlink(stdout)
        os.link(other, stdout)
        os.close(spares.open_output(self.fd, "stdout"))
        self.assertEqual(read(other), "not yours")
        self.assertEqual(os.stat(stdout).st_nlink, 1)
        os.unlink(stdout)
        os.symlink(other, stdout)
        os.close(spares.open_output(self.fd, "stdout"))
        self.assertEqual(read(other), "not yours")
        self.assertFalse(os.path.islink(stdout))


class LocalTaskInASpareTests(TestCase):
    """A real task run in a used-again directory: right results, no new file."""

    timeout = 30

    def setUp(self):
        self.d = Dirs(self)
        self.d.finished_task("old", stdout="the old task's output\n")
        self.d.spares.give(self.d.root, "old")
        self.d.spares.take(self.d.root, "t")
        self.handler = LocalTaskHandler(reactor, slots=2, kill_grace=0.5)

    def request(self, command):
        return JobRequest("t", self.d.path("t"), command, {}, {})

    def inodes(self):
        return [os.stat(self.d.path("t", n)).st_ino
                for n in ("stdout", "stderr", ".everest", ".everest/exitcode")]

    @defer.inlineCallbacks
    def test_results_right_and_no_file_made(self):
        os.rename(self.d.path("t", IDLE_STATE_DIR), self.d.path("t", ".everest"))
        before = self.inodes()
        os.rename(self.d.path("t", ".everest"), self.d.path("t", IDLE_STATE_DIR))
        job = yield self.handler.submit(self.request("echo hello; echo oops >&2; exit 7"))
        result = yield job.result
        self.assertEqual(result.exit_code, 7)
        self.assertEqual(read(self.d.path("t", "stdout")), "hello\n")
        self.assertEqual(read(self.d.path("t", "stderr")), "oops\n")
        self.assertEqual(jobscript.read_exit_code(self.d.path("t")), 7)
        self.assertEqual(self.inodes(), before)
        self.assertEqual(sorted(os.listdir(self.d.path("t"))), [".everest", "stderr", "stdout"])

    def test_never_started_is_still_told_apart(self):
        """Before its spawn a used-again directory has no .everest: a restart starts the task once."""
        second = LocalTaskHandler(reactor, slots=2, kill_grace=0.5)
        return self.assertFailure(second.reattach(self.request("true"), None), JobNeverStarted)

    @defer.inlineCallbacks
    def test_a_status_is_written_over_the_one_before(self):
        """The exit-code file goes round without truncation: un-written, then written over in place."""
        job = yield self.handler.submit(self.request("exit 137"))
        yield job.result
        code = self.d.path("t", ".everest", "exitcode")
        self.assertEqual((os.stat(code).st_size, jobscript.read_exit_code(self.d.path("t"))),
                         (jobscript.EXIT_CODE_SIZE, 137))
        inode = os.stat(code).st_ino
        self.assertTrue(self.d.spares.give(self.d.root, "t"))
        self.assertTrue(self.d.spares.take(self.d.root, "t2"))
        idle = self.d.path("t2", IDLE_STATE_DIR, "exitcode")
        self.assertEqual((os.stat(idle).st_ino, os.stat(idle).st_size), (inode, jobscript.EXIT_CODE_SIZE))
        os.rename(self.d.path("t2", IDLE_STATE_DIR), self.d.path("t2", ".everest"))
        self.assertIsNone(jobscript.read_exit_code(self.d.path("t2")))  # not written
        os.rename(self.d.path("t2", ".everest"), self.d.path("t2", IDLE_STATE_DIR))
        job = yield self.handler.submit(JobRequest("t2", self.d.path("t2"), "exit 3", {}, {}))
        result = yield job.result
        self.assertEqual(result.exit_code, 3)
        self.assertEqual(jobscript.read_exit_code(self.d.path("t2")), 3)
        self.assertEqual(os.stat(self.d.path("t2", ".everest", "exitcode")).st_ino, inode)

    def test_an_odd_sized_exit_code_file_is_truncated(self):
        os.rename(self.d.path("t", IDLE_STATE_DIR), self.d.path("t", ".everest"))
        write(self.d.path("t", ".everest", "exitcode"), "1234567890123456789\n")
        state = os.open(self.d.path("t", ".everest"), os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, state)
        spares.empty_exit_code(state)
        self.assertEqual(os.stat(self.d.path("t", ".everest", "exitcode")).st_size, 0)


class LeftoverTests(TestCase):
    """The local handler tells whether a task's processes outlived its wrapper."""

    timeout = 30

    def setUp(self):
        self.handler = LocalTaskHandler(reactor, slots=2, kill_grace=0.5)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def request(self, command):
        return JobRequest("t", self.dir, command, {}, {})

    @defer.inlineCallbacks
    def test_a_background_process_left_running(self):
        job = yield self.handler.submit(self.request("sleep 30 & exit 0"))
        self.addCleanup(_kill_group, job.pid)
        result = yield job.result
        self.assertEqual(result.exit_code, 0)
        self.assertTrue(job.leftover)

    @defer.inlineCallbacks
    def test_nothing_left(self):
        job = yield self.handler.submit(self.request("sleep 0.01; echo done"))
        yield job.result
        self.assertFalse(job.leftover)


def _kill_group(pgid):
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
