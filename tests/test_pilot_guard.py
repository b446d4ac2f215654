"""
The pilot's guard (L{everest_agent.pilot.guard}) with real processes.

A fake worker (L{WORKER}) starts a task the way the local handler does
(L{everest_agent.spares.open_for_spawn} and
L{everest_agent.handlers.local._spawn_wrapper}: the shell wrapper, in a
session of its own) whose command is a C{sleep} with a unique number of
seconds, the marker that finds every process of the task in C{/proc};
then it exits, waits to be killed, or takes SIGTERM, as the test says.
Whatever ended the worker, no process of the task may be left, and the
guard exits with the worker's status.  The tests poll with a deadline.
"""

import os
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from everest_agent.pilot import guard
from tests.support import marked_processes, sleep_marker as marker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The fake worker: C{worker.py MODE DIRECTORY}, the task's command in
#: C{$TASK_COMMAND} (not on the worker's or the guard's command line, where
#: the marker would find them too).  It starts the task, writes "<its pid>
#: <its parent's pid> <the wrapper's pid>" to DIRECTORY/worker, and then, by
#: MODE: "exit" waits for DIRECTORY/go and exits 3; "wait" sleeps until
#: killed; "term" exits 7 on SIGTERM; "plain" also starts a C{sleep
#: $PLAIN} in its own process group (the job's), waits for DIRECTORY/go and
#: exits 5.
WORKER = r'''
import os, signal, subprocess, sys, time
from everest_agent.handlers.local import _spawn_wrapper
from everest_agent.spares import open_for_spawn

mode, directory = sys.argv[1:3]
if mode == "term":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
if mode == "plain":
    subprocess.Popen(["sleep", os.environ["PLAIN"]])
wrapper = _spawn_wrapper(open_for_spawn(directory), directory, os.environ["TASK_COMMAND"], dict(os.environ))
with open(os.path.join(directory, "worker.tmp"), "w") as f:
    f.write(f"{os.getpid()} {os.getppid()} {wrapper}\n")
os.rename(os.path.join(directory, "worker.tmp"), os.path.join(directory, "worker"))
while True:
    if mode in ("exit", "plain") and os.path.exists(os.path.join(directory, "go")):
        sys.exit(3 if mode == "exit" else 5)
    time.sleep(0.05)
'''


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def process_state(pid):
    """The state letter of C{pid} in /proc (C{Z} for a zombie), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()[0].decode()


class GuardTests(SynchronousTestCase):
    if not sys.platform.startswith("linux"):
        skip = "the guard is Linux only"

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.worker_script = os.path.join(self.root, "worker.py")
        with open(self.worker_script, "w") as f:
            f.write(WORKER)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])

    def start(self, mode, command="sleep MARK", job_shell=False, plain=None, leader=False):
        """
        Start the guard over the fake worker; wait for the task's C{sleep}.

        @param job_shell: run the guard under a shell that leads a session
            and process group of its own and writes the guard's status to
            C{status}, as a batch job's script does.
        @param leader: start the guard itself in a session of its own (so
            it leads its process group).
        @return: C{(guard process, marker, (worker pid, guard pid, wrapper pid))}.
        """
        directory = os.path.join(self.root, f"task-{len(os.listdir(self.root))}")
        os.makedirs(directory)
        mark = marker()
        env = dict(self.env, TASK_COMMAND=command.replace("MARK", mark))
        if plain:
            env["PLAIN"] = plain
        argv = [sys.executable, "-m", "everest_agent.pilot.guard", "--grace", "1", "--",
                sys.executable, self.worker_script, mode, directory]
        if job_shell:
            argv = ["/bin/sh", "-c", '"$@"; s=$?; echo $s > "$0"; exit $s', os.path.join(directory, "status"), *argv]
        out = open(os.path.join(directory, "guard.out"), "wb")
        self.addCleanup(out.close)
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   start_new_session=job_shell or leader)
        self.addCleanup(self.clean_up, process, mark)
        self.directory = directory
        path = os.path.join(directory, "worker")
        wait_for(lambda: os.path.exists(path) or process.poll() is not None, what="the fake worker")
        self.assertIsNone(process.poll(), self.output())
        with open(path) as f:
            pids = tuple(int(p) for p in f.read().split())
        wait_for(lambda: any(c.startswith("sleep ") for c in marked_processes(mark).values()),
                 what="the task's sleep")
        return process, mark, pids

    def output(self):
        """What the guard (and the fake worker) wrote to their standard output and error."""
        with open(os.path.join(self.directory, "guard.out"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def clean_up(self, process, mark):
        """Kill whatever a failed test left: the task, the guard, its worker."""
        for pid in list(marked_processes(mark)) + list(marked_processes(self.worker_script)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if process.poll() is None:
            process.kill()
        process.wait()

    def assert_none_left(self, mark, timeout=5.0):
        deadline = time.monotonic() + timeout
        while marked_processes(mark):
            if time.monotonic() >= deadline:
                self.fail(f"processes of the task ({mark}) still alive after {timeout:g} s: "
                          f"{marked_processes(mark)}")
            time.sleep(0.05)

    def go(self):
        with open(os.path.join(self.directory, "go"), "w"):
            pass

    def test_worker_exits_normally(self):
        process, mark, (worker, guard_pid, wrapper) = self.start("exit")
        self.assertEqual(guard_pid, process.pid)  # the worker is the guard's child
        self.go()
        self.assertEqual(process.wait(timeout=15), 3)  # the worker's status
        self.assert_none_left(mark)
        self.assertIn("process groups it left: 1 (SIGTERM", self.output())

    def test_worker_killed(self):
        process, mark, (worker, _, wrapper) = self.start("wait")
        os.kill(worker, signal.SIGKILL)
        self.assertEqual(process.wait(timeout=15), 128 + signal.SIGKILL)
        self.assert_none_left(mark)

    def test_sigterm_forwarded(self):
        process, mark, (worker, _, _) = self.start("term")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=15), 7)  # the worker took the TERM and exited 7
        self.assert_none_left(mark)
        self.assertIn("got SIGTERM: sending SIGTERM to the worker", self.output())

    def test_sigterm_to_a_worker_that_dies_of_it(self):
        process, mark, _ = self.start("wait")
        process.send_signal(signal.SIGHUP)
        self.assertEqual(process.wait(timeout=15), 128 + signal.SIGTERM)
        self.assert_none_left(mark)

    def test_group_kill_spares_the_guard(self):
        """A kill of the job's whole process group (Grid Engine's qdel): the guard ends the task."""
        shell, mark, (worker, guard_pid, _) = self.start("wait", job_shell=True)
        self.assertEqual(os.getpgid(worker), shell.pid)  # the worker stays in the job's group...
        wait_for(lambda: os.getpgid(guard_pid) == guard_pid, what="the guard to leave the job's group")
        os.killpg(shell.pid, signal.SIGKILL)
        self.assertEqual(shell.wait(timeout=15), -signal.SIGKILL)
        self.assert_none_left(mark)
        wait_for(lambda: process_state(guard_pid) in (None, "Z"), what="the guard to exit")

    def test_job_shell_spared_and_status_kept(self):
        """
        A process the worker left in the job's group is signalled alone,
        not with its group: the job's shell lives on and records the status.
        """
        plain = marker()
        shell, mark, _ = self.start("plain", job_shell=True, plain=plain)
        wait_for(lambda: marked_processes(plain), what="the worker's plain child")
        self.go()
        self.assertEqual(shell.wait(timeout=15), 5)
        with open(os.path.join(self.directory, "status")) as f:
            self.assertEqual(f.read(), "5\n")
        self.assert_none_left(mark)
        self.assert_none_left(plain)
        self.assertIn("process groups it left: 1, processes in the job's group: 1", self.output())

    def test_finished_tasks_leftover_is_the_guards_and_is_killed(self):
        process, mark, (worker, guard_pid, wrapper) = self.start("wait", command="sleep MARK &")

        def left_to_the_guard():
            for pid in marked_processes(mark):
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == guard_pid:
                    return True
            return False

        # The wrapper has ended; its subshell's background sleep is re-parented to the guard, not init.
        wait_for(left_to_the_guard, what="the task's leftover sleep to be the guard's child")
        os.kill(worker, signal.SIGKILL)
        self.assertEqual(process.wait(timeout=15), 128 + signal.SIGKILL)
        self.assert_none_left(mark)

    def test_guard_that_leads_its_group(self):
        """It cannot leave the group, says so, and still ends what the worker left."""
        process, mark, (worker, guard_pid, _) = self.start("wait", leader=True)
        self.assertEqual(os.getpgid(guard_pid), guard_pid)
        os.kill(worker, signal.SIGKILL)
        self.assertEqual(process.wait(timeout=15), 128 + signal.SIGKILL)
        self.assert_none_left(mark)
        self.assertIn("it leads the job's process group and cannot leave it", self.output())

    def test_children(self):
        child = subprocess.Popen(["sleep", "30"])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        self.assertIn(child.pid, guard.children(os.getpid()))
        self.assertNotIn(os.getpid(), guard.children(os.getpid()))

    def test_worker_does_not_outlive_the_guard(self):
        process, mark, (worker, _, _) = self.start("wait")
        process.kill()
        process.wait()
        wait_for(lambda: process_state(worker) in (None, "Z"), what="the worker to die with its guard")


class ArgumentTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(guard.parse_args(["--", "w", "-x"]), (guard.DEFAULT_GRACE, ["w", "-x"]))
        self.assertEqual(guard.parse_args(["--grace", "1.5", "--", "w"]), (1.5, ["w"]))
        self.assertEqual(guard.parse_args(["--grace=0", "--", "w", "--"]), (0.0, ["w", "--"]))
        for bad in ([], ["--"], ["w"], ["--grace", "x", "--", "w"], ["--grace", "-1", "--", "w"],
                    ["--grace", "nan", "--", "w"], ["--other", "--", "w"], ["--grace"]):
            self.assertRaises(ValueError, guard.parse_args, bad)

    def test_usage_error(self):
        self.assertEqual(subprocess.run([sys.executable, "-m", "everest_agent.pilot.guard", "w"],
                                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True).returncode, 2)

    def test_exit_status(self):
        self.assertEqual(guard.exit_status(3 << 8), 3)
        self.assertEqual(guard.exit_status(signal.SIGKILL), 137)
        self.assertEqual(guard.exit_status(0), 0)

    def test_no_twisted(self):
        """The guard starts for every pilot job: it imports no Twisted."""
        code = "import sys, everest_agent.pilot.guard; print(any(m.startswith('twisted') for m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                             capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "False")
