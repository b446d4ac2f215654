"""
In-memory fakes of the agent's parts, for tests (the project's and yours).

Each fake implements the same interface as the real part and is checked
against it with C{verifyObject} in the project's tests.
"""

import json

from twisted.internet import defer
from zope.interface import implementer

from everest_agent.interfaces import IJob, ITaskHandler, JobResult


@implementer(IJob)
class FakeJob:
    """A job whose life the test drives: L{start}, L{finish}."""

    def __init__(self, request, job_id, batch=False):
        self.request = request
        self.job_id = job_id
        self.batch = batch
        self.running = defer.Deferred()
        self.result = defer.Deferred()
        self.canceled = False
        self.leftover = False  # set by a test: processes of the task outlived it

    def start(self):
        self.running.callback(None)

    def finish(self, exit_code=0, reason=None):
        if exit_code and reason is None:
            reason = f"exit code {exit_code}"
        self.result.callback(JobResult(exit_code, reason))

    def cancel(self):
        self.canceled = True
        if not self.result.called:
            self.result.callback(JobResult(None, "canceled", canceled=True))


@implementer(ITaskHandler)
class FakeTaskHandler:
    """
    Records submissions.  Batch jobs start only when the test says so
    (L{FakeJob.start}); others are running at once, like local processes.

    @ivar jobs: task id -> L{FakeJob}, in submission order.
    """

    name = "fake"
    durable_jobs = True

    def __init__(self, batch=False, fail_submit=None, hold_submit=False):
        self.batch = batch
        self.fail_submit = fail_submit
        self.hold_submit = hold_submit  # submissions wait until release_submits()
        self.held = []
        self.jobs = {}
        self.reattached = []
        self._next = 100

    def slots_needed(self, requirements):
        return requirements.get("coresPerNode", 1)

    def submit(self, request):
        if self.fail_submit:
            return defer.fail(RuntimeError(self.fail_submit))
        self._next += 1
        job = FakeJob(request, str(self._next), self.batch)
        self.jobs[request.task_id] = job
        if not self.batch:
            job.start()  # like a local process: running once spawned
        if self.hold_submit:
            d = defer.Deferred()
            self.held.append((d, job))
            return d
        return defer.succeed(job)

    def release_submits(self):
        held, self.held = self.held, []
        for d, job in held:
            d.callback(job)

    def reattach(self, request, job_id):
        self.reattached.append((request.task_id, job_id))
        job = FakeJob(request, job_id or "found-by-name", self.batch)
        self.jobs[request.task_id] = job
        return defer.succeed(job)

    def resource_info(self):
        return defer.succeed({"fake": True})


class FakeStager:
    """Stages nothing; records calls; can be told to fail."""

    def __init__(self):
        self.staged_in = []
        self.staged_out = []
        self.fail_in = None
        self.out_errors = []
        self.hold_in = None  # a Deferred to wait on during stage-in, to test cancel
        self.inputs_given = []  # the inputs of each stage_in, as the stager got them
        self.uploaded = []  # what stage_out says it sent: [{"path", "size", "sha256", "uri"}]
        self.kept = []  # what list_outputs finds: [{"path", "size", "sha256"}]
        self.listed = []  # (task_dir, patterns) of each list_outputs
        self.hold_out = None  # a Deferred to wait on during stage-out (and listing)

    async def stage_in(self, task_dir, inputs):
        self.staged_in.append(task_dir)
        self.inputs_given.append(inputs)
        if self.hold_in is not None:
            await self.hold_in
        if self.fail_in:
            from everest_agent.transfer.errors import StagingError

            raise StagingError(self.fail_in)

    async def stage_out(self, task_dir, outputs, uris=False):
        self.staged_out.append(task_dir)
        if self.hold_out is not None:
            await self.hold_out
        sent = [dict(f) if uris else {k: v for k, v in f.items() if k != "uri"} for f in self.uploaded]
        return sent, list(self.out_errors)

    async def list_outputs(self, task_dir, patterns):
        self.listed.append((task_dir, list(patterns)))
        if self.hold_out is not None:
            await self.hold_out
        return [dict(f) for f in self.kept], []

    def close(self):
        return defer.succeed(None)


class FakeSession:
    """
    Stands for a WebSocket connection: collects what is sent, already decoded.
    """

    def __init__(self):
        self.sent = []

    def send(self, message):
        # Round-trip through JSON as the wire would.
        self.sent.append(json.loads(json.dumps(message)))

    def send_payload(self, payload):
        """A message encoded already (the outbox's), as it would go on the wire."""
        self.sent.append(json.loads(payload))

    def of_type(self, kind):
        return [m for m in self.sent if m[0] == kind]

    def states(self, task_id=None):
        """C{[(taskId, state)]} of the TASK_STATE messages sent."""
        return [
            (m[1], m[2]) if task_id is None else m[2]
            for m in self.sent
            if m[0] == "TASK_STATE" and (task_id is None or m[1] == task_id)
        ]
