"""
The TaskManager turns platform commands into tasks.

It owns the task registry (durable, in C{state_dir}), the pool of slots
(C{max_tasks}), and one L{TaskWorker} per unfinished task.  A new task is
recorded on disk before its C{ACCEPTED} is reported; a known task id is
never run again (its current state is re-sent instead).
"""

import collections
import itertools
import os
import time

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from everest_agent import dialect, paths, policy, protocol
from everest_agent.fsio import InlineFileIO
from everest_agent.protocol import ProtocolError, SpecError
from everest_agent.retention import TaskDirRetention
from everest_agent.taskdirs import ThreadTaskDirs
from everest_agent.worker import Phase, TaskContext, TaskWorker


def _damage(record):
    """What is wrong with a registry record of an unfinished task, if anything."""
    if record.get("failure"):
        return None
    try:
        record["spec"] = protocol.validate_spec(record.get("spec"))
        dialect.check_extras(record["spec"])  # an Everest-dialect task's own record
        if record.get("state") is not None and record.get("state") not in protocol.STATE_RANK:
            return f"unknown state {record.get('state')!r}"
        if record.get("phase", Phase.NEW) not in tuple(Phase):
            return f"unknown phase {record.get('phase')!r}"
        if record.get("phase") == Phase.ENDED:
            result = record.get("result") or {}
            if set(result) != {"exit_code", "reason", "canceled"}:
                return "its result is incomplete"
        job = record.get("job")
        if job is not None and not (isinstance(job, dict) and isinstance(job.get("id"), str)):
            return "its job id is not a string"
    except SpecError as e:
        return f"its spec: {e}"
    return None


class SlotPool:
    """
    C{capacity} slots handed out first come, first served: a task waits
    until the tasks ahead of it have their slots, so a big task is not
    starved by a stream of small ones.

    Every operation is O(1) however many tasks wait: a canceled wait is
    only marked, and dropped when it reaches the head of the line.

    Two kinds of waits share the one line: L{acquire} (a Deferred, for a
    worker that already exists) and L{enqueue} (a task id and a count, no
    Deferred, no worker: what waits costs a str in the line and an entry
    in a dict).  An enqueued task that gets its slots is handed to
    C{on_grant(task_id, count)}, which owns them from then on.

    With a C{clock}, slots given back are handed on at the end of the
    reactor turn (one timed call for every release of that turn), not in
    the middle of it: the platform's commands that arrived with the event
    that freed them (a batch of cancels) are all handled before a queued
    task starts in their place.
    """

    def __init__(self, capacity, clock=None):
        self.capacity = capacity
        self.used = 0
        self._clock = clock
        self._grant_call = None
        self._stopped = False
        # [count, Deferred or None once canceled], or a task id (a str) put
        # in line by enqueue(), whose count is in _light while it waits.
        self._waiting = collections.deque()
        self._light = {}  # task id -> slots, of the enqueue()d tasks still waiting
        self._queued = 0  # live entries in _waiting
        self.on_grant = None  # on_grant(task id, count): an enqueue()d task got its slots

    def acquire(self, count):
        if not self._queued and not self._stopped and self.used + count <= self.capacity:
            self.used += count
            return defer.succeed(count)
        entry = [count, None]

        def cancel(d):
            if entry[1] is not None:
                entry[1] = None
                self._queued -= 1
                self._grant()  # the tasks behind it may fit now

        d = defer.Deferred(cancel)
        entry[1] = d
        self._waiting.append(entry)
        self._queued += 1
        return d

    def release(self, count):
        self.used -= count
        if self._clock is None:
            self._grant()
        elif self._grant_call is None and self._queued:
            self._grant_call = self._clock.callLater(0, self._grant)

    def _grant(self):
        self._grant_call = None
        if self._stopped:
            return
        waiting = self._waiting
        light = self._light
        while waiting:
            entry = waiting[0]
            if entry.__class__ is str:
                count = light.get(entry)
                if count is None:  # withdrawn
                    waiting.popleft()
                    continue
                if self.used + count > self.capacity:
                    break
                waiting.popleft()
                del light[entry]
                self._queued -= 1
                self.used += count
                self.on_grant(entry, count)
                if self._stopped:
                    return
                continue
            count, d = entry
            if d is None:
                waiting.popleft()
                continue
            if self.used + count > self.capacity:
                break
            waiting.popleft()
            entry[1] = None
            self._queued -= 1
            self.used += count
            d.callback(count)

    def enqueue(self, task_id, count):
        """
        Put a task in line without a Deferred; C{on_grant(task_id, count)}
        is called when its turn comes and C{count} slots are free (at once
        if nobody waits and they are free now).
        """
        if not self._queued and not self._stopped and self.used + count <= self.capacity:
            self.used += count
            self.on_grant(task_id, count)
            return
        self._waiting.append(task_id)
        self._light[task_id] = count
        self._queued += 1

    def withdraw(self, task_id):
        """
        Take an enqueued task out of the line (O(1): its entry is dropped
        when it reaches the head). @return: True if it was waiting.
        """
        if self._light.pop(task_id, None) is None:
            return False
        self._queued -= 1
        self._grant()  # the tasks behind it may fit now
        return True

    def waiting(self, task_id):
        """Whether C{task_id} is enqueued and waiting."""
        return task_id in self._light

    def waiting_ids(self):
        """The enqueued tasks still waiting, first in line first."""
        light = self._light
        return [entry for entry in self._waiting if entry.__class__ is str and entry in light]

    def can_take(self, count):
        """Whether C{count} slots would be granted at once."""
        return not self._queued and not self._stopped and self.used + count <= self.capacity

    @property
    def queued(self):
        return self._queued

    def set_capacity(self, capacity):
        """
        Change the number of slots (pilot mode: the free cores of the
        connected pilots).  Slots in use above a lowered capacity stay in
        use until given back; a raised one is handed out at once.
        """
        raised = capacity > self.capacity
        self.capacity = capacity
        if raised and self._queued:
            self._grant()

    def stop(self):
        """Grant nothing any more (the agent is stopping: queued tasks stay queued)."""
        self._stopped = True
        if self._grant_call is not None and self._grant_call.active():
            self._grant_call.cancel()
        self._grant_call = None


class TaskManager(Service):
    log = Logger()

    def __init__(self, registry, sender, handler, stager, work_dir, slots, *,
                 allowed_commands=(), allowed_environment=(), keep_finished=10000,
                 wallclock=time.time, files=None, keep_task_dirs=None, environ=None, dirs=None):
        """
        @param files: the L{everest_agent.fsio.IFileIO} for blocking work
            (default: inline, for tests).
        @param dirs: the L{everest_agent.taskdirs.ITaskDirs} that makes task
            directories and retires old ones (default: one in C{files}).
        @param environ: the environment C{$NAME} in an Everest-dialect spec's
            environment values reads (default: the agent's own).
        """
        self.registry = registry
        self.sender = sender
        self.handler = handler
        self.stager = stager
        self.work_dir = work_dir
        self.pool = SlotPool(slots, clock=sender.clock)
        self.pool.on_grant = self._granted
        self._accepting = {}  # task id -> canceled?, of waiting tasks not yet on disk
        self._dirs = {}  # task id -> Deferred of its directory, made ahead for the head of the line
        self.allowed_commands = list(allowed_commands)
        self.allowed_environment = frozenset(allowed_environment)
        files = files if files is not None else InlineFileIO()
        self.dirs = dirs if dirs is not None else ThreadTaskDirs(work_dir, files)
        self.retention = TaskDirRetention(work_dir, keep_task_dirs, self.dirs, registry,
                                          sender.clock, wallclock)
        self.keep_finished = keep_finished
        self.wallclock = wallclock
        self.environ = os.environ if environ is None else environ
        self.workers = {}  # task id -> TaskWorker of every unfinished task
        self.context = TaskContext(self, self.dirs.make)
        self._awaiting_ack = collections.deque()  # (terminal seq, task id), in seq order
        self._unreported = set()  # tasks not finished, or finished but not acknowledged
        self._reported = collections.deque()  # finished and acknowledged, oldest first
        self.slot_listeners = []
        self.stopping = False  # set while the agent stops: tasks are recorded, not started
        self.channel = None  # the TaskChannel, when enabled
        self.passive = None  # passive mode's reports (passive/tasks.py), when enabled
        sender.add_ack_listener(self.acked)

    # -- start and stop -------------------------------------------------------

    def _carry_forward(self):
        """
        Bring task records up to the states the outbox holds.  The outbox is
        written before the registry (one commit group), so a crash between
        the two writes leaves the outbox ahead, never behind: the state was
        reported, and must not be reported again.
        """
        for message in self.sender.outbox.durable_pending():
            if message[0] != protocol.TASK_STATE:
                continue
            task_id, state, info = message[1], message[2], message[3]
            record = self.registry.get(task_id)
            if record is None or self.owned(task_id) or not protocol.may_follow(record.get("state"), state):
                continue
            self.log.info(
                "Task {task_id}: carrying its state {state} forward from the outbox",
                task_id=task_id, state=state,
            )
            fields = {"state": state, "state_seq": info["seq"]}
            if state in protocol.TERMINAL:
                kept = {k: v for k, v in info.items() if k not in ("seq", "time")}
                fields.update(finished=True, info=kept, terminal_seq=info["seq"])
            self.registry.update(task_id, **fields)

    def _resend_lost_terminals(self):
        """
        A finished record whose terminal report is neither acknowledged nor
        in the outbox never reached the disk as a message (the machine went
        down between the two files' fsyncs, a record written by an older
        version, or hand-damaged state): report it now, or the platform
        would wait for it forever.
        """
        outbox = self.sender.outbox
        pending = {message[3].get("seq") for message in outbox.durable_pending()
                   if message[0] == protocol.TASK_STATE}
        for task_id, record in self.registry.records.items():
            if not record.get("finished") or record.get("owner") is not None:
                continue  # (a passive client's task is never the platform's business)
            seq = record.get("terminal_seq")
            if seq is not None and (seq <= outbox.acked or seq in pending):
                continue
            self.log.warn("Task {task_id}: its {state} was never sent; sending it now",
                          task_id=task_id, state=record.get("state"))
            self.sender.task_state(task_id, record["state"], record.get("info") or {})
            self.registry.update(task_id, terminal_seq=outbox.last_seq)

    def startService(self):
        super().startService()
        self._carry_forward()
        self._resend_lost_terminals()
        acked = self.sender.outbox.acked
        resumed = 0
        finished = []
        waiting = []  # (task id, record, slots) of the tasks that wait for slots
        owned_finished = []
        for task_id, record in self.registry.records.items():
            if record.get("finished") and record.get("owner") is not None:
                owned_finished.append((record.get("finished_at") or 0, task_id))  # no platform ACK to wait for
                continue
            if record.get("finished"):
                seq = record.get("terminal_seq")
                if seq is not None and seq <= acked:
                    finished.append((seq, task_id))
                else:
                    self._unreported.add(task_id)
                    if seq is not None:
                        self._awaiting_ack.append((seq, task_id))
                continue
            self._unreported.add(task_id)
            resumed += 1
            damage = _damage(record)
            if damage:
                # Never crash on, or block behind, a damaged record: the task
                # fails with the reason and everything else goes on.
                self.log.error("Task {task_id}: damaged state record ({why})", task_id=task_id, why=damage)
                record["failure"] = f"the agent's record of this task is damaged: {damage}"
            count = self._waits_light(record)
            if count:
                waiting.append((task_id, record, count))
            else:
                self._start_worker(task_id, record)
        # Tasks that held slots before the restart take them again first;
        # those that waited line up behind them, in the order they came.
        for task_id, record, count in waiting:
            self._line_up(task_id, record, count)
        self._reported.extend(task_id for _, task_id in sorted(owned_finished))
        self._reported.extend(task_id for _, task_id in sorted(finished))
        for task_id in self._reported:
            self.retention.finished(task_id, self.registry.get(task_id).get("finished_at"), sweep=False)
        self.retention.sweep()
        self._awaiting_ack = collections.deque(sorted(self._awaiting_ack))
        if resumed:
            self.log.info("Resuming {count} unfinished tasks", count=resumed)

    def stopService(self):
        super().stopService()
        # Tasks keep running (batch jobs in the scheduler; local processes in
        # their own sessions); the registry says where each one was, and the
        # next start takes them up from there.
        # No slot freed by an abandoned worker goes to a queued task: what is
        # queued stays queued for the next start.
        self.pool.stop()
        self.retention.stop()
        if self.dirs.taken or self.dirs.given:
            self.log.info("Task directories used again: {taken}; emptied for use again: {given}",
                          taken=self.dirs.taken, given=self.dirs.given)
        for worker in list(self.workers.values()):
            worker.abandon()
        return self.registry.stop()

    # -- platform commands ----------------------------------------------------

    def submit(self, task_id, spec, context=None, owner=None):
        """
        A C{TASK_SUBMIT}: record the task, then run it.

        @param context: the object that followed the spec (section 8), kept
            with the task and never interpreted.
        @param owner: the passive-mode credential the task belongs to (a
            string, never a token), kept in the record as C{owner}; C{None}
            for the active platform's tasks.  A passive task's spec is
            always in the Everest dialect.
        """
        record = self.registry.get(task_id)
        if record is not None:
            if record.get("owner") != owner:
                # Another client's (or the platform's) task: say no more than that the id is taken.
                raise ProtocolError(protocol.E_INVALID, f"task id {task_id} is already in use", task_id)
            if owner is not None and self.passive is not None:
                self.passive.resend(task_id, record)
                return
            self._resend_state(task_id, record)
            return
        failure = None
        try:
            spec = dialect.validate(spec, self.environ, context, passive=owner is not None)
            policy.check(spec, self.allowed_commands, self.allowed_environment)
            self.handler.slots_needed(spec["resourceRequirements"])
        except (SpecError, ValueError) as e:
            failure = str(e)
            spec = None
        # One info line per task is enough at thousands of tasks a second: its
        # end.  (Not even a debug line here: an event costs as much as the
        # rest of an accept, filtered or not.)
        fields = {"state": None, "phase": Phase.NEW, "created": self.wallclock()}
        if owner is not None:
            fields["owner"] = owner
        if failure is not None:
            fields["failure"] = failure
        record_d = self.registry.create(task_id, spec, **fields)
        record = self.registry.get(task_id)
        self._unreported.add(task_id)
        if self.stopping:
            worker = TaskWorker(self.context, task_id, record)
            # Accepted, and started when the agent starts again.
            record_d.addCallback(lambda _: worker.report(protocol.ACCEPTED))
            return
        # ACCEPTED only once the task is on disk.
        count = self._waits_light(record)
        if count:
            # Nothing to stage in: the task waits for its slots as an entry
            # in the pool's line, and its worker is made when they are its.
            self._accepting[task_id] = False
            record_d.addCallback(self._accepted, task_id, record, count)
            return
        worker = TaskWorker(self.context, task_id, record)
        self.workers[task_id] = worker
        record_d.addCallback(lambda _: worker.start())

    def _resend_state(self, task_id, record):
        state = record.get("state")
        if state is None:
            return  # its ACCEPTED is on the way
        self.log.info("Task {task_id} submitted again; re-sending its state {state}", task_id=task_id, state=state)
        d = self.sender.task_state(task_id, state, record.get("info") or {})
        if state in protocol.TERMINAL:
            self.registry.update(task_id, terminal_seq=self.sender.outbox.last_seq)
            # The platform wants this report again: it must be acknowledged
            # anew before the task can be forgotten.
            self._unreported.add(task_id)
            d.addCallback(self.terminal_reported, task_id)

    async def cancel_all(self, timeout):
        """Cancel every running task and wait (at most C{timeout} s) for them to end."""
        for task_id in self.pool.waiting_ids():
            self.pool.withdraw(task_id)
            self._dirs.pop(task_id, None)
            self._finish_canceled(task_id)
        workers = [w for w in self.workers.values() if w.done is not None]
        if not workers:
            return
        self.log.info("Canceling {count} tasks before stopping", count=len(workers))
        for worker in workers:
            worker.cancel()
        waiting = defer.DeferredList([w.done for w in workers], consumeErrors=True)
        waiting.addTimeout(timeout, self.sender.clock)
        try:
            await waiting
        except defer.TimeoutError:
            self.log.warn("Some tasks did not end within {timeout} s", timeout=timeout)

    def cancel(self, task_id, owner=None):
        if task_id not in self.registry or self.owned(task_id) != owner:
            raise ProtocolError(protocol.E_UNKNOWN_TASK, f"cancel of unknown task {task_id}", task_id)
        worker = self.workers.get(task_id)
        if worker is not None:
            worker.cancel()
        elif self.pool.withdraw(task_id):
            self._dirs.pop(task_id, None)
            self._finish_canceled(task_id)
        elif task_id in self._accepting:
            self._accepting[task_id] = True  # CANCELED right after its ACCEPTED
        # A finished task: nothing to do.

    def deliver(self, task_id, text, owner=None):
        """A TASK_MESSAGE from the platform (or a passive client, C{owner}), for a task's channel."""
        if task_id not in self.registry or self.owned(task_id) != owner:
            raise ProtocolError(protocol.E_UNKNOWN_TASK, f"message for unknown task {task_id}", task_id)
        if self.channel is None:
            raise ProtocolError("no-task-channel", "the task channel is not enabled on this agent", task_id)
        if self.is_running(task_id):
            self.channel.to_task(task_id, text)
        else:
            self.log.info("Dropping a message for finished task {task_id}", task_id=task_id)

    def is_running(self, task_id):
        """Whether a task may use the task channel: known and not finished."""
        return task_id in self.workers or self.pool.waiting(task_id) or task_id in self._accepting

    def unfinished(self):
        """How many tasks are not finished (running, staging or waiting)."""
        return len(self.workers) + self.pool.queued + len(self._accepting)

    # -- bookkeeping ------------------------------------------------------------

    def task_dir(self, task_id):
        return os.path.join(self.work_dir, task_id)

    def slots_changed(self):
        for listener in self.slot_listeners:
            listener()

    def terminal_reported(self, seq, task_id):
        """A task's terminal state is durably in the outbox as C{seq}."""
        self.workers.pop(task_id, None)
        if self.channel is not None:
            self.channel.task_finished(task_id)
        if self.owned(task_id) is not None:
            self._forget_later(task_id)  # its record is its report; no platform ACK to wait for
            return
        if seq is None:
            return
        if seq <= self.sender.outbox.acked:
            self._forget_later(task_id)
        else:
            self._awaiting_ack.append((seq, task_id))

    def acked(self, seq):
        pending = self._awaiting_ack
        while pending and pending[0][0] <= seq:
            self._forget_later(pending.popleft()[1])

    def _forget_later(self, task_id):
        self._unreported.discard(task_id)
        self._reported.append(task_id)
        self.retention.finished(task_id, (self.registry.get(task_id) or {}).get("finished_at"))
        while len(self._reported) > self.keep_finished:
            old = self._reported.popleft()
            if old not in self._unreported:
                self.retention.forgotten(old)
                self.registry.forget(old)

    def hello_tasks(self):
        """Tasks not finished, or whose terminal report is not acknowledged yet (the platform's only)."""
        return sorted(t for t in self._unreported if self.owned(t) is None)

    # -- passive mode: owned tasks (contract, section 9) ------------------------

    def owned(self, task_id):
        """The passive-mode owner of a task (C{None}: the platform's or unknown)."""
        record = self.registry.get(task_id)
        return None if record is None else record.get("owner")

    def report(self, task_id, state, info):
        """
        A worker's TASK_STATE, routed by the record's owner: the platform's
        through the sender (outbox), a passive client's through
        L{passive} (its sessions), never the other way.

        @return: C{(seq, d)} as L{TaskContext.report}.
        """
        owner = self.owned(task_id)
        if owner is None or self.passive is None:
            # (No passive layer at all: a manager on its own, as in unit
            # tests; the agent always sets one, see agent.py.)
            d = self.sender.task_state(task_id, state, info)
            return self.sender.outbox.last_seq, d
        return self.passive.report(owner, task_id, state, info)


    def counts(self):
        """C{(busy slots, tasks waiting for a slot)}."""
        return self.pool.used, self.pool.queued

    def _start_worker(self, task_id, record):
        worker = TaskWorker(self.context, task_id, record)
        self.workers[task_id] = worker
        worker.start()
        return worker

    # -- waiting for slots without a worker -----------------------------------

    def _waits_light(self, record):
        """
        The slots a task needs if it can wait for them without a worker
        (nothing to stage in, or staged already; a sound record), else 0.
        """
        if record.get("failure") or record.get("state") not in _LIGHT_STATES:
            return 0
        phase = record.get("phase", Phase.NEW)
        if phase == Phase.NEW:
            if record["spec"]["inputs"]:
                return 0
        elif phase != Phase.STAGED:
            return 0
        try:
            return self.handler.slots_needed(record["spec"]["resourceRequirements"])
        except ValueError:
            return 0  # the worker fails it with the reason

    def _accepted(self, _, task_id, record, count):
        """A waiting task's record is on disk (the first, for a burst of them)."""
        canceled = self._accepting.pop(task_id, False)
        if self.pool._stopped:
            return  # recorded: the next start reports it and lines it up
        if canceled:
            self._finish_canceled(task_id)
            return
        self._line_up(task_id, record, count)

    def _line_up(self, task_id, record, count):
        """
        Put a recorded task in the pool's line.  If its slots are free now,
        its worker starts (and reports what is missing); else C{ACCEPTED}
        (if not yet reported) and C{QUEUED} go out here, with one record.
        """
        if not self.pool.can_take(count):
            state = record.get("state")
            # (Through report(): a passive client's task goes to its sessions.)
            if state is None:
                self.report(task_id, protocol.ACCEPTED, {})
            if protocol.may_follow(state, protocol.QUEUED):
                seq, _ = self.report(task_id, protocol.QUEUED, {})
                self.registry.update(task_id, state=protocol.QUEUED, state_seq=seq)
        self.pool.enqueue(task_id, count)

    def _granted(self, task_id, count):
        """The pool gave a waiting task its slots: now it gets its worker."""
        record = self.registry.get(task_id)
        worker = TaskWorker(self.context, task_id, record, granted=count,
                            directory=self._dirs.pop(task_id, None))
        self.workers[task_id] = worker
        worker.start()
        self._make_dirs_ahead()

    def _make_dirs_ahead(self):
        """
        Make the directories of the next tasks in line (as many as there
        are slots) now, so a granted task does not wait for its own.
        """
        pool = self.pool
        ahead = pool.capacity - len(self._dirs)
        if ahead <= 0 or not pool.queued:
            return
        for task_id in itertools.islice(pool._waiting, ahead + 16):
            if ahead <= 0:
                break
            if task_id.__class__ is not str or task_id in self._dirs or not pool.waiting(task_id):
                continue
            record = self.registry.get(task_id)
            if record is None or record.get("phase", Phase.NEW) != Phase.NEW:
                continue
            # (A failure is kept as the value, for the worker to raise.)
            self._dirs[task_id] = self.context.make_task_dir(task_id).addErrback(lambda f: f.value)
            ahead -= 1

    def _finish_canceled(self, task_id):
        """A task canceled while it waited (no worker, no slots): report it CANCELED."""
        worker = TaskWorker(self.context, task_id, self.registry.get(task_id))
        self.workers[task_id] = worker
        worker.cancel()
        worker.start()


#: States in which a task may wait for its slots without a worker.
_LIGHT_STATES = frozenset((None, protocol.ACCEPTED, protocol.STAGING_IN, protocol.QUEUED))
