"""
The Grid Engine handler (Son of Grid Engine, Univa/Altair GE, Open Cluster
Scheduler): C{qsub}, C{qstat}, C{qacct}, C{qdel}.

 - Submission: C{qsub -terse -N e<task> -S /bin/sh -j y -o <task>/.everest/job.out
   -wd <task>} (absolute paths: a relative C{-o} is resolved against
   C{$HOME}); C{coresPerNode} becomes C{-pe <pe> N}, C{timeLimit}
   C{-l h_rt=HH:MM:SS}, C{memoryPerCore} C{-l <memory complex>=<M>M}
   (per slot, as Grid Engine counts it); C{-q} and C{-P} from the
   configuration.  Job names may not start with a digit, hence the C{e}.
 - Status: one C{qstat -xml -u <user>} per poll for every active job.  The
   XML is parsed with the standard library with entity expansion refused.
   State letters: C{E} (C{Eqw}) failed, with the reason from one
   C{qstat -j id,... -xml} (the job is then deleted); C{d} (C{dr}, C{dt})
   ended (deleted: canceled if the agent asked, else failed); C{r t R}
   running; C{s S T} (suspended) still active, as running; C{q w h}
   queued; other letters are logged and taken as still active.
 - A job that left C{qstat} is decided by its exit-code file; C{qacct -j}
   (when accounting is there) says why a job without one died
   (C{failed}, C{exit_status}).
 - Cancel: C{qdel}.  By name: the same C{qstat -xml}, then C{qacct -j name}.
 - Resources: one C{qstat -g c}.
"""

import os
import re
import xml.parsers.expat

from twisted.internet import defer

from everest_agent import jobscript
from everest_agent.handlers.batch import ENDED, QUEUED, RUNNING, UNKNOWN, BatchTaskHandler, JobStatus, last_line, walltime
from everest_agent.handlers.command import CommandError

_KNOWN_LETTERS = set("dEhqrRsStTw")


class UnsafeXML(ValueError):
    """The document declares entities or a DTD, which this parser refuses."""


def parse_xml(text):
    """
    Parse C{text} into nested C{(tag, attributes, children, text)} tuples,
    refusing any DTD or entity declaration (no entity expansion at all).

    @raise ValueError: if it is not well-formed XML or declares entities.
    """
    parser = xml.parsers.expat.ParserCreate()
    root = []
    stack = []

    def start(tag, attrs):
        node = (tag, attrs, [], [])
        (stack[-1][2] if stack else root).append(node)
        stack.append(node)

    def end(tag):
        stack.pop()

    def chars(data):
        if stack:
            stack[-1][3].append(data)

    def refuse(*args):
        raise UnsafeXML("the XML declares a DTD or entities; refused")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    try:
        parser.Parse(text.encode("utf-8") if isinstance(text, str) else text, True)
    except xml.parsers.expat.ExpatError as e:
        raise ValueError(f"not well-formed XML: {e}") from None
    if not root:
        raise ValueError("no XML document")
    return root[0]


def _text(node):
    return "".join(node[3]).strip()


def _walk(node, tag):
    if node[0] == tag:
        yield node
    for child in node[2]:
        yield from _walk(child, tag)


def sge_status(job_id, state, name=None, detail=None):
    """A L{JobStatus} from a Grid Engine state (C{qw}, C{r}, C{Eqw}, C{dr}...)."""
    letters = set(state)
    if not state or letters - _KNOWN_LETTERS:
        return JobStatus(job_id, UNKNOWN, state, name=name)
    if "E" in letters:
        return JobStatus(job_id, ENDED, state, "EXEC_FAILED", detail or f"state {state}", name=name)
    if "d" in letters:
        return JobStatus(job_id, ENDED, state, "CANCELLED", f"state {state}", name=name)
    if letters & set("rtRsST") and not letters & set("qw"):
        return JobStatus(job_id, RUNNING, state, name=name)
    return JobStatus(job_id, QUEUED, state, name=name)


def parse_qstat_xml(text):
    """
    C{qstat -xml} output -> C{{job_id: (state, name, owner)}}.  An array job
    listed on several lines gets one entry: an error state wins, then a
    deletion, then running tasks, then queued ones.
    """
    root = parse_xml(text)
    jobs = {}
    for entry in _walk(root, "job_list"):
        fields = {child[0]: _text(child) for child in entry[2]}
        job_id = fields.get("JB_job_number")
        if not job_id:
            raise ValueError("a job_list without JB_job_number")
        state = fields.get("state", "")
        seen = jobs.get(job_id)
        if seen is None or _rank(state) > _rank(seen[0]):
            jobs[job_id] = (state, fields.get("JB_name"), fields.get("JB_owner"))
    return jobs


def _rank(state):
    if "E" in state:
        return 3
    if "d" in state:
        return 2
    return 1 if set(state) & set("rtRsST") else 0


def parse_job_errors(text):
    """C{qstat -j id,... -xml} output -> C{{job_id: first error message}}."""
    root = parse_xml(text)
    errors = {}
    for element in _walk(root, "element"):
        numbers = [c for c in element[2] if c[0] == "JB_job_number"]
        if not numbers:
            continue
        messages = [_text(m) for m in _walk(element, "QIM_message") if _text(m)]
        if messages:
            errors[_text(numbers[0])] = messages[0]
    return errors


def parse_qacct(text):
    """
    C{qacct -j} output -> C{[{field: value}]}, one dict per record (a line
    of C{=} starts each).
    """
    records = []
    current = None
    for line in text.splitlines():
        if line.startswith("====="):
            current = {}
            records.append(current)
            continue
        if current is None or not line.strip():
            continue
        key, _, value = line.partition(" ")
        current[key.strip()] = value.strip()
    return records


def _seconds(text):
    match = re.match(r"\s*([0-9.]+)", text or "")
    return float(match.group(1)) if match else None


def qacct_status(record, time_limit=None):
    """A L{JobStatus} (ended) from one accounting record."""
    job_id = record.get("jobnumber", "")
    name = record.get("jobname")
    failed = record.get("failed", "0")
    failed_code = re.match(r"\s*(\d+)", failed)
    failed_code = int(failed_code.group(1)) if failed_code else 0
    exit_match = re.match(r"\s*(-?\d+)", record.get("exit_status", ""))
    exit_status = int(exit_match.group(1)) if exit_match else None
    code = exit_status if exit_status is not None and 0 <= exit_status < 128 else None
    if failed_code == 0:
        return JobStatus(job_id, ENDED, "done", exit_code=exit_status, name=name)
    detail = f"failed {failed}, exit_status {exit_status}"
    wallclock = _seconds(record.get("ru_wallclock"))
    if failed_code == 37 or (time_limit and wallclock is not None and wallclock >= time_limit):
        return JobStatus(job_id, ENDED, "failed", "TIMEOUT", detail, code, name)
    if failed_code == 100:
        return JobStatus(job_id, ENDED, "failed", "KILLED", detail + "; qdel outside the agent, or a limit", code, name)
    return JobStatus(job_id, ENDED, "failed", "EXEC_FAILED", detail, code, name)


def parse_cluster_queues(text):
    """C{qstat -g c} output -> C{[{queue, load, used, reserved, available, total}]}."""
    queues = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[0] == "CLUSTER" or set(parts[0]) == {"-"}:
            continue
        try:
            used, reserved, available, total = (int(p) for p in parts[2:6])
        except ValueError:
            continue
        queues.append(
            {"queue": parts[0], "load": parts[1], "used": used, "reserved": reserved,
             "available": available, "total": total}
        )
    return queues


class SgeTaskHandler(BatchTaskHandler):
    """
    Runs each task as one Grid Engine job.

    @ivar pe: the parallel environment for C{coresPerNode} (C{-pe pe N}).
    @ivar memory_complex: the complex memory is asked with (C{h_vmem}, or a
        site's own), or empty to ask for none.
    @ivar queue: C{qsub -q}, or empty.
    @ivar project: C{qsub -P}, or empty.
    """

    name = "sge"
    default_commands = {
        "submit": "qsub",
        "status": "qstat",
        "accounting": "qacct",
        "cancel": "qdel",
    }
    chunk_size = 10**9  # one qstat lists every job; ids are filtered here

    def __init__(self, reactor, pe="smp", memory_complex="h_vmem", queue="", project="", **kwargs):
        BatchTaskHandler.__init__(self, reactor, **kwargs)
        self.pe = pe
        self.memory_complex = memory_complex
        self.queue = queue
        self.project = project

    @classmethod
    def handler_kwargs(cls, config):
        h = config.handler
        kwargs = BatchTaskHandler.handler_kwargs(config)
        kwargs.update(pe=h.pe, memory_complex=h.memory_complex, queue=h.queue, project=h.project)
        return kwargs

    def job_name(self, request):
        return "e" + request.task_id

    def resource_args(self, requirements):
        args = []
        cores = requirements.get("coresPerNode")
        nodes = requirements.get("nodes")
        memory = requirements.get("memoryPerCore")
        limit = requirements.get("timeLimit")
        slots = int(cores or 1) * int(nodes or 1)
        if slots > 1:
            args += ["-pe", self.pe, str(slots)]
        if limit:
            args += ["-l", f"h_rt={walltime(limit)}"]
        if memory and self.memory_complex:
            args += ["-l", f"{self.memory_complex}={int(-(-memory // 1))}M"]
        return args

    def submit_argv(self, request, script):
        output = os.path.join(request.directory, jobscript.JOB_OUTPUT_FILE)
        argv = [self.command("submit"), "-terse", "-N", self.job_name(request), "-S", "/bin/sh",
                "-j", "y", "-o", output, "-wd", request.directory]
        argv += self.resource_args(request.requirements or {})
        if self.queue:
            argv += ["-q", self.queue]
        if self.project:
            argv += ["-P", self.project]
        argv += self.extra_args
        argv.append(script)
        return argv

    def parse_submit_output(self, out):
        line = last_line(out)
        job_id = line.split(".", 1)[0]  # an array job prints 12.1-3:1
        if not job_id.isdigit():
            raise ValueError(f"{line!r} is not a job id")
        return job_id

    def status_argv(self):
        argv = [self.command("status"), "-xml"]
        if self.user:
            argv += ["-u", self.user]
        return argv

    @defer.inlineCallbacks
    def _list(self):
        argv = self.status_argv()
        out, err, code = yield self._run(argv)
        if code != 0:
            raise CommandError.from_exit(argv, code, err)
        try:
            return parse_qstat_xml(out)
        except ValueError as e:
            raise CommandError(argv, f"cannot parse qstat's XML: {e}", code, err) from None

    @defer.inlineCallbacks
    def query(self, ids):
        jobs = yield self._list()
        statuses = {job_id: sge_status(job_id, jobs[job_id][0], jobs[job_id][1]) for job_id in ids if job_id in jobs}
        errored = [s.job_id for s in statuses.values() if s.failure == "EXEC_FAILED"]
        if errored:
            reasons = yield self._errors(errored)
            for job_id in errored:
                if job_id in reasons:
                    statuses[job_id].detail = f"state {statuses[job_id].state}: {reasons[job_id]}"
            # An Eqw job would wait for ever; it is decided, so delete it.
            argv = self.cancel_argv(errored)
            try:
                yield self._run(argv)
            except CommandError as e:
                self.log.warn("Cannot delete jobs in error state {ids}: {error}", ids=errored, error=str(e))
        return statuses

    @defer.inlineCallbacks
    def _errors(self, ids):
        argv = [self.command("status"), "-j", ",".join(ids), "-xml"]
        try:
            out, err, code = yield self._run(argv)
            return parse_job_errors(out) if code == 0 else {}
        except (CommandError, ValueError) as e:
            self.log.warn("Cannot read why jobs {ids} are in error state: {error}", ids=ids, error=str(e))
            return {}

    @defer.inlineCallbacks
    def _qacct(self, what):
        argv = [self.command("accounting"), "-j", what]
        out, err, code = yield self._run(argv)
        if code != 0:
            if "not found" in err.lower():
                return []
            raise CommandError.from_exit(argv, code, err)
        return parse_qacct(out)

    @defer.inlineCallbacks
    def query_finished(self, ids):
        found = {}
        for job_id in ids:
            job = self.jobs.get(job_id)
            if job is not None and jobscript.read_exit_code(job.request.directory) is not None:
                continue  # the exit-code file decides; no need to scan accounting
            records = yield self._qacct(job_id)
            if records:
                limit = job.request.time_limit if job is not None else None
                found[job_id] = qacct_status(records[-1], limit)
        return found

    @defer.inlineCallbacks
    def find_by_name(self, request):
        name = self.job_name(request)
        jobs = yield self._list()
        found = [sge_status(job_id, state, job_name) for job_id, (state, job_name, owner) in jobs.items()
                 if job_name == name]
        if found:
            return found
        try:
            records = yield self._qacct(name)
        except CommandError as e:
            self.log.info("Task {task_id}: no accounting to search ({error})", task_id=request.task_id, error=str(e))
            return []
        return [qacct_status(r, request.time_limit) for r in records if r.get("jobname") == name]

    def cancel_argv(self, ids):
        return [self.command("cancel")] + list(ids)

    def cancel_says_gone(self, out, err, code):
        text = (out + err).lower()
        return "does not exist" in text or "already" in text

    @defer.inlineCallbacks
    def query_resources(self):
        argv = [self.command("status"), "-g", "c"]
        out, err, code = yield self._run(argv)
        if code != 0:
            raise CommandError.from_exit(argv, code, err)
        queues = parse_cluster_queues(out)
        if self.queue:
            chosen = [q for q in queues if q["queue"] == self.queue]
            if not chosen:
                raise ValueError(f"qstat -g c does not list queue {self.queue}")
            return chosen[0]
        return {"queues": queues}
