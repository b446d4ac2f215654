"""
One task's life: stage in, wait for a slot, run, stage out, report.

The worker records its progress in the task registry as a C{phase} before
each step that must not be repeated, so that an agent restarted from its
state directory resumes the task where it was and never runs it twice:

  - C{new}: nothing has happened; inputs are (re)fetched.
  - C{staged}: inputs are in place; waiting for a slot.
  - C{submitting}: on disk before the handler is asked to start the job.
    A restart in this phase asks the handler to find the job instead of
    starting another one.  For jobs that end with this machine (local
    processes, L{ITaskHandler.durable_jobs} false), written to the file
    before the job starts is enough: a killed agent leaves it in the page
    cache, and a machine crash ends the job too.
  - C{submitted}: the handler's job id is recorded.
  - C{ended}: the job's result is recorded; outputs are (re)sent.

An Everest-dialect task (contract, section 8) lives the same life; only its
stage-out differs: after its outputs are sent (and those that stay in the
task directory are listed and hashed), it reports C{STAGED_OUT} with
C{outputData} before its terminal state.  A restart in C{ended} does the
outputs again; C{STAGED_OUT}, like every state, is reported once.

Only what a restart needs waits for the disk: the task's own record
(before C{ACCEPTED}, which waits for it anyway) and C{submitting} for a
batch handler.  Everything else rides the next group commit, and a task's
slots are given back the moment its job ends, so the next queued task
starts at the end of that reactor turn.

The worker reaches the rest of the agent only through its L{TaskContext}
(built once by the manager): the registry's records, the reports, the
handler, the stager, the slots and the task directories.
"""

import enum

from twisted.internet import defer
from twisted.logger import Logger

from everest_agent import dialect, protocol
from everest_agent.interfaces import JobLost, JobNeverStarted, JobRequest, JobResult
from everest_agent.paths import PathEscape
from everest_agent.transfer.errors import StagingError


class Phase(str, enum.Enum):
    """Where a task is in its life, as recorded in its C{phase} field."""

    NEW = "new"
    STAGED = "staged"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    ENDED = "ended"

    def __str__(self):
        return self.value


class TaskContext:
    """
    What a L{TaskWorker} may use of the agent, and nothing else.

    @ivar handler: the L{everest_agent.interfaces.ITaskHandler}.
    @ivar stager: moves the task's inputs and outputs.
    """

    def __init__(self, manager, make_directory):
        """
        @param manager: the L{everest_agent.manager.TaskManager}.
        @param make_directory: a callable taking a task directory's path
            and returning a Deferred that fires once the directory exists
            (the manager's goes through the file-system threads).
        """
        self._manager = manager
        self._make_directory = make_directory

    @property
    def handler(self):
        return self._manager.handler

    @property
    def stager(self):
        return self._manager.stager

    def wallclock(self):
        return self._manager.wallclock()

    @property
    def stopping(self):
        """True while the agent stops: no job is started any more."""
        return self._manager.stopping

    def record(self, task_id, **fields):
        """Change some fields of the task's record. @return: a Deferred of their durability."""
        return self._manager.registry.update(task_id, **fields)

    def write_ahead(self):
        """Put the records queued so far in their file now (fsync later)."""
        self._manager.registry.write_ahead()

    def report(self, task_id, state, info):
        """
        Send a TASK_STATE reliably.

        @return: C{(seq, d)}: the message's seq, and a Deferred firing with
            it once it is durable.
        """
        return self._manager.report(task_id, state, info)  # routed by owner (passive mode)

    def finished(self, seq, task_id):
        """The task's terminal report is durable as C{seq}."""
        self._manager.terminal_reported(seq, task_id)

    def acquire(self, slots):
        """@return: a (cancellable) Deferred firing once C{slots} are the task's."""
        return self._manager.pool.acquire(slots)

    def release(self, slots):
        """Give back C{slots} a task held."""
        self._manager.pool.release(slots)
        self._manager.slots_changed()

    def slots_changed(self):
        self._manager.slots_changed()

    def task_dir(self, task_id):
        return self._manager.task_dir(task_id)

    def make_task_dir(self, task_id):
        """@return: a Deferred firing once the task's directory exists."""
        return self._make_directory(self.task_dir(task_id))

    def environment(self, task_id):
        """What the agent adds to a task's environment."""
        environment = {"EVEREST_TASK_ID": task_id}
        channel = self._manager.channel
        if channel is not None:
            environment.update(channel.environment(task_id))
        return environment


class TaskWorker:
    log = Logger()

    def __init__(self, context, task_id, record, granted=0, directory=None):
        """
        @param granted: slots the pool already gave this task (a task that
            waited in the pool's line without a worker); it does not ask
            for them again.
        @param directory: a Deferred of the task's directory, if the
            manager made it ahead (firing with an exception if that failed).
        """
        self.context = context
        self.task_id = task_id
        self.record = record
        self.state = record.get("state")
        self.job = None
        self.slots = granted  # slots this task needs
        self.holding = granted  # slots it holds now
        self._directory = directory
        self._current = None  # what cancel() must interrupt
        self.cancel_requested = False
        self.abandoned = False
        self.done = None

    # -- reporting ------------------------------------------------------------

    def report(self, state, extra=None, /, **info):
        """
        Report a state change, if it moves the task forward.

        @param extra: more fields for the task's record, written with the
            state's (one record instead of two), or alone if the state is
            not reported.
        @return: a Deferred firing with the message's seq once it is durable
            (or None if the change was not reported).
        """
        if self.abandoned:
            return defer.succeed(None)
        if not protocol.may_follow(self.state, state):
            if extra:
                self.context.record(self.task_id, **extra)
            return defer.succeed(None)
        self.state = state
        # The message first, then the record, in the same commit group:
        # after the agent dies the record is never ahead of the outbox.
        seq, d = self.context.report(self.task_id, state, info)
        fields = dict(extra or (), state=state, state_seq=seq)
        if state in protocol.TERMINAL:
            fields.update(finished=True, info=info, finished_at=self.context.wallclock(),
                          terminal_seq=fields["state_seq"])
        elif info:
            fields["info"] = info
        self.context.record(self.task_id, **fields)
        if state in protocol.TERMINAL:
            d.addCallback(self.context.finished, self.task_id)
        return d

    # -- life -----------------------------------------------------------------

    def start(self):
        self.done = defer.Deferred.fromCoroutine(self._live())
        self.done.addErrback(
            lambda f: self.log.failure("Task {task_id} worker failed", f, task_id=self.task_id)
        )
        return self.done

    def cancel(self):
        if self.cancel_requested:
            return
        self.cancel_requested = True
        self.log.info("Canceling task {task_id} in state {state}", task_id=self.task_id, state=self.state)
        if self.job is not None:
            self.job.cancel()
        elif self._current is not None:
            self._current.cancel()

    def abandon(self):
        """
        The agent is stopping and leaves this task as it is: stop following
        it (no more reports or records) without touching its job.  The next
        agent to start on this state directory takes it up from its phase.
        """
        self.abandoned = True
        if self._current is not None:
            self._current.cancel()

    async def _step(self, d):
        """Await C{d}, letting cancel() interrupt it."""
        self._current = d
        try:
            return await d
        finally:
            self._current = None

    def _request(self):
        spec = self.record["spec"]
        environment = dict(spec["environment"])
        environment.update(self.context.environment(self.task_id))
        return JobRequest(
            task_id=self.task_id,
            directory=self.context.task_dir(self.task_id),
            command=spec["command"],
            environment=environment,
            requirements=spec["resourceRequirements"],
        )

    def release(self):
        """Give back the slots the task holds, if any."""
        if self.holding:
            holding, self.holding = self.holding, 0
            self.context.release(holding)

    async def _live(self):
        context = self.context
        if self.state is None:
            await self.report(protocol.ACCEPTED)
        if self.record.get("failure"):  # a bad spec or a refused command: nothing runs
            await self._finish(protocol.FAILED, JobResult(None, self.record["failure"]))
            return
        times = self.record.setdefault("times", {})
        clock = self.context.wallclock
        submitted = None  # the 'submitted' record, when it goes out with RUNNING
        try:
            phase = Phase(self.record.get("phase", Phase.NEW))
            if phase == Phase.NEW:
                if self.cancel_requested:
                    raise defer.CancelledError()
                start = clock()
                await self._stage_in()
                times["stageInTime"] = round(clock() - start, 6)
                if self.record["spec"]["inputs"]:
                    # (Without inputs, staging again after a restart costs nothing.)
                    context.record(self.task_id, phase=Phase.STAGED, times=times)
                phase = Phase.STAGED
            if phase == Phase.STAGED:
                if self.cancel_requested:
                    raise defer.CancelledError()
                await self._acquire_slots()
                if self.abandoned or self.context.stopping:
                    return  # the agent is stopping: the next start runs it
                handler = context.handler
                # Recorded before the job exists: a restart from here looks
                # for the job instead of starting a second one.
                submitting = context.record(self.task_id, phase=Phase.SUBMITTING, times=times)
                if handler.durable_jobs:
                    await self._step(submitting)
                else:
                    context.write_ahead()
                placed = handler.submit(self._request())
                if getattr(handler, "submit_waits", False):
                    # (Pilot mode: the Deferred waits for a pilot with room
                    # and its cancel takes the task out of that wait; a
                    # batch submit is never interrupted: its job would be
                    # left in the scheduler.)
                    placed = self._step(placed)
                self.job = await placed
                submitted = {"phase": Phase.SUBMITTED, "job": self._job_record()}
                if self.job.batch:
                    context.record(self.task_id, **submitted)
                    submitted = None  # else it goes with RUNNING, in the same turn
                phase = Phase.SUBMITTED
            elif phase in (Phase.SUBMITTING, Phase.SUBMITTED):
                await self._acquire_slots(report=False)
                job = self.record.get("job") or {}
                self.job = await self._find_or_submit(job.get("id"))
                if job.get("id") != self.job.job_id:
                    context.record(self.task_id, phase=Phase.SUBMITTED, job=self._job_record())
                phase = Phase.SUBMITTED
            if phase == Phase.SUBMITTED:
                result = await self._run(submitted)
            else:
                result = JobResult(**self.record["result"])
        except defer.CancelledError:
            if not self.abandoned:
                await self._finish(protocol.CANCELED, JobResult(None, "canceled", canceled=True))
            return
        except (StagingError, JobLost, ValueError) as e:
            await self._finish(protocol.FAILED, JobResult(None, str(e)))
            return
        except Exception as e:
            # A handler that could not start the job (scheduler refused it,
            # spawn failed): the task fails with that reason.
            self.log.warn("Task {task_id} could not run: {error!r}", task_id=self.task_id, error=e)
            await self._finish(protocol.FAILED, JobResult(None, str(e) or e.__class__.__name__))
            return
        finally:
            self.release()
        await self._stage_out_and_finish(result)

    async def _find_or_submit(self, job_id):
        """After a restart: find the job a previous agent started, or start it."""
        request = self._request()
        try:
            return await self.context.handler.reattach(request, job_id)
        except JobNeverStarted:
            self.log.info("Task {task_id} was never started; starting it now", task_id=self.task_id)
            return await self.context.handler.submit(request)

    async def _stage_in(self):
        inputs = dialect.staging_inputs(self.record["spec"])
        directory = self.context.task_dir(self.task_id)
        made, self._directory = self._directory, None
        try:
            if made is None:
                await self._step(self.context.make_task_dir(self.task_id))
            else:
                failed = await self._step(made)
                if isinstance(failed, Exception):
                    raise failed
        except OSError as e:
            raise StagingError(f"cannot create the task directory: {e.strerror or e}") from None
        except PathEscape as e:
            raise StagingError(f"cannot use the task directory: {e}") from None
        if inputs:
            await self.report(protocol.STAGING_IN)
            await self._step(
                defer.Deferred.fromCoroutine(self.context.stager.stage_in(directory, inputs))
            )

    async def _acquire_slots(self, report=True):
        if self.holding:  # granted before the worker was made
            self.context.slots_changed()
            return
        self.slots = self.context.handler.slots_needed(self.record["spec"]["resourceRequirements"])
        d = self.context.acquire(self.slots)
        if not d.called and report:
            self.report(protocol.QUEUED)
        await self._step(d)
        self.holding = self.slots
        self.context.slots_changed()

    def _job_record(self):
        return {"id": self.job.job_id, "batch": bool(self.job.batch)}

    def _job_info(self):
        return {"jobId": self.job.job_id} if self.job.batch else {}

    async def _run(self, submitted=None):
        job = self.job
        if self.cancel_requested:
            job.cancel()
        if job.batch and getattr(job, "queued_report", True):
            # (A pilot's task has no queue of its own: its QUEUED, if any,
            # was the wait for a slot.)
            self.report(protocol.QUEUED, **self._job_info())
        clock = self.context.wallclock
        ran = await self._step(_ran(job))
        started = clock()
        if ran:
            self.report(protocol.RUNNING, submitted, **self._job_info())
        result = await self._step(job.result)
        self.release()
        if getattr(job, "leftover", False):
            # Its directory is not to be used again (retention, spares.py).
            self.context.record(self.task_id, leftover=True)
        times = self.record.setdefault("times", {})
        times["runTime"] = round(clock() - started, 6)
        spec = self.record["spec"]
        if spec["outputs"] or dialect.extras(spec) is not None:
            # Outputs to send (or, in the Everest dialect, a STAGED_OUT to
            # report): a restart from here does them (again) instead of
            # waiting for a job that is gone.  Without any, the terminal
            # state is recorded in this same turn.
            self.context.record(
                self.task_id,
                phase=Phase.ENDED,
                times=times,
                result={"exit_code": result.exit_code, "reason": result.reason, "canceled": result.canceled},
            )
        return result

    async def _stage_out_and_finish(self, result):
        if result.canceled:
            await self._finish(protocol.CANCELED, result)
            return
        spec = self.record["spec"]
        outputs_spec = spec["outputs"]
        everest = dialect.extras(spec)
        keep = everest["keep"] if everest is not None else ()
        uploaded, kept, errors = [], [], []
        clock = self.context.wallclock
        start = clock()
        if outputs_spec or keep:
            await self.report(protocol.STAGING_OUT)
            stager = self.context.stager
            directory = self.context.task_dir(self.task_id)
            try:
                if outputs_spec:
                    sending = (stager.stage_out(directory, outputs_spec) if everest is None
                               else stager.stage_out(directory, outputs_spec, uris=True))
                    uploaded, errors = await self._step(defer.Deferred.fromCoroutine(sending))
                if keep:
                    kept, problems = await self._step(defer.Deferred.fromCoroutine(
                        stager.list_outputs(directory, keep)
                    ))
                    errors = errors + problems
            except defer.CancelledError:
                if not self.abandoned:
                    await self._finish(protocol.CANCELED, JobResult(result.exit_code, "canceled", canceled=True))
                return
        self.record.setdefault("times", {})["stageOutTime"] = round(clock() - start, 6)
        if everest is not None:
            await self._staged_out(uploaded, kept)
            uploaded = [{k: f[k] for k in ("path", "size", "sha256")} for f in uploaded]
        if errors and result.succeeded:
            result = JobResult(result.exit_code, "; ".join(errors))
        elif errors:
            result = JobResult(result.exit_code, result.reason + "; " + "; ".join(errors))
        state = protocol.DONE if result.succeeded else protocol.FAILED
        await self._finish(state, result, uploaded)

    async def _staged_out(self, uploaded, kept):
        """
        Report C{STAGED_OUT}: every file PUT (with the C{uri} it went to)
        and every file kept in the task directory (with the C{uri} passive
        mode serves it at, when a passive client owns the task; over the
        active connection it is only listed).
        """
        owned = self.record.get("owner") is not None
        files = list(uploaded)
        for f in kept:
            files.append(dict(f, uri=dialect.kept_uri(self.task_id, f["path"])) if owned else f)
        info = dialect.staged_out(files)
        seq = await self.report(protocol.STAGED_OUT, **info)
        if owned and seq is not None:
            # Kept with the finished record: a passive client that reconnects
            # after the end learns the outputs too (passive/tasks.py).
            self.context.record(self.task_id, staged_out=dict(info, seq=seq))

    async def _finish(self, state, result, outputs=()):
        times = self.record.get("times") or {}
        info = {
            "exitCode": result.exit_code,
            "stageInTime": times.get("stageInTime", 0.0),
            "runTime": times.get("runTime", 0.0),
            "stageOutTime": times.get("stageOutTime", 0.0),
            "outputs": list(outputs),
        }
        if state != protocol.DONE:
            info["reason"] = _clip(result.reason or state.lower(), MAX_REASON)
        _fit_outputs(info)
        if self.job is not None and self.job.batch:
            info["jobId"] = self.job.job_id
        else:
            recorded = self.record.get("job")
            if self.job is None and isinstance(recorded, dict) and recorded.get("batch"):
                info["jobId"] = recorded.get("id")
        level = self.log.info if state == protocol.DONE else self.log.warn
        level(
            "Task {task_id} {state}{why}",
            task_id=self.task_id, state=state, why=f": {info['reason']}" if "reason" in info else "",
            exit_code=result.exit_code,
        )
        await self.report(state, **info)


#: A terminal report must fit in one frame (1 MiB) with room to spare.
MAX_REASON = 4096
MAX_OUTPUTS_JSON = 512 * 1024


def _clip(text, limit):
    return text if len(text) <= limit else text[: limit - 30] + f"... ({len(text) - limit + 30} more characters)"


def _fit_outputs(info):
    """Keep the outputs list of a terminal report under L{MAX_OUTPUTS_JSON}."""
    outputs = info["outputs"]
    size = sum(len(o["path"]) + 120 for o in outputs)
    if size <= MAX_OUTPUTS_JSON:
        return
    kept, total = [], 0
    for output in outputs:
        total += len(output["path"]) + 120
        if total > MAX_OUTPUTS_JSON:
            break
        kept.append(output)
    info["outputs"] = kept
    info["outputsOmitted"] = len(outputs) - len(kept)


def _ran(job):
    """
    A Deferred that fires with True when C{job} starts running, or with False
    if it ends first (a batch job can leave the queue between two polls).
    """
    if not job.batch:
        # A process runs once it exists, however soon it ends (it may have
        # ended, and been reaped, before the worker looks).
        return defer.succeed(True)
    first = defer.Deferred()

    def started(_):
        if not first.called:
            first.callback(not job.result.called)

    def ended(result):
        if not first.called:
            first.callback(False)
        return result

    job.running.addCallback(started)
    job.result.addBoth(ended)
    return first
