"""
Removing the directories of finished tasks: C{[agent] keep_task_dirs}.

A task's directory (its inputs, C{stdout}, C{stderr}, outputs) outlives the
task so that someone can look at it; without a bound, 100,000 tasks left
1.2 GB behind.  L{TaskDirRetention} keeps the directories of finished
tasks whose final report the platform acknowledged, newest last, and
removes the oldest once there are more than a count of them, or once they
finished longer ago than an age.  A running task, or one whose report is
not acknowledged yet, is never touched.

Removal is blocking file work: it runs through the injected
L{everest_agent.taskdirs.ITaskDirs} (in the agent, a process of its own),
never in the reactor thread.  The directory
is first renamed to C{.removing-<name>} in C{work_dir} (so a new task of
the same id would get a fresh one), then emptied and kept as a spare for a
new task's directory (L{everest_agent.spares}: making files is what costs),
or, with enough spares kept, removed with L{shutil.rmtree}, which walks by
descriptors and never follows a link the task left inside.  Either way
nothing of the task is left.  A removed directory is marked
C{dir_removed} in the task's record, which C{everest-agent status} counts.
"""

import collections
import os
import shutil
import stat

from twisted.logger import Logger


def remove_task_dir(work_dir, name, spares=None):
    """
    Remove task directory C{name} of C{work_dir} (blocking), or empty it
    into C{spares} (an L{everest_agent.spares.SpareDirs}) if they want it.
    @return: True if there was one.
    """
    root = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        aside = f".removing-{name}"
        try:
            os.rename(name, aside, src_dir_fd=root, dst_dir_fd=root)
        except FileNotFoundError:
            return False
        except OSError:
            if not os.path.lexists(os.path.join(work_dir, aside)):
                raise
            # a removal that died half-way: finish it first, then this one
            _remove_entry(root, work_dir, aside)
            os.rename(name, aside, src_dir_fd=root, dst_dir_fd=root)
        if spares is None or not spares.give(root, aside):
            _remove_entry(root, work_dir, aside)
        return True
    finally:
        os.close(root)


def _remove_entry(root, work_dir, name):
    mode = os.stat(name, dir_fd=root, follow_symlinks=False).st_mode
    if stat.S_ISDIR(mode):
        # A real directory (lstat), in the operator's work_dir; inside it,
        # rmtree walks by descriptors and never follows a link
        # (shutil.rmtree.avoids_symlink_attacks on Linux).
        shutil.rmtree(os.path.join(work_dir, name))
    else:
        os.unlink(name, dir_fd=root)


class TaskDirRetention:
    log = Logger()

    def __init__(self, work_dir, policy, dirs, registry, clock, wallclock):
        """
        @param policy: None (keep every one), C{("count", N)} or
            C{("age", seconds)}, as L{everest_agent.config} parses
            C{keep_task_dirs}.
        @param dirs: the L{everest_agent.taskdirs.ITaskDirs} that retires
            them (off the reactor; a directory is emptied to be used again,
            L{everest_agent.spares}, unless the task left processes behind).
        """
        self.work_dir = work_dir
        self.policy = policy
        self._dirs = dirs
        self._registry = registry
        self._clock = clock
        self._wallclock = wallclock
        self._kept = collections.OrderedDict()  # task id -> finished_at, oldest first
        self._timer = None
        self.removed = 0
        self.removing = 0

    @property
    def kept(self):
        return len(self._kept)

    def finished(self, task_id, finished_at=None, sweep=True):
        """Task C{task_id} is finished and acknowledged: its directory may go in time."""
        if self.policy is None or task_id in self._kept:
            return
        record = self._registry.get(task_id) or {}
        if record.get("dir_removed"):
            return
        self._kept[task_id] = finished_at if finished_at is not None else self._wallclock()
        if sweep:
            self.sweep()

    def forgotten(self, task_id):
        """The registry forgets C{task_id}: its directory goes now (nobody would find it later)."""
        if self._kept.pop(task_id, None) is not None:
            self._remove(task_id)

    def sweep(self):
        self._timer = None
        if self.policy is None:
            return
        kind, limit = self.policy
        kept = self._kept
        if kind == "count":
            while len(kept) > limit:
                self._remove(kept.popitem(last=False)[0])
            return
        now = self._wallclock()
        while kept:
            task_id, when = next(iter(kept.items()))
            if when + limit > now:
                break
            del kept[task_id]
            self._remove(task_id)
        if kept and self._timer is None:
            first = next(iter(kept.values()))
            self._timer = self._clock.callLater(max(1.0, first + limit - now), self.sweep)

    def _remove(self, task_id):
        self.removing += 1
        d = self._dirs.retire(task_id, not (self._registry.get(task_id) or {}).get("leftover"))

        def done(_):
            self.removing -= 1
            self.removed += 1
            if task_id in self._registry:
                self._registry.update(task_id, dir_removed=True)

        def failed(f):
            self.removing -= 1
            self.log.warn("Cannot remove the directory of task {task_id}: {error}",
                          task_id=task_id, error=f.getErrorMessage())

        d.addCallbacks(done, failed)
        return d

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
