"""
The TORQUE and PBS Pro (OpenPBS) handlers: C{qsub}, C{qstat}, C{qdel},
C{qselect}.

 - Submission: C{qsub -N <name> -S /bin/sh -j oe -o <task>/.everest/job.out
   [-q queue] [-l ...] <task>/.everest/job.sh}; the job id is the last line
   qsub prints (C{123.server}).  Job names must start with a letter in PBS,
   so a job's name is the task id with a C{e} in front (the task id itself
   may start with a digit).  TORQUE gets one
   C{-l nodes=N:ppn=C,walltime=HH:MM:SS,mem=<job total>mb}; PBS Pro
   C{-l select=N:ncpus=C:mem=<per chunk>mb -l walltime=HH:MM:SS}.
 - Status, one command per chunk of ids: TORQUE C{qstat -f id...} (text; or
   C{qstat -x id...}, XML, with C{qstat_format="xml"}); PBS Pro
   C{qstat -f -F json -x id...} (C{-x}: finished jobs too).  Jobs the server
   does not know are reported on standard error ("Unknown Job Id") with a
   non-zero status; that is an answer, not a failure.
 - State letters: C{Q H W T} (and PBS Pro C{M}) queued; C{R E S} (and PBS Pro
   C{B U}) running; TORQUE C{C}, PBS Pro C{F X} ended; the exit-code file
   decides, unless C{exit_status} says the server killed the job: TORQUE's
   -10/-11/-12 and PBS Pro's -24...-29 (memory, walltime, CPU time...), other
   negative values (could not start), or 256+N (killed by signal N; a
   walltime overrun when the job used its whole walltime).
 - Cancel: C{qdel}.
 - By name: C{qselect -N <name> -u <user>} (PBS Pro with C{-x}), then the
   status command; without C{qselect} (SLURM's PBS wrappers) every job from
   C{qstat -f}, filtered here.
 - Resources: one C{qstat -Q -f [queue]} (PBS Pro with C{-F json}).
"""

import json
import math
import os
import re
import signal as signals
import xml.etree.ElementTree as ElementTree

from twisted.internet import defer

from everest_agent import jobscript
from everest_agent.handlers.batch import ENDED, QUEUED, RUNNING, UNKNOWN, BatchTaskHandler, JobStatus, last_line, walltime
from everest_agent.handlers.command import CommandError

TORQUE_EXIT = {
    -1: ("EXEC_FAILED", "job exec failed, before files, no retry"),
    -2: ("EXEC_FAILED", "job exec failed, after files, no retry"),
    -3: ("EXEC_FAILED", "job execution failed, do retry"),
    -4: ("EXEC_FAILED", "job aborted on MOM initialization"),
    -5: ("EXEC_FAILED", "job aborted on MOM init, chkpt, no migrate"),
    -6: ("EXEC_FAILED", "job aborted on MOM init, chkpt, ok migrate"),
    -7: ("EXEC_FAILED", "job restart failed"),
    -8: ("EXEC_FAILED", "exec() of user command failed"),
    -9: ("EXEC_FAILED", "could not create/open stdout stderr files"),
    -10: ("OUT_OF_MEMORY", "TORQUE exit_status -10: job exceeded a memory limit"),
    -11: ("TIMEOUT", "TORQUE exit_status -11: job exceeded a walltime limit"),
    -12: ("CPU_LIMIT", "TORQUE exit_status -12: job exceeded a CPU time limit"),
    -13: ("EXEC_FAILED", "could not create the job's cgroups"),
    -14: ("EXEC_FAILED", "prologue failed"),
}

PBSPRO_EXIT = {
    -1: ("EXEC_FAILED", "job exec failed, before files, no retry"),
    -2: ("EXEC_FAILED", "job exec failed, after files, no retry"),
    -3: ("EXEC_FAILED", "job execution failed, do retry"),
    -4: ("EXEC_FAILED", "job aborted on MoM initialization"),
    -5: ("EXEC_FAILED", "job aborted on MoM init, chkpt, no migrate"),
    -6: ("EXEC_FAILED", "job aborted on MoM init, chkpt, ok migrate"),
    -7: ("EXEC_FAILED", "job restart failed"),
    -10: ("EXEC_FAILED", "invalid uid/gid for job"),
    -11: ("EXEC_FAILED", "job rerun"),
    -12: ("EXEC_FAILED", "job was checkpointed and killed"),
    -13: ("EXEC_FAILED", "job failed due to a bad password"),
    -14: ("EXEC_FAILED", "job rerun"),
    -15: ("EXEC_FAILED", "requeue job for restart from checkpoint"),
    -16: ("EXEC_FAILED", "a hook rejected the job, requeue for retry"),
    -17: ("EXEC_FAILED", "a hook rejected the job, delete at end"),
    -18: ("EXEC_FAILED", "a hook requested the job be requeued"),
    -19: ("EXEC_FAILED", "a hook requested the job be deleted"),
    -20: ("NODE_FAIL", "PBS exit_status -20: mother superior connection failed"),
    -21: ("EXEC_FAILED", "security breach in PBS directory"),
    -22: ("EXEC_FAILED", "hook error or hook timeout"),
    -23: ("EXEC_FAILED", "no Kerberos credentials"),
    -24: ("RESOURCE_LIMIT", "PBS exit_status -24: job exceeded ncpus (burst)"),
    -25: ("RESOURCE_LIMIT", "PBS exit_status -25: job exceeded ncpus (sum)"),
    -26: ("OUT_OF_MEMORY", "PBS exit_status -26: job exceeded vmem"),
    -27: ("OUT_OF_MEMORY", "PBS exit_status -27: job exceeded mem"),
    -28: ("CPU_LIMIT", "PBS exit_status -28: job exceeded cput"),
    -29: ("TIMEOUT", "PBS exit_status -29: job exceeded walltime"),
    -30: ("EXEC_FAILED", "join job error"),
}

_GONE = re.compile(
    r"unknown job id|job has finished|invalid state for job|request invalid for state of job|"
    r"job has been deleted|already (completed|exiting|done)",
    re.IGNORECASE,
)


def seconds_of(text):
    """C{[[HH:]MM:]SS} -> seconds, or None."""
    try:
        parts = [float(p) for p in str(text).strip().split(":")]
    except ValueError:
        return None
    if not parts or len(parts) > 3:
        return None
    total = 0.0
    for part in parts:
        total = total * 60 + part
    return total


def _signal_name(number):
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_status_failure(status, attrs, table):
    """
    (failure key, detail) for a finished job's exit status, or (None, None)
    when the job's own exit code stands.
    """
    if status is None or 0 <= status < 256:
        return None, None
    if status < 0:
        failure, text = table.get(status, ("EXEC_FAILED", "the server could not run the job"))
        if failure == "EXEC_FAILED":
            text = f"exit_status {status}: {text}"
        return failure, text
    number = status - 256
    detail = f"killed by signal {number} ({_signal_name(number)}), exit_status {status}"
    used = seconds_of(attrs.get("resources_used.walltime", ""))
    limit = seconds_of(attrs.get("Resource_List.walltime", ""))
    if used is not None and limit and used >= limit:
        return "TIMEOUT", detail
    return "KILLED", detail + "; qdel outside the agent, or a resource limit"


def _int(value):
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def pbs_status(job_id, attrs, flavor):
    """
    A L{JobStatus} from one job's attributes (flat names: C{job_state},
    C{Job_Name}, C{exit_status}/C{Exit_status}, C{resources_used.walltime},
    ...).  C{flavor}: C{"torque"} or C{"pbspro"}.
    """
    state = str(attrs.get("job_state", "")).strip()
    name = attrs.get("Job_Name")
    if state in ("Q", "H", "W", "T") or (flavor == "pbspro" and state == "M"):
        return JobStatus(job_id, QUEUED, state, name=name)
    if state in ("R", "E", "S") or (flavor == "pbspro" and state in ("B", "U")):
        return JobStatus(job_id, RUNNING, state, name=name)
    if (flavor == "torque" and state == "C") or (flavor == "pbspro" and state in ("F", "X")):
        status = _int(attrs.get("exit_status", attrs.get("Exit_status")))
        table = TORQUE_EXIT if flavor == "torque" else PBSPRO_EXIT
        failure, detail = exit_status_failure(status, attrs, table)
        comment = attrs.get("comment")
        if detail is None and comment:
            detail = f"comment: {comment}"
        code = status if status is not None and 0 <= status < 256 else None
        return JobStatus(job_id, ENDED, state, failure, detail, code, name)
    return JobStatus(job_id, UNKNOWN, state, name=name)


def _parse_blocks(text, header):
    """
    C{qstat -f}-style text -> C{[(name, {attribute: value})]}: a block
    starts at a line matching C{header} (its group 1 is the name); then
    come C{attribute = value} lines, long values wrapped onto indented
    continuation lines, which are joined.
    """
    blocks = []
    attrs = None
    key = None
    for line in text.splitlines():
        match = re.match(header, line)
        if match:
            attrs = {}
            blocks.append((match.group(1), attrs))
            key = None
            continue
        if attrs is None or not line.strip():
            continue
        match = re.match(r"\s+([A-Za-z_][\w.]*) = ?(.*)$", line)
        if match:
            key = match.group(1)
            attrs[key] = match.group(2)
        elif key is not None and line[:1].isspace():
            attrs[key] += line.lstrip()
    return blocks


def parse_qstat_text(text):
    """
    C{qstat -f} output (TORQUE, PBS Pro, SLURM's wrapper) ->
    C{[(job_id, {attribute: value})]}.
    """
    return _parse_blocks(text, r"\s*Job Id:\s*(\S+)")


def parse_qstat_xml(text):
    """TORQUE C{qstat -x} output -> C{[(job_id, {attribute: value})]}."""
    if not text.strip():
        return []
    root = ElementTree.fromstring(text)
    jobs = []
    for job in root.iter("Job"):
        attrs = {}
        for child in job:
            if len(child):
                for grandchild in child:
                    attrs[f"{child.tag}.{grandchild.tag}"] = (grandchild.text or "").strip()
            else:
                attrs[child.tag] = (child.text or "").strip()
        job_id = attrs.pop("Job_Id", None)
        if job_id:
            jobs.append((job_id, attrs))
    return jobs


def _flatten(prefix, value, into):
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, into)
    else:
        into[prefix] = value


_LONE_BACKSLASH = re.compile(r'\\(?!["\\/bfnrtu])')


def load_pbs_json(text):
    """
    C{qstat -F json} output as a dict.  Some PBS Pro versions do not escape
    backslashes in values; those are repaired.

    @raise ValueError: if it is not JSON even so.
    """
    if not text.strip():
        return {}
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return json.loads(_LONE_BACKSLASH.sub(r"\\\\", text), strict=False)


def parse_qstat_json(text):
    """PBS Pro C{qstat -f -F json} output -> C{[(job_id, {attribute: value})]}."""
    data = load_pbs_json(text)
    jobs = []
    for job_id, attrs in (data.get("Jobs") or {}).items():
        flat = {}
        for key, value in attrs.items():
            if key == "Variable_List":
                continue
            _flatten(key, value, flat)
        jobs.append((job_id, flat))
    return jobs


def parse_state_count(text):
    counts = {}
    for part in str(text).split():
        name, _, number = part.partition(":")
        if number.isdigit():
            counts[name.lower()] = int(number)
    return counts


def _truth(value):
    return str(value).strip().lower() in ("true", "yes", "1", "t")


def queue_info(name, attrs):
    info = {"queue": name}
    if "enabled" in attrs:
        info["enabled"] = _truth(attrs["enabled"])
    if "started" in attrs:
        info["started"] = _truth(attrs["started"])
    if "total_jobs" in attrs:
        info["totalJobs"] = _int(attrs["total_jobs"])
    if "state_count" in attrs:
        info["jobs"] = parse_state_count(attrs["state_count"])
    return info


def parse_queues_text(text):
    """C{qstat -Q -f} text -> C{{queue: attributes}}."""
    return dict(_parse_blocks(text, r"\s*Queue:\s*(\S+)"))


def parse_queues_json(text):
    queues = {}
    for name, attrs in (load_pbs_json(text).get("Queue") or {}).items():
        flat = {}
        _flatten("", attrs, flat)
        queues[name] = flat
    return queues


def _match_ids(ids, jobs):
    """
    Pair the ids asked about with the ids qstat printed: exactly, or by
    the number before the first dot (a server may print a shorter or
    longer host part than qsub did).
    """
    printed = dict(jobs)
    by_number = {}
    for job_id in printed:
        by_number.setdefault(job_id.split(".", 1)[0], []).append(job_id)
    pairs = {}
    for asked in ids:
        if asked in printed:
            pairs[asked] = printed[asked]
            continue
        candidates = by_number.get(asked.split(".", 1)[0], [])
        if len(candidates) == 1:
            pairs[asked] = printed[candidates[0]]
    return pairs


class _PbsFamilyHandler(BatchTaskHandler):
    """What TORQUE and PBS Pro share."""

    flavor = None
    default_commands = {
        "submit": "qsub",
        "status": "qstat",
        "cancel": "qdel",
        "select": "qselect",
    }

    def __init__(self, reactor, queue="", **kwargs):
        """
        @param queue: C{qsub -q}, or empty for the server's default.
        @param kwargs: see L{BatchTaskHandler.__init__}.
        """
        BatchTaskHandler.__init__(self, reactor, **kwargs)
        self.queue = queue
        self._have_select = True

    @classmethod
    def handler_kwargs(cls, config):
        kwargs = BatchTaskHandler.handler_kwargs(config)
        kwargs["queue"] = config.handler.queue
        return kwargs

    def job_name(self, request):
        return "e" + request.task_id

    def resource_args(self, requirements):
        raise NotImplementedError

    def submit_argv(self, request, script):
        output = os.path.join(request.directory, jobscript.JOB_OUTPUT_FILE)
        argv = [
            self.command("submit"),
            "-N",
            self.job_name(request),
            "-S",
            "/bin/sh",
            "-j",
            "oe",
            "-o",
            output,
        ]
        if self.queue:
            argv += ["-q", self.queue]
        argv += self.resource_args(request.requirements or {})
        argv += self.extra_args
        argv.append(script)
        return argv

    def parse_submit_output(self, out):
        job_id = last_line(out)
        if not re.match(r"[0-9]+(\[[0-9]*\])?(\.\S+)?\Z", job_id):
            raise ValueError(f"{job_id!r} is not a job id")
        return job_id

    def status_argv(self, ids):
        raise NotImplementedError

    def parse_status(self, out):
        """@return: C{[(job_id, attributes)]}."""
        raise NotImplementedError

    def _check_status_exit(self, argv, out, err, code):
        """Raise L{CommandError} unless a non-zero status only meant unknown jobs."""
        if code == 0:
            return
        lines = [line for line in err.splitlines() if line.strip()]
        if all(_GONE.search(line) for line in lines):
            return
        raise CommandError.from_exit(argv, code, err)

    @defer.inlineCallbacks
    def query(self, ids):
        argv = self.status_argv(ids)
        out, err, code = yield self._run(argv)
        self._check_status_exit(argv, out, err, code)
        try:
            jobs = self.parse_status(out)
        except ValueError as e:
            raise CommandError(argv, f"cannot parse the output of {argv[0]}: {e}", code, err) from None
        return {
            asked: pbs_status(asked, attrs, self.flavor) for asked, attrs in _match_ids(ids, jobs).items()
        }

    def select_argv(self, name):
        argv = [self.command("select"), "-N", name]
        if self.user:
            argv += ["-u", self.user]
        return argv

    @defer.inlineCallbacks
    def find_by_name(self, request):
        name = self.job_name(request)
        if self._have_select:
            argv = self.select_argv(name)
            try:
                out, err, code = yield self._run(argv, task_id=request.task_id)
            except CommandError as e:
                if "command not found" not in str(e):
                    raise
                self.log.info("No {select}; searching jobs by name in qstat's full list", select=argv[0])
                self._have_select = False
            else:
                if code != 0:
                    raise CommandError.from_exit(argv, code, err)
                ids = [word for word in out.split() if word[:1].isdigit()]
                if not ids:
                    return []
                statuses = yield self.query(ids)
                return [s for s in statuses.values() if s.name in (None, name)]
        argv = self.status_argv([])
        out, err, code = yield self._run(argv, task_id=request.task_id)
        self._check_status_exit(argv, out, err, code)
        try:
            jobs = self.parse_status(out)
        except ValueError as e:
            raise CommandError(argv, f"cannot parse the output of {argv[0]}: {e}", code, err) from None
        found = []
        for job_id, attrs in jobs:
            owner = str(attrs.get("Job_Owner", ""))
            if attrs.get("Job_Name") != name:
                continue
            if self.user and owner and owner.split("@", 1)[0] != self.user:
                continue
            found.append(pbs_status(job_id, attrs, self.flavor))
        return found

    def cancel_argv(self, ids):
        return [self.command("cancel")] + list(ids)

    def cancel_says_gone(self, out, err, code):
        text = (out + "\n" + err).strip()
        # SLURM's qdel wrapper says nothing about jobs that are gone.
        return not text or all(_GONE.search(line) for line in text.splitlines() if line.strip())

    def queues_argv(self):
        raise NotImplementedError

    def parse_queues(self, out):
        raise NotImplementedError

    @defer.inlineCallbacks
    def query_resources(self):
        argv = self.queues_argv()
        out, err, code = yield self._run(argv)
        if code != 0:
            raise CommandError.from_exit(argv, code, err)
        queues = self.parse_queues(out)
        if self.queue:
            if self.queue not in queues:
                raise ValueError(f"{argv[0]} does not list queue {self.queue}")
            return queue_info(self.queue, queues[self.queue])
        return {"queues": [queue_info(name, attrs) for name, attrs in sorted(queues.items())]}


class TorqueTaskHandler(_PbsFamilyHandler):
    """
    Runs each task as one TORQUE job (also works with SLURM's PBS wrappers,
    Debian's C{slurm-wlm-torque}).

    @ivar qstat_format: C{"text"} (C{qstat -f}, the default; TORQUE and the
        wrappers) or C{"xml"} (C{qstat -x}, TORQUE only).
    """

    name = "torque"
    flavor = "torque"

    def __init__(self, reactor, queue="", qstat_format="text", **kwargs):
        """
        @param queue: C{qsub -q}, or empty.
        @param qstat_format: C{"text"} or C{"xml"}.
        @param kwargs: see L{BatchTaskHandler.__init__}.
        """
        if qstat_format not in ("text", "xml"):
            raise ValueError(f"qstat_format must be 'text' or 'xml', not {qstat_format!r}")
        _PbsFamilyHandler.__init__(self, reactor, queue=queue, **kwargs)
        self.qstat_format = qstat_format

    @classmethod
    def handler_kwargs(cls, config):
        kwargs = _PbsFamilyHandler.handler_kwargs(config)
        kwargs["qstat_format"] = getattr(config.handler, "qstat_format", "text")
        return kwargs

    def resource_args(self, requirements):
        # One -l with a comma-separated list: SLURM's qsub wrapper keeps
        # only the last of several -l options.
        resources = []
        nodes = int(requirements.get("nodes") or 1)
        cores = int(requirements.get("coresPerNode") or 1)
        memory = requirements.get("memoryPerCore")
        limit = requirements.get("timeLimit")
        if requirements.get("nodes") or requirements.get("coresPerNode"):
            resources.append(f"nodes={nodes}:ppn={cores}")
        if limit:
            resources.append(f"walltime={walltime(limit)}")
        if memory:
            resources.append(f"mem={int(math.ceil(memory * cores * nodes))}mb")
        return ["-l", ",".join(resources)] if resources else []

    def status_argv(self, ids):
        if self.qstat_format == "xml":
            return [self.command("status"), "-x"] + list(ids)
        return [self.command("status"), "-f"] + list(ids)

    def parse_status(self, out):
        if self.qstat_format == "xml":
            try:
                return parse_qstat_xml(out)
            except ElementTree.ParseError as e:
                raise ValueError(str(e)) from None
        return parse_qstat_text(out)

    def queues_argv(self):
        return [self.command("status"), "-Q", "-f"] + ([self.queue] if self.queue else [])

    def parse_queues(self, out):
        return parse_queues_text(out)


class PbsProTaskHandler(_PbsFamilyHandler):
    """Runs each task as one PBS Professional / OpenPBS job."""

    name = "pbs"
    flavor = "pbspro"

    def resource_args(self, requirements):
        args = []
        nodes = int(requirements.get("nodes") or 1)
        cores = int(requirements.get("coresPerNode") or 1)
        memory = requirements.get("memoryPerCore")
        limit = requirements.get("timeLimit")
        if requirements.get("nodes") or requirements.get("coresPerNode") or memory:
            chunk = f"select={nodes}:ncpus={cores}"
            if memory:
                chunk += f":mem={int(math.ceil(memory * cores))}mb"
            args += ["-l", chunk]
        if limit:
            args += ["-l", f"walltime={walltime(limit)}"]
        return args

    def status_argv(self, ids):
        return [self.command("status"), "-f", "-F", "json", "-x"] + list(ids)

    def parse_status(self, out):
        return parse_qstat_json(out)

    def select_argv(self, name):
        return _PbsFamilyHandler.select_argv(self, name) + ["-x"]

    def queues_argv(self):
        return [self.command("status"), "-Q", "-f", "-F", "json"] + ([self.queue] if self.queue else [])

    def parse_queues(self, out):
        return parse_queues_json(out)
