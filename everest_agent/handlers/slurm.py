"""
The SLURM handler: C{sbatch}, C{squeue}, C{sacct}, C{scancel}, C{sinfo}.

 - Submission: C{sbatch --parsable} with the job name set to the task id and
   the job's own output in C{.everest/job.out}; C{resourceRequirements}
   become C{--nodes}, C{--ntasks-per-node} (or C{--cpus-per-task}),
   C{--mem-per-cpu} and C{--time}; the configuration adds C{--partition},
   C{--account}, C{--qos} and any C{extra_args}.
 - Status: one C{squeue -t all -j id,id,...} per chunk of ids per poll.
   C{-t all} also lists jobs that finished within C{MinJobAge}, with the
   state they ended in.  SLURM leaves out ids it has forgotten (except that
   with a single forgotten id it fails with "Invalid job id"): those jobs
   are asked about in C{sacct} (the accounting database, or without one the
   job-completion log through C{sacct --completion}), if that works.
 - Cancel: C{scancel}.
 - Resources: one C{sinfo} for the partition's nodes and CPUs.

State table (C{squeue}'s C{%T}, C{sacct}'s C{State}):

 - C{PENDING}, C{CONFIGURING}, C{REQUEUED}, C{REQUEUE_HOLD}, C{REQUEUE_FED},
   C{RESV_DEL_HOLD}: queued;
 - C{RUNNING}, C{COMPLETING}, C{SUSPENDED}, C{STOPPED}, C{SIGNALING},
   C{STAGE_OUT}, C{RESIZING}: running;
 - C{COMPLETED}, C{FAILED}: ended, the exit-code file decides;
 - C{TIMEOUT}, C{OUT_OF_MEMORY}, C{NODE_FAIL}, C{PREEMPTED}, C{BOOT_FAIL},
   C{DEADLINE}, C{CANCELLED}, C{REVOKED}, C{SPECIAL_EXIT}: ended, failed
   for that reason;
 - anything else is logged and taken as still active.
"""

import math
import os

from twisted.internet import defer

from everest_agent import jobscript
from everest_agent.handlers.batch import ENDED, QUEUED, RUNNING, UNKNOWN, BatchTaskHandler, JobStatus, last_line
from everest_agent.handlers.command import CommandError

QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
ENDED_STATES = {"COMPLETED", "FAILED"}
FAILED_STATES = {
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "CANCELLED",
    "REVOKED",
    "SPECIAL_EXIT",
}

#: squeue reasons that say no more than the state they come with.
_UNINFORMATIVE_REASONS = {"", "None", "(null)", "TimeLimit", "OutOfMemory", "DeadLine", "NonZeroExitCode"}

#: squeue's output: id, state, reason, name (last: a name may hold "|").
SQUEUE_FORMAT = "%i|%T|%r|%j"
SACCT_FIELDS = "JobID,State,ExitCode,JobName"


def slurm_status(job_id, state, reason="", name=None, exit_code=None, detail=None):
    """A L{JobStatus} from SLURM's words (C{state} may be "CANCELLED by 0")."""
    words = state.split()
    base = words[0].rstrip("+") if words else ""
    if base in QUEUED_STATES:
        phase = QUEUED
    elif base in RUNNING_STATES:
        phase = RUNNING
    elif base in ENDED_STATES:
        phase = ENDED
    elif base in FAILED_STATES:
        phase = ENDED
    else:
        phase = UNKNOWN
    failure = base if base in FAILED_STATES else None
    if detail is None and failure and reason and reason not in _UNINFORMATIVE_REASONS:
        detail = f"reason: {reason}"
    return JobStatus(job_id, phase, base, failure, detail, exit_code, name)


def parse_squeue(out):
    """
    C{squeue -h -o '%i|%T|%r|%j'} output -> C{{job_id: JobStatus}}.
    """
    statuses = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 3)
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"unexpected squeue line {line!r}")
        job_id, state = parts[0].strip(), parts[1].strip()
        reason = parts[2].strip() if len(parts) > 2 else ""
        name = parts[3] if len(parts) > 3 else None
        statuses[job_id] = slurm_status(job_id, state, reason, name)
    return statuses


def parse_exit_code(text):
    """
    sacct's C{ExitCode} (C{"3:0"}: status 3, signal 0) -> (status or None, signal or None).
    """
    try:
        status, _, signal = text.strip().partition(":")
        status, signal = int(status), int(signal or 0)
    except ValueError:
        return None, None
    if signal:
        return None, signal
    return status, None


def parse_sacct(out):
    """
    C{sacct -n -P -o JobID,State,ExitCode,JobName} output ->
    C{{job_id: JobStatus}}; job steps (C{123.batch}) are skipped; a job
    listed twice keeps its last line.
    """
    statuses = {}
    for line in out.splitlines():
        parts = line.split("|", 3)
        if len(parts) < 3 or not parts[0].strip():
            continue
        job_id = parts[0].strip()
        if "." in job_id:
            continue
        code, signal = parse_exit_code(parts[2])
        detail = f"killed by signal {signal}" if signal else None
        status = slurm_status(job_id, parts[1].strip(), name=parts[3] if len(parts) > 3 else None,
                              exit_code=code)
        if detail and status.failure:
            status.detail = detail
        statuses[job_id] = status
    return statuses


def parse_sinfo(out, partition=""):
    """
    C{sinfo -h -o '%P|%a|%F|%C'} output -> the dict for RESOURCE_STATE.
    Without a C{partition}, the default one (marked C{*}) is reported.
    """
    rows = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, avail, nodes, cpus = parts
        default = name.endswith("*")
        rows.append((name.rstrip("*"), default, avail, nodes, cpus))
    if not rows:
        raise ValueError("sinfo listed no partition")
    if partition:
        chosen = [r for r in rows if r[0] == partition]
        if not chosen:
            raise ValueError(f"sinfo does not list partition {partition}")
    else:
        chosen = [r for r in rows if r[1]] or rows[:1]
    name, _, avail, nodes, cpus = chosen[0]
    # A partition listed on several lines (one per node state group) is summed.
    node_counts = [0, 0, 0, 0]
    cpu_counts = [0, 0, 0, 0]
    for row in chosen:
        for counts, text in ((node_counts, row[3]), (cpu_counts, row[4])):
            try:
                values = [int(v) for v in text.split("/")]
            except ValueError:
                continue
            if len(values) == 4:
                for i, v in enumerate(values):
                    counts[i] += v
    keys = ("allocated", "idle", "other", "total")
    return {
        "partition": name,
        "state": avail,
        "nodes": dict(zip(keys, node_counts)),
        "cpus": dict(zip(keys, cpu_counts)),
    }


class SlurmTaskHandler(BatchTaskHandler):
    """
    Runs each task as one SLURM batch job.

    @ivar partition: C{--partition}, or empty for SLURM's default.
    @ivar account: C{--account}, or empty.
    @ivar qos: C{--qos}, or empty.
    @ivar cores_as: how C{coresPerNode} is asked for: C{"tasks"}
        (C{--ntasks-per-node}, e.g. for MPI) or C{"cpus"}
        (C{--ntasks-per-node=1 --cpus-per-task}, e.g. for threads).
    """

    name = "slurm"
    default_commands = {
        "submit": "sbatch",
        "status": "squeue",
        "accounting": "sacct",
        "cancel": "scancel",
        "info": "sinfo",
    }

    def __init__(self, reactor, partition="", account="", qos="", cores_as="tasks", **kwargs):
        """
        @param reactor: see L{BatchTaskHandler.__init__}, as are the other
            keyword arguments (C{poll_interval}, C{command_timeout},
            C{max_submit}, C{extra_args}, C{commands}, C{env}, C{run},
            C{exit_code_polls}, C{user}).
        """
        BatchTaskHandler.__init__(self, reactor, **kwargs)
        if cores_as not in ("tasks", "cpus"):
            raise ValueError(f"cores_as must be 'tasks' or 'cpus', not {cores_as!r}")
        self.partition = partition
        self.account = account
        self.qos = qos
        self.cores_as = cores_as
        self._sacct_modes = [[], ["--completion"]]  # tried in order; the one that works first

    @classmethod
    def handler_kwargs(cls, config):
        h = config.handler
        kwargs = BatchTaskHandler.handler_kwargs(config)
        kwargs.update(
            partition=h.partition,
            account=h.account,
            qos=h.qos,
            cores_as=getattr(h, "cores_as", "tasks"),
        )
        return kwargs

    # Submission.

    def resource_args(self, requirements):
        args = []
        nodes = requirements.get("nodes")
        cores = requirements.get("coresPerNode")
        memory = requirements.get("memoryPerCore")
        limit = requirements.get("timeLimit")
        if nodes:
            args.append(f"--nodes={int(nodes)}")
        if cores:
            if self.cores_as == "tasks":
                args.append(f"--ntasks-per-node={int(cores)}")
            else:
                args += ["--ntasks-per-node=1", f"--cpus-per-task={int(cores)}"]
        if memory:
            args.append(f"--mem-per-cpu={int(math.ceil(memory))}M")
        if limit:
            # SLURM counts whole minutes; round up.
            args.append(f"--time={max(1, int(math.ceil(limit / 60.0)))}")
        return args

    def submit_argv(self, request, script):
        output = os.path.join(request.directory, jobscript.JOB_OUTPUT_FILE)
        argv = [
            self.command("submit"),
            "--parsable",
            f"--job-name={self.job_name(request)}",
            f"--chdir={request.directory}",
            f"--output={output}",
            f"--error={output}",
        ]
        argv += self.resource_args(request.requirements or {})
        for option, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos)):
            if value:
                argv.append(f"{option}={value}")
        argv += self.extra_args
        argv.append(script)
        return argv

    def parse_submit_output(self, out):
        # --parsable: "<id>" or "<id>;<cluster>", maybe after warnings.
        job_id = last_line(out).split(";", 1)[0]
        if not job_id or not job_id.replace("_", "").isdigit():
            raise ValueError(f"{job_id!r} is not a job id")
        return job_id

    # Status.

    @defer.inlineCallbacks
    def query(self, ids):
        argv = [self.command("status"), "-h", "-t", "all", "-j", ",".join(ids), "-o", SQUEUE_FORMAT]
        out, err, code = yield self._run(argv)
        if code != 0:
            if len(ids) == 1 and "invalid job id" in err.lower():
                return {}  # the one job asked about is forgotten
            raise CommandError.from_exit(argv, code, err)
        try:
            statuses = parse_squeue(out)
        except ValueError as e:
            raise CommandError(argv, f"cannot parse squeue's output: {e}", code, err) from None
        return {job_id: statuses[job_id] for job_id in ids if job_id in statuses}

    @defer.inlineCallbacks
    def _sacct(self, args):
        """Run sacct with the first mode that works (database, then completion log)."""
        last = None
        for mode in list(self._sacct_modes):
            argv = [self.command("accounting")] + mode + ["-n", "-P", "-X"] + args
            try:
                out, err, code = yield self._run(argv)
            except CommandError as e:
                last = e
                continue
            if code == 0:
                if mode is not self._sacct_modes[0]:
                    self._sacct_modes.remove(mode)
                    self._sacct_modes.insert(0, mode)
                return out
            last = CommandError.from_exit(argv, code, err)
        raise last

    @defer.inlineCallbacks
    def query_finished(self, ids):
        out = yield self._sacct(["-j", ",".join(ids), "-o", SACCT_FIELDS])
        statuses = parse_sacct(out)
        return {job_id: statuses[job_id] for job_id in ids if job_id in statuses}

    @defer.inlineCallbacks
    def find_by_name(self, request):
        name = self.job_name(request)
        argv = [self.command("status"), "-h", "-t", "all", f"--name={name}", "-o", SQUEUE_FORMAT]
        if self.user:
            argv[1:1] = ["-u", self.user]
        out, err, code = yield self._run(argv, task_id=request.task_id)
        if code != 0:
            raise CommandError.from_exit(argv, code, err)
        try:
            found = [s for s in parse_squeue(out).values() if s.name == name]
        except ValueError as e:
            raise CommandError(argv, f"cannot parse squeue's output: {e}", code, err) from None
        if found:
            return found
        # Not in the queue any more: maybe accounting remembers it.  The
        # completion log ignores --name and -u, hence the filter below.
        args = [f"--name={name}", "-S", "now-30days", "-o", SACCT_FIELDS]
        if self.user:
            args[0:0] = ["-u", self.user]
        try:
            out = yield self._sacct(args)
        except CommandError as e:
            self.log.info(
                "Task {task_id}: no accounting to search for its job ({error})", task_id=request.task_id, error=str(e)
            )
            return []
        return [s for s in parse_sacct(out).values() if s.name == name]

    # Cancel.

    def cancel_argv(self, ids):
        return [self.command("cancel")] + list(ids)

    def cancel_says_gone(self, out, err, code):
        return "invalid job id" in err.lower() or "already completing or completed" in err.lower()

    # Resources.

    @defer.inlineCallbacks
    def query_resources(self):
        argv = [self.command("info"), "-h", "-o", "%P|%a|%F|%C"]
        if self.partition:
            argv += ["-p", self.partition]
        out, err, code = yield self._run(argv)
        if code != 0:
            raise CommandError.from_exit(argv, code, err)
        return parse_sinfo(out, self.partition)
