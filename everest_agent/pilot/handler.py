"""
Pilot mode on the agent's side: tasks run in a few batch jobs (pilots).

L{PilotTaskHandler} is the agent's L{ITaskHandler} when C{[pilot] enabled}.
It holds the batch handler of C{[handler] type} and submits pilot jobs
through it (one job script, the same quoting, the same batched polling:
only pilots are ever polled), listens for the pilots to connect back
(L{everest_agent.pilot.link}), and sends each task to a pilot with room
for it.

 - Slots: the agent's slot pool follows the free cores of the pilots that
   take tasks (capped by C{max_tasks}); a task's C{coresPerNode} must fit
   in one pilot.  Pilots are submitted while tasks wait and fewer than
   C{max_pilots} exist (pending ones included), and told to stop after
   C{idle_timeout} seconds with nothing to run.
 - Identity: each pilot gets a random secret in a file of mode 0600 in its
   directory under the state directory; a connection whose first message
   is not a C{hello} with a known pilot's id and secret is dropped before
   anything else is read from it.
 - Loss: a pilot job that ends (scancel, walltime, node failure, its worker
   killed) is seen by the batch handler's poll.  A task whose exit-code
   file exists reports its real outcome; one that was running fails with a
   reason naming the pilot's job id and what the scheduler said; one sent
   but never started goes back to the queue.  A pilot whose link stays
   down for C{lost_timeout} seconds is canceled, which ends the same way.
   The job runs the worker under its guard (L{everest_agent.pilot.guard}),
   so no task's process outlives the job.
   A pilot job that runs but never connects back within C{connect_timeout}
   is canceled and logged, and further submissions back off.
 - Restart: the pilots' table (ids, job ids, the port) is kept in the state
   directory; pilots reconnect with their running and finished tasks, and
   L{reattach} binds each task to its pilot by pilot job id and task id.
"""

import collections
import hmac
import json
import os
import secrets
import shlex
import sys

from twisted.application import service
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import everest_agent
from everest_agent import jobscript
from everest_agent.fsio import InlineFileIO
from everest_agent.handlers.local import describe_exit
from everest_agent.interfaces import IJob, ITaskHandler, JobLost, JobNeverStarted, JobRequest, JobResult
from everest_agent.pilot import link as L
from everest_agent.pilot.runner import drain_margin

#: Pilot states, as RESOURCE_STATE and status show them.
SUBMITTING = "submitting"
PENDING = "pending"  # in the scheduler's queue
STARTING = "starting"  # the job runs; the pilot has not connected yet
RUNNING = "running"  # connected, taking tasks
DRAINING = "draining"  # connected, near its end or told to stop: no new tasks
AWAY = "away"  # its link is down; its tasks go on
UNREACHABLE = "unreachable"  # ran but never connected back
ENDED = "ended"

TABLE = "pilots.json"


class PilotError(Exception):
    pass


def read_task_end(directory):
    """
    What a task sent to a pilot left in its directory (blocking: run in the
    file-system threads).

    @return: C{(exit code or None, why it is unreadable or None, whether its
        command began)}: the wrapper a pilot spawns marks that before the
        command (L{jobscript.started_writer}), so a task whose pilot was
        lost between readying its directory and the spawn is not taken
        for lost.
    """
    code, began, unreadable = jobscript.exit_status_or_reason(directory)
    return code, unreadable, began


def read_task_ends(directories):
    """L{read_task_end} of each directory: the reads of one lost pilot, in one hop."""
    return [read_task_end(directory) for directory in directories]


def _end_or_unreadable(end):
    """A read's result, or (for a failed hop) an unreadable one."""
    if isinstance(end, Failure):
        return None, end.getErrorMessage(), False
    return end


@implementer(IJob)
class PilotJob:
    """One task in pilot mode; C{job_id} is its pilot's batch job id."""

    batch = True
    queued_report = False  # it waited for a slot, not in a scheduler's queue
    leftover = False  # processes of the task outlived it (the pilot says so at its end)

    def __init__(self, handler, request):
        self._handler = handler
        self.request = request
        self.job_id = None
        self.pilot = None
        self.started = False
        self.cancel_requested = False
        self.running = defer.Deferred()
        self.result = defer.Deferred()
        self.placed = None
        req = request.requirements or {}
        self.cores = int(req.get("coresPerNode", 1))
        self.time_limit = req.get("timeLimit")

    @property
    def task_id(self):
        return self.request.task_id

    def cancel(self):
        if self.result.called or self.cancel_requested:
            return
        self.cancel_requested = True
        self._handler._cancel(self)

    def mark_started(self):
        self.started = True
        if not self.running.called:
            self.running.callback(None)

    def finish(self, result):
        if self.result.called:
            return
        if result.exit_code is not None or self.started:
            self.mark_started()
        self.result.callback(result)


class PilotRecord:
    """One pilot job as the agent knows it."""

    def __init__(self, pilot_id, secret, directory, cores, submitted):
        self.pilot_id = pilot_id
        self.secret = secret
        self.directory = directory
        self.cores = cores
        self.submitted = submitted
        self.state = SUBMITTING
        self.job = None  # the BatchJob
        self.job_id = None
        self.link = None
        self.free = cores
        self.ends_at = None  # when its walltime ends (the agent's clock)
        self.tasks = {}  # task id -> PilotJob sent to it
        self.orphans = {}  # task id -> ("running", pid) or ("ended", result) not yet claimed
        self.hello_seen = False  # since this agent started
        self.connected_once = False
        self.idle_call = None
        self.lost_call = None
        self.connect_call = None
        self.end_reason = None
        self.terminating = False  # it said its scheduler is ending it

    @property
    def used(self):
        return self.cores - self.free

    def accepting(self):
        return self.state == RUNNING and self.link is not None

    def summary(self):
        return {"id": self.pilot_id, "jobId": self.job_id, "state": self.state,
                "coresUsed": self.used, "coresTotal": self.cores, "tasks": len(self.tasks)}


@implementer(ITaskHandler)
class PilotTaskHandler(service.MultiService):
    log = Logger()
    durable_jobs = False  # see docs/handlers.rst: a pilot never runs a task id twice
    #: submit()'s Deferred waits for a pilot with room; the worker lets a
    #: cancel interrupt that wait (the task ends CANCELED, no pilot touched).
    submit_waits = True

    def __init__(self, reactor, batch, state_dir, *, max_tasks, max_pilots=2, cores=1, walltime=3600.0,
                 idle_timeout=60.0, listen=("0.0.0.0", 0), advertise_address="", hostname="",
                 python="", kill_grace=10.0, heartbeat=10.0, connect_timeout=300.0,
                 reconnect_for=600.0, lost_timeout=120.0, scale_interval=0.5, wallclock=None):
        super().__init__()
        self.reactor = reactor
        self.batch = batch
        self.name = batch.name
        self.state_dir = os.path.join(state_dir, "pilots")
        self.max_tasks = max_tasks
        self.max_pilots = max_pilots
        self.cores = cores
        self.walltime = float(walltime)
        self.margin = drain_margin(self.walltime)
        self.idle_timeout = idle_timeout
        self.listen = listen
        self.advertise_address = advertise_address or hostname or listen[0]
        self.python = python or sys.executable
        self.kill_grace = kill_grace
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.reconnect_for = reconnect_for
        self.lost_timeout = lost_timeout
        self.scale_interval = scale_interval
        self.pool = None  # the manager's SlotPool, set by the agent
        self.pilots = {}  # pilot id -> PilotRecord
        self.waiting = collections.deque()  # PilotJobs waiting for a pilot with room
        self.reattaching = {}  # task id -> (PilotJob, Deferred, pilot id or None)
        self.port = None
        self._listening = None
        self._scale_call = None
        self._backoff = 0.0
        self._not_before = 0.0
        self.unreachable = 0  # pilots that ran but never connected back
        self.submitted_pilots = 0
        self.refused_connections = 0
        self._settling = False
        self.status = None  # the agent's StatusFile
        self._status_key, self._status_written = None, 0.0
        batch.setServiceParent(self)
        self.use_files(InlineFileIO())

    @classmethod
    def from_config(cls, config, reactor, batch):
        p = config.pilot
        return cls(
            reactor, batch, config.agent.state_dir, max_tasks=config.agent.max_tasks,
            max_pilots=p.max_pilots, cores=p.cores, walltime=p.walltime, idle_timeout=p.idle_timeout,
            listen=p.listen, advertise_address=p.advertise_address, hostname=config.agent.hostname,
            python=p.python, kill_grace=config.agent.kill_grace, heartbeat=p.heartbeat,
            connect_timeout=p.connect_timeout, reconnect_for=p.reconnect_for, lost_timeout=p.lost_timeout,
        )

    # -- service ----------------------------------------------------------------

    def startService(self):
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        table = self._load_table()
        super().startService()
        host, port = self.listen
        saved = table.get("port")
        if port == 0 and saved:
            # Pilots of an earlier run reconnect to the port they were given.
            try:
                self._listening = self.reactor.listenTCP(saved, self._factory(), interface=host)
            except error.CannotListenError:
                self.log.warn("Pilot port {port} is taken now; pilots started before cannot reconnect",
                              port=saved)
        if self._listening is None:
            self._listening = self.reactor.listenTCP(port, self._factory(), interface=host)
        self.port = self._listening.getHost().port
        self.log.info("Listening for pilots on {host}:{port}, advertised as {address}",
                      host=host, port=self.port, address=self.advertise_address)
        for pilot_id, entry in table.get("pilots", {}).items():
            self._resume_pilot(pilot_id, entry)
        # Until every pilot of the last run has said what it runs, the slots
        # are not the limit: the tasks taken up again must reach reattach()
        # (and a cancel reach their pilot), not wait for slots.
        self._settling = any(r.state != ENDED for r in self.pilots.values())
        self._changed()
        self._save_table()
        self._schedule_scale()

    def stopService(self):
        self.running = False
        if self._scale_call is not None and self._scale_call.active():
            self._scale_call.cancel()
        self._scale_call = None
        for record in self.pilots.values():
            for call in (record.idle_call, record.lost_call, record.connect_call):
                if call is not None and call.active():
                    call.cancel()
            if record.link is not None:
                record.link.drop()
        listening, self._listening = self._listening, None
        d = defer.maybeDeferred(super().stopService)
        if listening is not None:
            d.addCallback(lambda _: listening.stopListening())
        return d

    def _factory(self):
        return L.LinkFactory(self, self.reactor, self.heartbeat)

    def use_files(self, files):
        """
        Read the task directories a lost pilot leaves (exit-code files,
        start markers) through C{files}, an L{everest_agent.fsio.IFileIO};
        the batch handler that submits the pilots gets it too.  The
        default runs it inline (tests).
        """
        self.files = files
        self._read_end = files.batch(read_task_end)
        if hasattr(self.batch, "use_files"):
            self.batch.use_files(files)

    # -- the pilots' table ------------------------------------------------------

    def _load_table(self):
        path = os.path.join(self.state_dir, TABLE)
        try:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
            if not isinstance(table, dict):
                raise ValueError("not an object")
            return table
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self.log.error("The pilots' table {path} is unreadable ({error}); starting without it",
                           path=path, error=str(e))
            return {}

    def _save_table(self):
        table = {"port": self.port, "pilots": {
            r.pilot_id: {"jobId": r.job_id, "cores": r.cores, "submitted": r.submitted}
            for r in self.pilots.values() if r.state != ENDED
        }}
        path = os.path.join(self.state_dir, TABLE)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(table, f)
            os.replace(tmp, path)
        except OSError as e:
            self.log.error("Cannot write the pilots' table {path}: {error}", path=path, error=str(e))

    def _resume_pilot(self, pilot_id, entry):
        directory = os.path.join(self.state_dir, pilot_id)
        try:
            with open(os.path.join(directory, "secret"), encoding="ascii") as f:
                secret = f.read().strip()
        except OSError as e:
            self.log.warn("Pilot {pilot}: its secret is gone ({error}); it cannot reconnect",
                          pilot=pilot_id, error=str(e))
            secret = None
        record = PilotRecord(pilot_id, secret, directory, int(entry.get("cores") or self.cores),
                             entry.get("submitted") or self.reactor.seconds())
        record.state = PENDING
        record.job_id = entry.get("jobId")
        self.pilots[pilot_id] = record
        d = self.batch.reattach(self._pilot_request(record), record.job_id)
        d.addCallbacks(self._pilot_submitted, self._pilot_not_found, callbackArgs=(record,),
                       errbackArgs=(record,))

    def _pilot_not_found(self, failure, record):
        self.log.warn("Pilot {pilot}: its job cannot be found again: {error}", pilot=record.pilot_id,
                      error=failure.getErrorMessage())
        self._pilot_ended(record, f"its job cannot be found again ({failure.getErrorMessage()})")

    # -- submitting pilots ------------------------------------------------------

    def _pilot_request(self, record):
        argv = [
            self.python, "-m", "everest_agent.pilot",
            "--agent", f"{self.advertise_address}:{self.port}",
            "--pilot-id", record.pilot_id,
            "--secret-file", os.path.join(record.directory, "secret"),
            "--cores", str(record.cores), "--walltime", f"{self.walltime:g}",
            "--kill-grace", f"{self.kill_grace:g}", "--reconnect-for", f"{self.reconnect_for:g}",
            "--heartbeat", f"{self.heartbeat:g}",
        ]
        # The worker runs under the guard (everest_agent.pilot.guard), which
        # the job's shell becomes: once the worker has ended, however it
        # ended (scancel, qdel, kill -9), the tasks it left are killed; the
        # job's exit status stays the worker's.
        guard = [self.python, "-m", "everest_agent.pilot.guard", "--grace", f"{self.kill_grace:g}", "--"]
        command = "exec " + " ".join(shlex.quote(a) for a in guard + argv)
        environment = {"EVEREST_PILOT_ID": record.pilot_id}
        if self.python == sys.executable:
            # The agent's own interpreter: the pilot imports the agent's own
            # package too, also where the scheduler passes the job none of
            # the agent's environment (Grid Engine without -V).
            environment["PYTHONPATH"] = everest_agent.pythonpath(os.environ)
        return JobRequest(
            task_id=f"everest-pilot-{record.pilot_id}", directory=record.directory,
            command=command,
            environment=environment,
            requirements={"nodes": 1, "coresPerNode": record.cores, "timeLimit": self.walltime},
        )

    def _submit_pilot(self):
        pilot_id = secrets.token_hex(6)
        directory = os.path.join(self.state_dir, pilot_id)
        secret = secrets.token_urlsafe(32)
        try:
            os.makedirs(directory, mode=0o700)
            fd = os.open(os.path.join(directory, "secret"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
        except OSError as e:
            self.log.error("Cannot prepare a pilot's directory {directory}: {error}",
                           directory=directory, error=str(e))
            self._back_off()
            return
        record = PilotRecord(pilot_id, secret, directory, self.cores, self.reactor.seconds())
        self.pilots[pilot_id] = record
        self.submitted_pilots += 1
        self._save_table()
        self.log.info("Submitting pilot {pilot} ({cores} cores, {walltime:g} s)", pilot=pilot_id,
                      cores=self.cores, walltime=self.walltime)
        d = self.batch.submit(self._pilot_request(record))
        d.addCallbacks(self._pilot_submitted, self._pilot_submit_failed, callbackArgs=(record,),
                       errbackArgs=(record,))

    def _pilot_submit_failed(self, failure, record):
        self.log.error("Pilot {pilot} could not be submitted: {error}", pilot=record.pilot_id,
                       error=failure.getErrorMessage())
        self._back_off()
        self._pilot_ended(record, f"its submission failed: {failure.getErrorMessage()}")

    def _pilot_submitted(self, job, record):
        record.job = job
        if record.job_id != job.job_id:
            record.job_id = job.job_id
            self._save_table()
        if record.state == SUBMITTING:
            record.state = PENDING
        job.running.addCallback(lambda _: self._pilot_job_running(record))
        job.result.addCallback(lambda result: self._pilot_job_ended(record, result))

    def _pilot_job_running(self, record):
        if record.state == PENDING:
            record.state = STARTING
        if not record.hello_seen and record.connect_call is None:
            record.connect_call = self.reactor.callLater(self.connect_timeout, self._never_connected, record)

    def _never_connected(self, record):
        record.connect_call = None
        if record.hello_seen or record.state == ENDED:
            return
        self.unreachable += 1
        record.state = UNREACHABLE
        self.log.error(
            "Pilot {pilot} (job {job_id}) has run for {seconds:g} s without connecting back to "
            "{address}:{port}; check [pilot] advertise_address and firewalls between the compute "
            "nodes and this host. Canceling it.",
            pilot=record.pilot_id, job_id=record.job_id, seconds=self.connect_timeout,
            address=self.advertise_address, port=self.port,
        )
        self._back_off()
        record.end_reason = "it never connected back"
        if record.job is not None:
            record.job.cancel()

    def _back_off(self):
        self._backoff = min(3600.0, max(self.connect_timeout, self._backoff * 2 or 1.0))
        self._not_before = self.reactor.seconds() + self._backoff

    def _pilot_job_ended(self, record, result):
        why = result.reason or (f"exit code {result.exit_code}" if result.exit_code else "it ended")
        if record.end_reason:
            why = f"{record.end_reason}; scheduler: {why}"
        self._pilot_ended(record, why)

    def _pilot_ended(self, record, why):
        if record.state == ENDED:
            return
        was = record.state
        record.state = ENDED
        record.end_reason = why
        for call in (record.idle_call, record.lost_call, record.connect_call):
            if call is not None and call.active():
                call.cancel()
        record.idle_call = record.lost_call = record.connect_call = None
        if record.link is not None:
            record.link.drop()
            record.link = None
        level = self.log.info if not record.tasks and was != UNREACHABLE else self.log.warn
        level("Pilot {pilot} (job {job_id}) ended: {why}; {count} tasks were on it",
              pilot=record.pilot_id, job_id=record.job_id, why=why, count=len(record.tasks))
        tasks, record.tasks = list(record.tasks.values()), {}
        record.free = record.cores
        claims = []
        for task_id, (job, d, pilot_id) in list(self.reattaching.items()):
            if pilot_id == record.pilot_id:
                del self.reattaching[task_id]
                claims.append((job, d))
        if tasks or claims:
            # What their directories say decides; all of them read in one
            # hop to the file-system threads.
            directories = [job.request.directory for job in tasks] + [job.request.directory for job, _ in claims]
            d = self.files.run(read_task_ends, directories)
            d.addBoth(self._settle_loss, record, why, tasks, claims)
        self._check_unclaimed()
        try:
            os.unlink(os.path.join(record.directory, "secret"))
        except OSError:
            pass
        self._save_table()
        self._changed()

    def _settle_loss(self, ends, record, why, tasks, claims):
        if isinstance(ends, Failure):
            self.log.error("Pilot {pilot}: cannot read its tasks' directories: {error}",
                           pilot=record.pilot_id, error=ends.getErrorMessage())
            ends = [ends] * (len(tasks) + len(claims))
        requeue = []
        for job, end in zip(tasks, ends):
            self._settle_lost(job, record, why, _end_or_unreadable(end), requeue)
        for (job, d), end in zip(claims, ends[len(tasks):]):
            self._settled_by_files(end, job, record, d, why, None)
        if requeue:
            self.waiting.extendleft(reversed(requeue))
            self._place()
            self._changed()

    def _settle_lost(self, job, record, why, end, requeue):
        """A task on a pilot that ended: its real outcome, a failure, or back to the queue."""
        code, _, started = end
        if code is not None:
            reason = f"{describe_exit(code)}; its pilot, batch job {record.job_id}, ended: {why}" if code else None
            job.finish(JobResult(code, reason))
        elif job.cancel_requested:
            job.finish(JobResult(None, "canceled", canceled=True))
        elif job.started or started:
            job.finish(JobResult(None, f"the pilot running the task, batch job {record.job_id}, "
                                       f"ended under it: {why}"))
        else:
            self.log.info("Task {task_id}: never started on pilot {pilot}; back in the queue",
                          task_id=job.task_id, pilot=record.pilot_id)
            job.pilot = None
            job.job_id = None
            requeue.append(job)

    # -- scaling ----------------------------------------------------------------

    def _schedule_scale(self):
        if self.running and self._scale_call is None:
            self._scale_call = self.reactor.callLater(self.scale_interval, self._scale_tick)

    def _scale_tick(self):
        self._scale_call = None
        self._scale()
        self._write_status()
        self._schedule_scale()

    def _write_status(self):
        """Pilots in status.json (for C{everest-agent status}), when their states change or every 10 s."""
        if self.status is None:
            return
        summary = {"pilots": self.pilot_summary(), "unreachable": self.unreachable,
                   "address": f"{self.advertise_address}:{self.port}"}
        key = [(p["id"], p["state"], p["jobId"]) for p in summary["pilots"]] + [self.unreachable]
        now = self.reactor.seconds()
        if key == self._status_key and now - self._status_written < 10:
            return
        self._status_key, self._status_written = key, now
        self.status.data["pilots"] = summary
        self.status.write()

    # The batch handler's poll figures (for /metrics): only pilots are polled.
    polls = property(lambda self: self.batch.polls)
    poll_failures = property(lambda self: self.batch.poll_failures)
    last_poll_duration = property(lambda self: self.batch.last_poll_duration)

    def demand(self):
        """Cores wanted by tasks that wait (for a slot or for a pilot with room)."""
        wanted = sum(job.cores for job in self.waiting)
        if self.pool is not None:
            wanted += self.pool.queued
        return wanted

    def _scale(self):
        if not self.running:
            return
        wanted = self.demand()
        if not wanted:
            return
        live = [r for r in self.pilots.values() if r.state != ENDED]
        coming = sum(r.cores for r in live if r.state in (SUBMITTING, PENDING, STARTING))
        # (A task no running pilot can take, for its cores or its timeLimit,
        # counts in wanted too: it waits, so a new pilot is submitted.)
        if coming >= wanted or len(live) >= self.max_pilots:
            return
        if self.reactor.seconds() < self._not_before:
            return
        self._submit_pilot()

    # -- ITaskHandler -----------------------------------------------------------

    def slots_needed(self, requirements):
        self.batch.check_requirements(requirements)
        requirements = requirements or {}
        nodes = requirements.get("nodes", 1)
        if nodes != 1:
            raise ValueError(f"the task needs {nodes} nodes; a pilot runs on one node")
        cores = int(requirements.get("coresPerNode", 1))
        if cores > self.cores:
            raise ValueError(f"the task needs {cores} cores; pilots here have {self.cores} ([pilot] cores)")
        if cores > self.max_tasks:
            raise ValueError(f"the task needs {cores} cores; this agent has {self.max_tasks} slots")
        limit = requirements.get("timeLimit")
        if limit and limit > self.walltime - self.margin:
            raise ValueError(
                f"the task's timeLimit of {limit:g} s is longer than a pilot can give it "
                f"({self.walltime - self.margin:g} s of its {self.walltime:g} s [pilot] walltime)"
            )
        return cores

    def submit(self, request):
        job = PilotJob(self, request)

        def cancel(d):
            try:
                self.waiting.remove(job)
            except ValueError:
                pass

        job.placed = defer.Deferred(cancel)
        self.waiting.append(job)
        self._place()
        if not job.placed.called:
            self._scale()
        return job.placed

    def reattach(self, request, job_id):
        job = PilotJob(self, request)
        record = None
        if job_id is not None:
            record = next((r for r in self.pilots.values() if r.job_id == job_id), None)
        else:
            record = next((r for r in self.pilots.values() if request.task_id in r.orphans), None)
        d = defer.Deferred()
        if record is not None and record.state != ENDED:
            job.job_id = record.job_id
            if request.task_id in record.orphans or record.hello_seen:
                self._claim(job, record, d)
            else:
                self.reattaching[request.task_id] = (job, d, record.pilot_id)
            return d
        if job_id is None and any(not r.hello_seen and r.state != ENDED for r in self.pilots.values()):
            # Sent to some pilot, maybe: wait until every pilot has said what it has.
            self.reattaching[request.task_id] = (job, d, None)
            return d
        self._settle_by_files(job, record, d, record.end_reason if record else None)
        return d

    def _claim(self, job, record, d):
        """Bind a task found again to the pilot that has (or had) it."""
        task_id = job.task_id
        orphan = record.orphans.pop(task_id, None)
        if orphan is None:
            if task_id in record.tasks:  # (found again twice: keep the first)
                d.callback(record.tasks[task_id])
                return
            self._settle_by_files(job, None, d, None, pilot=record)
            return
        job.pilot = record
        job.job_id = record.job_id
        self.log.info("Task {task_id} found again on pilot {pilot} (job {job_id})", task_id=task_id,
                      pilot=record.pilot_id, job_id=record.job_id)
        if orphan[0] == "running":
            record.tasks[task_id] = job
            job.mark_started()
            d.callback(job)
        else:
            d.callback(job)
            result = orphan[1]
            job.leftover = len(result) > 3 and bool(result[3])
            job.finish(JobResult(*result[:3]))
            self._ack(record, task_id)

    def _settle_by_files(self, job, record, d, why, pilot=None):
        """No pilot has the task: what its directory says decides (read in the file-system threads)."""
        self._read_end(job.request.directory).addBoth(self._settled_by_files, job, record, d, why, pilot)

    def _settled_by_files(self, end, job, record, d, why, pilot):
        code, unreadable, started = _end_or_unreadable(end)
        if unreadable is not None:
            d.errback(JobLost(f"the task's exit status file is damaged: {unreadable}"))
            return
        if code is not None:
            if job.job_id is None and record is not None:
                job.job_id = record.job_id
            d.callback(job)
            job.finish(JobResult(code, describe_exit(code) if code else None))
        elif not started:
            d.errback(JobNeverStarted("no pilot ever started the task"))
        elif record is not None:
            d.errback(JobLost(f"the pilot that ran the task, batch job {record.job_id}, ended under it: {why}"))
        elif pilot is not None:
            d.errback(JobLost(f"pilot {pilot.pilot_id} (batch job {pilot.job_id}) no longer knows the task"))
        else:
            d.errback(JobLost("the pilot that ran the task is gone, and it left no exit status"))

    def _check_unclaimed(self):
        """Tasks waiting for any pilot to claim them, once every pilot has spoken."""
        if any(not r.hello_seen and r.state != ENDED for r in self.pilots.values()):
            return
        if self._settling:
            self._settling = False
            self._changed()
        for task_id, (job, d, pilot_id) in list(self.reattaching.items()):
            if pilot_id is None:
                del self.reattaching[task_id]
                self._settle_by_files(job, None, d, None)

    def resource_info(self):
        d = self.batch.resource_info()
        d.addCallback(self._with_pilots)
        return d

    def _with_pilots(self, info):
        info = dict(info)
        info.pop("agentJobs", None)
        info["pilots"] = self.pilot_summary()
        live = [r for r in self.pilots.values() if r.state != ENDED]
        info["pilotCores"] = {"used": sum(r.used for r in live),
                              "total": sum(r.cores for r in live if r.state in (RUNNING, DRAINING, AWAY))}
        if self.unreachable:
            info["pilotsUnreachable"] = self.unreachable
        return info

    def pilot_summary(self):
        return [r.summary() for r in self.pilots.values() if r.state != ENDED]

    # -- placing tasks ----------------------------------------------------------

    def _fits(self, record, job):
        if not record.accepting() or job.cores > record.free:
            return False
        if job.time_limit and record.ends_at is not None:
            return self.reactor.seconds() + job.time_limit <= record.ends_at - self.margin
        return True

    def _place(self):
        waiting = self.waiting
        placed = False
        while waiting:
            job = waiting[0]
            record = next((r for r in self.pilots.values() if self._fits(r, job)), None)
            if record is None:
                break
            waiting.popleft()
            self._send_to(record, job)
            placed = True
        if placed:
            self._changed()

    def _send_to(self, record, job):
        record.free -= job.cores
        record.tasks[job.task_id] = job
        job.pilot = record
        job.job_id = record.job_id
        if record.idle_call is not None and record.idle_call.active():
            record.idle_call.cancel()
        record.idle_call = None
        record.link.send(L.RUN, self._run_fields(job))
        if job.placed is not None and not job.placed.called:
            job.placed.callback(job)

    @staticmethod
    def _run_fields(job):
        r = job.request
        return {"task": r.task_id, "directory": r.directory, "command": r.command,
                "environment": r.environment, "requirements": r.requirements}

    def _cancel(self, job):
        record = job.pilot
        if record is None:
            # Waiting for a pilot with room (back from a lost pilot, or
            # refused by one): it ends here, no pilot is told anything.
            try:
                self.waiting.remove(job)
            except ValueError:
                return
            job.finish(JobResult(None, "canceled", canceled=True))
            return
        if record.link is not None:
            record.link.send(L.CANCEL, {"task": job.task_id})
        # Else sent on reconnection (see _hello), or settled when the pilot ends.

    def _ack(self, record, task_id):
        if record.link is not None:
            record.link.send(L.ACK, {"tasks": [task_id]})

    def _changed(self):
        """Pilots or their free cores changed: the slots follow, idle pilots are noticed."""
        total = 0
        for record in self.pilots.values():
            if record.accepting():
                total += record.cores
            elif record.state in (DRAINING, AWAY):
                total += record.used
            if record.accepting() and not record.tasks and record.idle_call is None:
                record.idle_call = self.reactor.callLater(self.idle_timeout, self._idle, record)
        if self._settling:
            total = self.max_tasks
        if self.pool is not None:
            self.pool.set_capacity(min(self.max_tasks, total))

    def _idle(self, record):
        record.idle_call = None
        if record.tasks or not record.accepting() or self.waiting:
            return
        self.log.info("Pilot {pilot} (job {job_id}): idle for {seconds:g} s; telling it to end",
                      pilot=record.pilot_id, job_id=record.job_id, seconds=self.idle_timeout)
        record.state = DRAINING
        record.link.send(L.STOP)
        self._changed()

    # -- the link ---------------------------------------------------------------

    def link_made(self, link):
        link.pilot = None
        link.auth_call = self.reactor.callLater(self.heartbeat * 3, self._no_hello, link)

    def _no_hello(self, link):
        if link.pilot is None and not link.closed:
            self.refused_connections += 1
            self.log.warn("Pilot port: {peer} said nothing within {seconds:g} s; dropped",
                          peer=link.peer(), seconds=self.heartbeat * 3)
            link.drop()

    def link_lost(self, link, reason):
        call = getattr(link, "auth_call", None)
        if call is not None and call.active():
            call.cancel()
        record = link.pilot
        if record is None or record.link is not link:
            return
        record.link = None
        if not self.running:
            return  # the agent is stopping: the pilot reconnects to the next one
        if record.state in (RUNNING, DRAINING):
            record.state = AWAY
            self.log.warn("Pilot {pilot} (job {job_id}): link lost ({why}); {count} tasks go on, "
                          "waiting {timeout:g} s for it to reconnect",
                          pilot=record.pilot_id, job_id=record.job_id, why=reason.getErrorMessage(),
                          count=len(record.tasks), timeout=self.lost_timeout)
            record.lost_call = self.reactor.callLater(self.lost_timeout, self._lost, record)
        self._changed()

    def _lost(self, record):
        record.lost_call = None
        if record.link is not None or record.state == ENDED:
            return
        self.log.error("Pilot {pilot} (job {job_id}) has not reconnected for {timeout:g} s; canceling it",
                       pilot=record.pilot_id, job_id=record.job_id, timeout=self.lost_timeout)
        record.end_reason = f"its link was down for {self.lost_timeout:g} s"
        if record.job is not None:
            record.job.cancel()
        else:
            self._pilot_ended(record, record.end_reason)

    def link_messages(self, link, messages):
        record = link.pilot
        if record is None:
            kind, fields = messages[0]
            record = self._authenticate(link, kind, fields)
            if record is None:
                return
            self._hello(record, link, fields)
            messages = messages[1:]
        for kind, fields in messages:
            method = getattr(self, "_msg_" + kind, None)
            try:
                if method is None:
                    raise ValueError(f"unknown message {kind!r}")
                method(record, fields)
            except (KeyError, TypeError, ValueError) as e:
                self.log.warn("Pilot {pilot}: bad {kind} message ({error}); ignored",
                              pilot=record.pilot_id, kind=kind, error=str(e))
        self._place()
        self._changed()

    def _authenticate(self, link, kind, fields):
        pilot_id = fields.get("pilot") if kind == L.HELLO else None
        record = self.pilots.get(pilot_id) if isinstance(pilot_id, str) else None
        offered = fields.get("secret")
        if (record is None or record.secret is None or not isinstance(offered, str)
                or not hmac.compare_digest(offered.encode(), record.secret.encode())
                or record.state == ENDED):
            self.refused_connections += 1
            self.log.warn("Pilot port: {peer} did not prove to be a pilot of this agent; dropped",
                          peer=link.peer())
            link.drop()
            return None
        call = getattr(link, "auth_call", None)
        if call is not None and call.active():
            call.cancel()
        return record

    def _hello(self, record, link, fields):
        if record.link is not None and record.link is not link:
            record.link.drop()
        link.pilot = record
        record.link = link
        first = not record.hello_seen
        record.hello_seen = True
        record.connected_once = True
        for attr in ("lost_call", "connect_call"):
            call = getattr(record, attr)
            if call is not None and call.active():
                call.cancel()
            setattr(record, attr, None)
        remaining = float(fields.get("remaining") or 0)
        record.ends_at = self.reactor.seconds() + remaining
        record.state = DRAINING if fields.get("draining") or remaining <= self.margin else RUNNING
        link.send(L.WELCOME, {"heartbeat": self.heartbeat})
        running = {task_id: pid for task_id, pid in fields.get("running") or []}
        finished = fields.get("finished") or {}
        self.log.info("Pilot {pilot} (job {job_id}) connected from {peer}: {cores} cores, "
                      "{running} tasks running, {finished} finished",
                      pilot=record.pilot_id, job_id=record.job_id, peer=link.peer(), cores=record.cores,
                      running=len(running), finished=len(finished))
        # Its tasks as the pilot tells them: those it runs, those it ended.
        for task_id, pid in running.items():
            job = record.tasks.get(task_id)
            if job is not None:
                job.mark_started()
                if job.cancel_requested:
                    link.send(L.CANCEL, {"task": task_id})
            else:
                record.orphans[task_id] = ("running", pid)
        for task_id, result in finished.items():
            job = record.tasks.get(task_id)
            if job is not None:
                self._msg_ended(record, {"task": task_id, "result": result})
            else:
                record.orphans[task_id] = ("ended", result)
        # Sent before the link went down but not known to it: send again
        # (a pilot never runs a task id twice, so this is safe).
        for task_id, job in record.tasks.items():
            if task_id not in running:
                link.send(L.RUN, self._run_fields(job))
        record.free = record.cores - sum(j.cores for j in record.tasks.values()) - sum(
            1 for o in record.orphans.values() if o[0] == "running")
        if first:
            for task_id, (job, d, pilot_id) in list(self.reattaching.items()):
                if pilot_id == record.pilot_id or (pilot_id is None and task_id in record.orphans):
                    del self.reattaching[task_id]
                    self._claim(job, record, d)
            self._check_unclaimed()

    def _msg_started(self, record, fields):
        task_id = fields["task"]
        job = record.tasks.get(task_id)
        if job is not None:
            job.mark_started()
        else:
            record.orphans.setdefault(task_id, ("running", fields.get("pid")))

    def _msg_ended(self, record, fields):
        task_id = fields["task"]
        exit_code, reason, canceled = fields["result"][:3]
        leftover = len(fields["result"]) > 3 and bool(fields["result"][3])
        job = record.tasks.pop(task_id, None)
        if job is None:
            was = record.orphans.get(task_id)
            record.orphans[task_id] = ("ended", [exit_code, reason, canceled, leftover])
            if was is not None and was[0] == "running":
                record.free += 1
            return
        record.free += job.cores
        if record.terminating and reason and not canceled:
            reason += f"; its pilot, batch job {record.job_id}, was being ended by the scheduler"
        job.leftover = leftover
        job.finish(JobResult(exit_code, reason, bool(canceled)))
        self._ack(record, task_id)

    def _msg_refused(self, record, fields):
        task_id = fields["task"]
        job = record.tasks.pop(task_id, None)
        remaining = fields.get("remaining")
        if isinstance(remaining, (int, float)):
            record.ends_at = self.reactor.seconds() + remaining
        if job is None:
            return
        record.free += job.cores
        self.log.info("Pilot {pilot} refused task {task_id}: {reason}", pilot=record.pilot_id,
                      task_id=task_id, reason=fields.get("reason"))
        if record.state == RUNNING and "ending" in str(fields.get("reason")):
            record.state = DRAINING
        job.pilot = None
        job.job_id = None
        self.waiting.appendleft(job)

    def _msg_draining(self, record, fields):
        if fields.get("terminating"):
            record.terminating = True
            self.log.warn("Pilot {pilot} (job {job_id}) is being ended by the scheduler (SIGTERM)",
                          pilot=record.pilot_id, job_id=record.job_id)
        if record.state == RUNNING:
            record.state = DRAINING
            self.log.info("Pilot {pilot} (job {job_id}) is near its walltime: draining",
                          pilot=record.pilot_id, job_id=record.job_id)

