"""
What every batch-scheduler handler (SLURM, TORQUE, PBS Pro) shares.

L{BatchTaskHandler} keeps a registry of active jobs (job id -> L{BatchJob})
and one poll loop for all of them: every C{poll_interval} seconds it asks the
scheduler about every active job with as few commands as it can (ids in
chunks of L{BatchTaskHandler.chunk_size}), never one command per job.  A job
that has left the queue (or that the scheduler lists as finished) is decided
by the exit-code file its job script wrote (L{everest_agent.jobscript}); the
scheduler's own word (C{TIMEOUT}, C{OUT_OF_MEMORY}, a cancel by someone
else...) says why a job died.  A scheduler command that fails or hangs
changes nothing: the next poll asks again.

Submissions go through a limiter (C{max_submit} at once).  A submission whose
command failed or hung may still have reached the scheduler, so before giving
up the handler looks for a job with the task's name; the same search finds a
task's job again after a restart when its id was never recorded
(L{BatchTaskHandler.reattach} with C{job_id=None}).

Subclasses supply the scheduler's commands and parsers; see the methods
marked "Scheduler specific" below.
"""

import math
import os

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from everest_agent import jobscript
from everest_agent.fsio import InlineFileIO
from everest_agent.handlers.command import CommandError, command_name, run_command
from everest_agent.interfaces import IJob, ITaskHandler, JobResult

#: Phases of a job as the scheduler reports it.
QUEUED = "queued"
RUNNING = "running"
ENDED = "ended"
UNKNOWN = "unknown"


class JobStatus:
    """
    One job as one scheduler query saw it.

    @ivar job_id: the scheduler's id.
    @ivar phase: L{QUEUED}, L{RUNNING}, L{ENDED} or L{UNKNOWN}.
    @ivar state: the scheduler's own word for the state (for logs).
    @ivar failure: when the scheduler says why the job failed, a key of
        L{FAILURES} (C{"TIMEOUT"}, ...); else None.
    @ivar detail: more words about the failure, or None.
    @ivar exit_code: the exit status the scheduler knows, or None.
    @ivar name: the job's name, or None.
    """

    __slots__ = ("job_id", "phase", "state", "failure", "detail", "exit_code", "name")

    def __init__(self, job_id, phase, state="", failure=None, detail=None, exit_code=None, name=None):
        self.job_id = job_id
        self.phase = phase
        self.state = state
        self.failure = failure
        self.detail = detail
        self.exit_code = exit_code
        self.name = name

    def __eq__(self, other):
        if not isinstance(other, JobStatus):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self):
        fields = ", ".join(f"{a}={getattr(self, a)!r}" for a in self.__slots__ if getattr(self, a) is not None)
        return f"JobStatus({fields})"


#: Why a job failed, by the key a parser puts in L{JobStatus.failure}.
#: C{{limit}} is the task's time limit, C{{cancel}} the scheduler's cancel
#: command.
FAILURES = {
    "TIMEOUT": "TIMEOUT: time limit of {limit} exceeded",
    "OUT_OF_MEMORY": "OUT_OF_MEMORY: the job exceeded its memory limit",
    "NODE_FAIL": "NODE_FAIL: a node running the job failed",
    "PREEMPTED": "PREEMPTED: the scheduler preempted the job",
    "BOOT_FAIL": "BOOT_FAIL: a node allocated to the job failed to boot",
    "DEADLINE": "DEADLINE: the job reached its deadline before it could finish",
    "CANCELLED": "CANCELLED by someone else ({cancel} outside the agent)",
    "REVOKED": "REVOKED: the job was revoked (it runs on another cluster of a federation)",
    "SPECIAL_EXIT": "SPECIAL_EXIT: the scheduler held the job after a special exit",
    "CPU_LIMIT": "CPU_LIMIT: the job exceeded its CPU time limit",
    "RESOURCE_LIMIT": "RESOURCE_LIMIT: the job exceeded a resource limit",
    "KILLED": "KILLED: the job was killed",
    "EXEC_FAILED": "EXEC_FAILED: the scheduler could not run the job",
}


class SubmitError(Exception):
    """A job could not be submitted; the message says why."""


def format_seconds(seconds):
    seconds = float(seconds)
    return f"{seconds:g} s"


def walltime(seconds):
    """C{HH:MM:SS} for a number of seconds (rounded up)."""
    total = max(1, int(math.ceil(float(seconds))))
    return f"{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"


def last_line(out):
    """
    The last non-blank line of a submit command's output, where schedulers
    print the job id (after any warnings).

    @raise ValueError: if the output is blank.
    """
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    return lines[-1]


def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@implementer(IJob)
class BatchJob:
    """
    One task's job in a batch scheduler.

    @ivar request: the task's L{JobRequest}.
    @ivar phase: the last phase seen (L{QUEUED}, L{RUNNING}) or None.
    @ivar state: the scheduler's last word for its state, or None.
    """

    batch = True

    def __init__(self, handler, request, job_id):
        self._handler = handler
        self.request = request
        self.job_id = job_id
        self.running = defer.Deferred()
        self.result = defer.Deferred()
        self.phase = None
        self.state = None
        self.cancel_requested = False
        self.cancel_sent = False
        self.cancel_in_flight = False
        self.polls_without_exit_code = 0

    @property
    def task_id(self):
        return self.request.task_id

    @property
    def done(self):
        return self.result.called

    def cancel(self):
        """
        Cancel the job with the scheduler's command.  C{result} fires once
        the scheduler no longer runs it (at once if the cancel command says
        the job is unknown), with C{canceled=True}.  If the command fails,
        every poll tries it again.

        @return: a Deferred firing (with None) when the cancel command has
            been run once; it never fails.
        """
        return self._handler._cancel(self)

    def __repr__(self):
        return f"<{type(self).__name__} task={self.task_id} job={self.job_id} phase={self.phase}>"


@implementer(ITaskHandler)
class BatchTaskHandler(service.Service):
    """
    Base of the poll-based batch handlers.

    @cvar name: the handler's type (C{slurm}, C{torque}, C{pbs}).
    @cvar default_commands: role -> program (C{submit}, C{status},
        C{cancel}, ...); the constructor's C{commands} overrides entries,
        e.g. to point C{status} at another program.
    @cvar chunk_size: job ids per status command.
    """

    name = None
    durable_jobs = True  # jobs run on other nodes and outlive this one
    default_commands = {}
    # One squeue costs ~45 ms plus ~0.03 ms an id: big chunks are cheap, and
    # 1000 ids stay far below the kernel's limit on one argument.
    chunk_size = 1000
    log = Logger()

    def __init__(
        self,
        reactor,
        poll_interval=10.0,
        command_timeout=60.0,
        max_submit=16,
        extra_args=(),
        commands=None,
        env=None,
        run=run_command,
        exit_code_polls=2,
        user=None,
        command_dir="",
    ):
        """
        @param reactor: provides C{callLater}, C{seconds} and
            C{spawnProcess}.
        @param poll_interval: seconds between status polls.
        @param command_timeout: seconds before a scheduler command is killed.
        @param max_submit: submissions in flight at once.
        @param extra_args: extra arguments for every submission.
        @param commands: role -> program, overriding L{default_commands}.
        @param env: environment of scheduler commands (default: the agent's).
        @param run: the command runner (L{run_command}'s signature); tests
            pass a fake.
        @param exit_code_polls: polls to wait for the exit-code file of a
            job that left the queue without one (a shared file system may
            show it late) before calling the job failed.
        @param user: the user whose jobs to search by name (default: the
            agent's own).
        @param command_dir: the directory holding the scheduler's commands,
            or empty to look them up in C{PATH} (two schedulers' clients
            may both ship C{qsub}).
        """
        self.reactor = reactor
        self.poll_interval = float(poll_interval)
        self.command_timeout = float(command_timeout)
        self.max_submit = int(max_submit)
        self.extra_args = list(extra_args)
        self.commands = dict(self.default_commands)
        unknown = set(commands or ()) - set(self.commands)
        if unknown:
            raise ValueError(f"unknown command roles {sorted(unknown)}; known: {sorted(self.commands)}")
        self.commands.update(commands or {})
        self.command_dir = command_dir
        self.env = env
        self._run_command = run
        self.exit_code_polls = int(exit_code_polls)
        self.user = user or _current_user()
        self.use_files(InlineFileIO())
        self.jobs = {}  # job id -> BatchJob, the active ones
        self._limiter = defer.DeferredSemaphore(self.max_submit)
        self._timer = None
        self._polling = None  # the Deferred of the poll under way
        self._poll_again = False
        self._info = None  # (time, dict) of the last resource_info
        self._info_pending = None
        self.polls = 0
        self.poll_failures = 0  # status queries that failed or timed out
        self.last_poll_duration = None  # seconds the last poll took

    def use_files(self, files):
        """
        Do the handler's file work (job scripts, exit-code files) through
        C{files}, an L{everest_agent.fsio.IFileIO}: the agent passes its
        file-system threads; the default runs it inline (tests).
        """
        self.files = files
        self._write_script = files.batch(jobscript.write_job_script)
        self._read_end = files.batch(read_end)

    # ------------------------------------------------------------------
    # Construction from the configuration file.

    @classmethod
    def handler_kwargs(cls, config):
        h = config.handler
        return dict(
            poll_interval=h.poll_interval,
            command_timeout=h.command_timeout,
            max_submit=h.max_submit,
            extra_args=h.extra_args,
            command_dir=getattr(h, "command_dir", ""),
        )

    @classmethod
    def from_config(cls, config, reactor):
        """Build the handler from the parsed configuration (L{everest_agent.config.load})."""
        return cls(reactor, **cls.handler_kwargs(config))

    # ------------------------------------------------------------------
    # Service.

    def startService(self):
        service.Service.startService(self)
        self._schedule(self.poll_interval)

    def stopService(self):
        # Batch jobs keep running without the agent; a restart re-attaches.
        service.Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self._polling if self._polling is not None else defer.succeed(None)

    # ------------------------------------------------------------------
    # ITaskHandler.

    def slots_needed(self, requirements):
        """
        A batch job takes one of the agent's slots, however big it is; the
        scheduler judges its size.

        @raise ValueError: if a requirement is not a positive number.
        """
        self.check_requirements(requirements)
        return 1

    def check_requirements(self, requirements):
        for key in ("nodes", "coresPerNode", "memoryPerCore", "timeLimit"):
            value = (requirements or {}).get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
                raise ValueError(f"resourceRequirements.{key} must be a positive number, not {value!r}")
            if key in ("nodes", "coresPerNode") and value != int(value):
                raise ValueError(f"resourceRequirements.{key} must be a whole number, not {value!r}")

    def submit(self, request):
        return self._limiter.run(self._submit, request)

    @defer.inlineCallbacks
    def _submit(self, request):
        try:
            self.check_requirements(request.requirements)
        except ValueError as e:
            raise SubmitError(str(e)) from None
        try:
            script = yield self._write_script(request)
        except (ValueError, OSError) as e:
            raise SubmitError(f"cannot write the job script: {e}") from None
        argv = self.submit_argv(request, script)
        problem = None
        try:
            out, err, code = yield self._run(argv, task_id=request.task_id)
        except CommandError as e:
            problem = str(e)
        else:
            if code == 0:
                try:
                    job_id = self.parse_submit_output(out)
                except ValueError as e:
                    problem = f"{command_name(argv)} printed no job id ({e}): {out.strip()[:200]!r}"
                else:
                    job = self._track(request, job_id)
                    self.log.info(
                        "Task {task_id} submitted as job {job_id}", task_id=request.task_id, job_id=job_id
                    )
                    return job
            else:
                problem = str(CommandError.from_exit(argv, code, err))
        # The command failed or hung, but the scheduler may have taken the
        # job anyway (a timeout talking to the controller): look for it.
        try:
            found = yield self.find_by_name(request)
        except CommandError as e:
            self.log.warn(
                "Task {task_id}: submission failed ({problem}) and the search for its job failed too: {error}",
                task_id=request.task_id,
                problem=problem,
                error=str(e),
            )
            found = []
        status = self._pick(request, found)
        if status is not None:
            self.log.warn(
                "Task {task_id}: {problem}; but the scheduler has job {job_id} for it; tracking that",
                task_id=request.task_id,
                problem=problem,
                job_id=status.job_id,
            )
            job = self._track(request, status.job_id)
            self._apply(job, status)
            return job
        self.log.error("Task {task_id}: submission failed: {problem}", task_id=request.task_id, problem=problem)
        raise SubmitError(f"submission failed: {problem}")

    def reattach(self, request, job_id=None):
        """
        Find a task's job again after a restart.

        With a C{job_id}, the job is tracked at once and the next poll (run
        soon) tells its fate, even if it ended while the agent was away.
        Without one, the job is looked up by its name (the task id); if the
        scheduler has no such job but the job script left traces in the task
        directory, the result comes from them; if there is no sign of a job
        at all, the submission never happened, and the task is submitted now.
        A search that fails (scheduler down) is retried every
        C{poll_interval} until it succeeds.
        """
        if job_id is not None:
            job_id = str(job_id)
            job = self._track(request, job_id)
            self.log.info("Task {task_id}: re-attached to job {job_id}", task_id=request.task_id, job_id=job_id)
            self._schedule(0)
            return defer.succeed(job)
        return self._reattach_by_name(request)

    @defer.inlineCallbacks
    def _reattach_by_name(self, request):
        while True:
            try:
                found = yield self.find_by_name(request)
            except CommandError as e:
                self.log.warn(
                    "Task {task_id}: cannot look for its job by name ({error}); trying again in {delay} s",
                    task_id=request.task_id,
                    error=str(e),
                    delay=self.poll_interval,
                )
                yield _sleep(self.reactor, self.poll_interval)
                continue
            break
        status = self._pick(request, found)
        if status is not None:
            job = self._track(request, status.job_id)
            self.log.info(
                "Task {task_id}: found its job {job_id} by name", task_id=request.task_id, job_id=status.job_id
            )
            self._apply(job, status)
            if not job.done:
                self._schedule(0)
            return job
        code, _, started = yield self._read_end(request.directory)
        if code is not None or started:
            # It ran, but the scheduler has forgotten it (and its id).
            job = BatchJob(self, request, None)
            self.log.warn(
                "Task {task_id}: no job of that name is known any more, but it ran (exit code {code})",
                task_id=request.task_id,
                code=code,
            )
            job.running.callback(None)
            if code is None:
                reason = "the job ran but left no exit status, and the scheduler no longer knows it"
                job.result.callback(JobResult(None, reason))
            else:
                job.result.callback(JobResult(code, None if code == 0 else f"exit code {code}"))
            return job
        self.log.info(
            "Task {task_id}: no job of that name and no sign that one ran; submitting it now",
            task_id=request.task_id,
        )
        job = yield self.submit(request)
        return job

    def resource_info(self):
        """
        The scheduler's view for C{RESOURCE_STATE.scheduler}: one cheap
        command at most every C{poll_interval} seconds (answers in between
        come from a cache), plus this agent's own jobs by phase.  Never
        fails; a failing command gives C{{"error": ...}}.
        """
        now = self.reactor.seconds()
        if self._info is not None and now - self._info[0] < self.poll_interval:
            return defer.succeed(self._with_own_jobs(self._info[1]))
        if self._info_pending is None:

            def done(info):
                self._info_pending = None
                self._info = (self.reactor.seconds(), info)
                return info

            def failed(f):
                self._info_pending = None
                self.log.warn("Cannot read the scheduler's state: {error}", error=str(f.value))
                return {"error": str(f.value)}

            pending = self._info_pending = defer.maybeDeferred(self.query_resources)
            pending.addCallbacks(done, failed)
            if self._info_pending is None:  # it answered at once
                return defer.succeed(self._with_own_jobs(pending.result))
        result = defer.Deferred()

        def deliver(info):
            result.callback(self._with_own_jobs(info))
            return info

        self._info_pending.addCallback(deliver)
        return result

    def _with_own_jobs(self, info):
        info = dict(info)
        phases = [job.phase for job in self.jobs.values()]
        info["agentJobs"] = {
            "queued": sum(1 for p in phases if p != RUNNING),
            "running": sum(1 for p in phases if p == RUNNING),
        }
        return info

    # ------------------------------------------------------------------
    # The registry and the poll loop.

    def _track(self, request, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            job = BatchJob(self, request, job_id)
            self.jobs[job_id] = job
        return job

    def _schedule(self, delay):
        """Run the next poll in C{delay} seconds, or sooner if it is due sooner."""
        if not self.running:
            return
        if self._polling is not None:
            if delay < self.poll_interval:
                self._poll_again = True
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self.reactor.seconds() <= delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self):
        self._timer = None
        self.poll_now()

    def poll_now(self):
        """
        Poll now (or right after the poll under way).

        @return: a Deferred firing when that poll is over.
        """
        if self._polling is not None:
            self._poll_again = True
            waiting = defer.Deferred()
            self._polling.addBoth(lambda r: (waiting.callback(None), r)[1])
            return waiting
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        started = self.reactor.seconds()
        self._polling = defer.ensureDeferred(self._poll())

        def over(result):
            self._polling = None
            self.polls += 1
            now = self.reactor.seconds()
            self.last_poll_duration = now - started
            again, self._poll_again = self._poll_again, False
            # Polls are timed from their start, so a slow cycle does not
            # stretch the gap between them (a job's end is seen within
            # poll_interval plus one cycle).
            self._schedule(0 if again else max(0.0, started + self.poll_interval - now))
            return None

        def crashed(f):
            self.log.failure("The scheduler poll crashed", f)

        self._polling.addErrback(crashed).addBoth(over)
        return self._polling

    async def _poll(self):
        # Cancels that did not get through are tried again first.
        retry = [
            job
            for job in self.jobs.values()
            if job.cancel_requested and not job.cancel_sent and not job.cancel_in_flight
        ]
        for job in retry:
            await self._send_cancel(job)
        ids = list(self.jobs)
        if not ids:
            return
        ended = []  # (job, status): their exit-code files are read in one hop
        gone = []
        for chunk in chunks(ids, self.chunk_size):
            try:
                statuses = await self.query(chunk)
            except CommandError as e:
                self.poll_failures += 1
                self.log.warn(
                    "Status query for {count} jobs failed; no change, trying again later: {error}",
                    count=len(chunk),
                    error=str(e),
                )
                continue
            for job_id in chunk:
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                status = statuses.get(job_id)
                if status is None:
                    gone.append(job)
                else:
                    self._apply(job, status, ended)
        if gone:
            gone_ids = [job.job_id for job in gone]
            details = {}
            for chunk in chunks(gone_ids, self.chunk_size):
                try:
                    details.update(await self.query_finished(chunk))
                except CommandError as e:
                    self.log.info(
                        "No accounting record for jobs that left the queue ({error}); "
                        "their exit-code files decide",
                        error=str(e),
                    )
            ended += [(job, details.get(job.job_id)) for job in gone]
        if ended:
            ends = await defer.gatherResults([self._read_end(job.request.directory) for job, _ in ended])
            for (job, status), end in zip(ended, ends):
                self._ended(job, status, end)

    def _apply(self, job, status, ended=None):
        """
        Act on one status report for an active job.  An ended job's
        exit-code file is read (off the reactor thread) before its end is
        decided: with the others of the same poll if C{ended} (a list) is
        given, else at once.
        """
        job.state = status.state
        if status.phase == QUEUED:
            if job.phase is None:
                self.log.debug("Job {job_id} (task {task_id}) is queued", job_id=job.job_id, task_id=job.task_id)
            if job.phase != RUNNING:
                job.phase = QUEUED
        elif status.phase == RUNNING:
            if job.phase != RUNNING:
                self.log.info("Job {job_id} (task {task_id}) is running", job_id=job.job_id, task_id=job.task_id)
            job.phase = RUNNING
            if not job.running.called:
                job.running.callback(None)
        elif status.phase == ENDED:
            if ended is not None:
                ended.append((job, status))
            else:
                self._read_end(job.request.directory).addCallback(lambda end: self._ended(job, status, end))
        else:
            self.log.warn(
                "Job {job_id} (task {task_id}) is in state {state}, which this agent does not know; "
                "taking it as still active",
                job_id=job.job_id,
                task_id=job.task_id,
                state=status.state,
            )

    def _ended(self, job, status, end):
        """
        A job ended (C{status} is how the scheduler saw its end, or None if
        the scheduler forgot it): decide its result from that and C{end},
        what L{read_end} found in its directory.
        """
        if job.done:
            return
        code, unreadable, started = end
        state = status.state if status is not None else "gone"
        if job.cancel_requested:
            result = JobResult(code, "canceled", canceled=True)
        elif status is not None and status.failure:
            result = JobResult(code, self.failure_reason(job, status))
        elif code is not None:
            result = JobResult(code, None if code == 0 else f"exit code {code}")
        elif job.polls_without_exit_code < self.exit_code_polls and unreadable is None:
            # Maybe the file is on its way (shared file systems cache).
            job.polls_without_exit_code += 1
            self.log.info(
                "Job {job_id} (task {task_id}) ended ({state}) but its exit-code file is not there yet",
                job_id=job.job_id,
                task_id=job.task_id,
                state=state,
            )
            return
        else:
            result = JobResult(
                status.exit_code if status is not None else None,
                self.no_exit_code_reason(job, status, unreadable),
            )
        self._finish(job, result, state, started)

    def _finish(self, job, result, state, started=False):
        self.jobs.pop(job.job_id, None)
        if not job.running.called and (result.exit_code is not None or started):
            job.running.callback(None)
        self.log.info(
            "Job {job_id} (task {task_id}) ended, scheduler state {state}: "
            "exit code {exit_code}, {outcome}",
            job_id=job.job_id,
            task_id=job.task_id,
            state=state,
            exit_code=result.exit_code,
            outcome=result.reason or "success",
        )
        job.result.callback(result)

    def failure_reason(self, job, status):
        template = FAILURES.get(status.failure, status.failure + ": the job failed")
        limit = job.request.time_limit
        if status.failure == "TIMEOUT" and not limit:
            template = "TIMEOUT: the job's time limit (the scheduler's default) was exceeded"
        reason = template.format(
            limit=format_seconds(limit) if limit else "",
            cancel=command_name([self.commands.get("cancel", "cancel")]),
        )
        if status.detail:
            reason += f" ({status.detail})"
        return reason

    def no_exit_code_reason(self, job, status, unreadable=None):
        where = jobscript.JOB_OUTPUT_FILE
        if unreadable:
            return f"the job ended but its exit status is unreadable: {unreadable}"
        if status is not None and status.exit_code == jobscript.CD_FAILED:
            return f"the job could not enter the task directory (see {where})"
        if status is None:
            return (
                "the job left the queue without recording an exit status, and the scheduler "
                f"keeps no record of why (see {where})"
            )
        code = "" if status.exit_code is None else f", exit status {status.exit_code}"
        detail = f", {status.detail}" if status.detail else ""
        return (
            "the job ended without recording an exit status "
            f"(scheduler state {status.state}{code}{detail}; see {where})"
        )

    # ------------------------------------------------------------------
    # Cancel.

    @defer.inlineCallbacks
    def _cancel(self, job):
        if job.done:
            return
        if not job.cancel_requested:
            self.log.info("Canceling job {job_id} (task {task_id})", job_id=job.job_id, task_id=job.task_id)
        job.cancel_requested = True
        if job.job_id is None or job.cancel_in_flight or job.cancel_sent:
            return
        yield self._send_cancel(job)

    @defer.inlineCallbacks
    def _send_cancel(self, job):
        argv = self.cancel_argv([job.job_id])
        job.cancel_in_flight = True
        try:
            out, err, code = yield self._run(argv, task_id=job.task_id, job_id=job.job_id)
        except CommandError as e:
            self.log.warn(
                "Cannot cancel job {job_id} (task {task_id}) now, will try again: {error}",
                job_id=job.job_id,
                task_id=job.task_id,
                error=str(e),
            )
            return
        finally:
            job.cancel_in_flight = False
        if code == 0 or self.cancel_says_gone(out, err, code):
            job.cancel_sent = True
            self._schedule(0)
        else:
            self.log.warn(
                "Cannot cancel job {job_id} (task {task_id}) now, will try again: {error}",
                job_id=job.job_id,
                task_id=job.task_id,
                error=str(CommandError.from_exit(argv, code, err)),
            )

    # ------------------------------------------------------------------
    # Helpers for subclasses.

    def _run(self, argv, stdin=None, **fields):
        self.log.debug("Running {argv}", argv=argv, **fields)
        return self._run_command(self.reactor, argv, stdin=stdin, timeout=self.command_timeout, env=self.env)

    def command(self, role):
        """The program for C{role}: in C{command_dir} when one is set and the program has no directory."""
        program = self.commands[role]
        if self.command_dir and "/" not in program:
            return os.path.join(self.command_dir, program)
        return program

    def _pick(self, request, found):
        """
        The job (a L{JobStatus}) of C{request} among those found by name:
        an active one if any, the newest otherwise.
        """
        name = self.job_name(request)
        found = [s for s in found if s.name in (None, name)]
        if not found:
            return None
        active = [s for s in found if s.phase != ENDED]
        pool = active or found
        pool.sort(key=lambda s: _id_key(s.job_id))
        if len(active) > 1:
            self.log.warn(
                "Task {task_id} has {count} active jobs named {name}: {ids}; following the newest",
                task_id=request.task_id,
                count=len(active),
                name=name,
                ids=", ".join(s.job_id for s in active),
            )
        return pool[-1]

    # ------------------------------------------------------------------
    # Scheduler specific.

    def job_name(self, request):
        """The job name to give C{request}'s job (and to search by)."""
        return request.task_id

    def submit_argv(self, request, script):
        """The command that submits C{script} (absolute path) for C{request}."""
        raise NotImplementedError

    def parse_submit_output(self, out):
        """
        The job id in the submit command's output.

        @raise ValueError: if there is none.
        """
        raise NotImplementedError

    def query(self, ids):
        """
        @return: a Deferred firing with C{{job_id: JobStatus}} for the jobs
            of C{ids} the scheduler still knows (jobs it does not know are
            left out), or failing with L{CommandError}.
        """
        raise NotImplementedError

    def query_finished(self, ids):
        """
        The accounting records of jobs that have left the queue, for the
        reason they ended.

        @return: a Deferred like L{query}'s.
        """
        return defer.succeed({})

    def find_by_name(self, request):
        """
        @return: a Deferred firing with a list of L{JobStatus} of this
            user's jobs named L{job_name}C{(request)}, queued, running or
            (where the scheduler remembers) finished; or failing with
            L{CommandError}.
        """
        raise NotImplementedError

    def cancel_argv(self, ids):
        raise NotImplementedError

    def cancel_says_gone(self, out, err, code):
        """True if a failed cancel command only said the job is gone already."""
        return False

    def query_resources(self):
        """@return: a Deferred firing with a dict for RESOURCE_STATE.scheduler."""
        return defer.succeed({})


def read_end(directory):
    """
    What an ended job left in its task directory (blocking: run in the
    file-system threads).

    @return: C{(exit code or None, why it is unreadable or None, whether
        the job script started)}.
    """
    code, unreadable = jobscript.exit_code_or_reason(directory)
    return code, unreadable, code is not None or jobscript.job_started(directory)


def _id_key(job_id):
    head = str(job_id).split(".", 1)[0]
    digits = "".join(c for c in head if c.isdigit())
    return (int(digits) if digits else -1, str(job_id))


def _sleep(reactor, seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def _current_user():
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or os.environ.get("LOGNAME") or ""
