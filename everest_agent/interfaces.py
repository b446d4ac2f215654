"""
Interfaces between the parts of the agent.

They are wiring checks (``verifyObject`` in the tests) and the one place
that says what a back end must do; in-memory fakes of each live in
L{everest_agent.testing}.
"""

from dataclasses import dataclass, field
from typing import Optional

from zope.interface import Attribute, Interface


@dataclass
class JobRequest:
    """
    What a task handler needs to run one task.

    @ivar task_id: the task's id, safe as a file name and a job name.
    @ivar directory: absolute path of the task directory; the command runs
        there, its standard output and error go to the files C{stdout} and
        C{stderr} in it.
    @ivar command: the shell command line, run by C{/bin/sh -c}.
    @ivar environment: variables to add to the task's environment (the
        spec's own plus C{EVEREST_TASK_ID} and friends).
    @ivar requirements: the spec's C{resourceRequirements}.
    """

    task_id: str
    directory: str
    command: str
    environment: dict = field(default_factory=dict)
    requirements: dict = field(default_factory=dict)

    @property
    def time_limit(self) -> Optional[float]:
        return self.requirements.get("timeLimit")


@dataclass(frozen=True)
class JobResult:
    """
    How a job ended.

    @ivar exit_code: the command's exit status, or C{None} when it has none
        (killed by a signal, never ran, lost).
    @ivar reason: why the task failed or was canceled; C{None} on success.
    @ivar canceled: the job ended because L{IJob.cancel} was called.
    """

    exit_code: Optional[int]
    reason: Optional[str] = None
    canceled: bool = False

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.reason is None and not self.canceled


class IJob(Interface):
    """
    One task's job, as its handler runs it.
    """

    job_id = Attribute(
        "A string that finds the job again after a restart: a batch job id, "
        "or for local processes their process id."
    )
    batch = Attribute("True when job_id is a scheduler's id (reported as jobId).")
    running = Attribute(
        "A Deferred that fires (with None) once the job is running; it may "
        "already have fired. It never fails; a job that ends before it ran "
        "just fires result."
    )
    result = Attribute("A Deferred that fires with a JobResult when the job has ended.")

    def cancel():
        """
        Stop the job (local: TERM to its process group, then KILL after a
        grace period; batch: the scheduler's cancel command).  C{result}
        fires afterwards with C{canceled=True}, unless the job had already
        ended.
        """


class ITaskHandler(Interface):
    """
    A back end that runs tasks: the machine itself, SLURM, TORQUE/PBS.

    Handlers that poll or keep timers are also L{twisted.application.service.IService}s;
    the agent starts them with itself.
    """

    name = Attribute("Short name sent in HELLO: local, slurm, torque, pbs.")
    durable_jobs = Attribute(
        "True when a job can outlive this machine (a batch job runs on other "
        "nodes): the agent then waits until the 'submitting' record is on disk "
        "(fsync) before submit().  False for local processes, which a machine "
        "crash ends too: the record written to the file is enough, since a "
        "killed agent leaves it in the page cache."
    )

    def slots_needed(requirements):
        """
        How many of the agent's C{max_tasks} slots a task with these
        C{resourceRequirements} takes (local: its cores; batch: 1).

        @raise ValueError: if such a task can never run here, with the reason.
        """

    def submit(request):
        """
        Start a task.

        @param request: a L{JobRequest}.
        @return: a Deferred that fires with an L{IJob} once the job exists
            (the process is spawned, or the scheduler gave a job id), or
            fails with a reason if it could not be started.
        """

    def reattach(request, job_id):
        """
        Find a job again after the agent restarted.

        @param job_id: the job id recorded, or C{None} if the agent stopped
            before recording one (then the handler searches by task).
        @return: a Deferred firing with an L{IJob} whose C{result} reports
            the job's real outcome, even if it ended while the agent was away;
            or failing with L{JobNeverStarted} (safe to submit) or
            L{JobLost} (the outcome is unknown).
        """

    def resource_info():
        """
        @return: a Deferred firing with a dict for C{RESOURCE_STATE.scheduler}
            (empty for the local handler).
        """


class ISender(Interface):
    """
    The agent's only way to talk to the platform.
    """

    def task_state(task_id, state, info=None):
        """
        Report a task state reliably.

        @return: a Deferred that fires with the message's C{seq} once the
            message is durably in the outbox (it is sent right after).
        """

    def task_message(task_id, text):
        """Relay a message from a task, reliably, like L{task_state}."""

    def send_unreliable(message):
        """Send now if a session is up, else drop (RESOURCE_STATE, ERROR)."""


class JobLost(Exception):
    """A job that cannot be found again; the message says why."""


class JobNeverStarted(JobLost):
    """
    L{ITaskHandler.reattach} is sure the job was never started (the agent
    stopped between recording the C{submitting} phase and starting it), so
    starting it now cannot run it twice.
    """
