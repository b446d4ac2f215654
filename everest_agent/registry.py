"""
The durable task registry: what the agent knows about each task.

One journal, C{tasks.jsonl} in C{state_dir}, of records that each update one
task: the first holds the spec, later ones the fields that changed (state,
job id, result, the C{seq} of its terminal report...).  Loading merges them;
compaction rewrites one record per task (finished ones without their spec).
Writes share fsyncs with everything else written in the same reactor turn.

Bounded memory (L{small_record}, L{TaskRegistry.update}): a finished task
keeps a small record (its state, final report and job id: what a repeated
C{TASK_SUBMIT} and the outbox need), never its spec; an unfinished task's
inline input data is dropped from memory once it is staged in (a restart
from C{staged} on never stages again).  What was dropped still sits in the
journal's first record of the task, so its size is counted, and the journal
is compacted once the dropped bytes exceed both L{TaskRegistry.compact_bytes}
and what is still live: the file stays within about twice the live size.
"""

import os

from everest_agent.journal import Journal


def merge_records(journal_records):
    """
    Task id -> merged record, from the journal's records in order.  An
    update for a task whose first record was lost is ignored: the task
    cannot be run without its spec.
    """
    records = {}
    for record in journal_records:
        task_id = record.get("id")
        if not isinstance(task_id, str):
            continue
        if record.get("forget"):
            records.pop(task_id, None)
        elif task_id in records:
            records[task_id].update(record)
        elif "spec" in record:
            records[task_id] = record
    return records


#: What a finished task's record keeps (besides ``spec``, set to None).
SMALL_RECORD_KEYS = frozenset({
    "id", "state", "state_seq", "info", "finished", "finished_at", "terminal_seq", "created", "job",
    "dir_removed", "owner", "staged_out", "leftover",
})


def small_record(record):
    """Shrink a finished task's C{record} in place to L{SMALL_RECORD_KEYS}."""
    for key in [k for k in record if k not in SMALL_RECORD_KEYS]:
        del record[key]
    record["spec"] = None
    return record


def _strings(value):
    """The total length of the strings in C{value} (a list or dict), whatever their types."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _strings(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_strings(v) for v in value)
    return 8


def spec_weight(spec):
    """About how many bytes C{spec} takes in the journal (what it is made of, escapes aside)."""
    if not isinstance(spec, dict):
        return 0
    # (Empty parts are common, a burst of 100,000 tasks is made of them:
    # counted without walking them.)
    return sum(len(k) + (_strings(v) if v else 8) for k, v in spec.items())


def _drop_inline_data(spec):
    """Empty the inline data of a staged task's inputs; @return: about how many bytes went."""
    dropped = 0
    inputs = spec.get("inputs") if isinstance(spec, dict) else None
    for item in inputs if isinstance(inputs, list) else ():
        data = item.get("data") if isinstance(item, dict) else None
        if isinstance(data, str) and data:
            dropped += len(data)
            item["data"] = ""  # (still a valid spec: nothing stages it again)
    return dropped


class TaskRegistry:
    compact_slack = 10000
    #: Bytes of dropped specs and inline data in the journal that make it compact.
    compact_bytes = 64 << 20

    def __init__(self, state_dir, reactor, fsync=True, group=None, files=None):
        """
        @param files: an L{everest_agent.fsio.IFileIO}: compaction while
            the agent runs goes through it, off the reactor thread.
        """
        self._journal = Journal(os.path.join(state_dir, "tasks.jsonl"), reactor, fsync, files)
        if group is not None:
            group.add(self._journal)
        self.records = {}  # task id -> merged record
        self.live_bytes = 0  # about how much the unfinished specs in memory weigh
        self.dead_bytes = 0  # about how much of the journal is specs no longer kept

    def load(self):
        self.records = merge_records(self._journal.load())
        for record in self.records.values():
            if record.get("finished"):
                small_record(record)
            elif record.get("phase", "new") != "new":
                _drop_inline_data(record.get("spec"))
        self.compact()
        return self.records

    def __contains__(self, task_id):
        return task_id in self.records

    def get(self, task_id):
        return self.records.get(task_id)

    def create(self, task_id, spec, **fields):
        """Record a new task. @return: a Deferred firing once it is on disk."""
        record = dict(fields, id=task_id, spec=spec)
        self.records[task_id] = record
        self.live_bytes += spec_weight(spec)
        return self._journal.append(record)

    def update(self, task_id, **fields):
        """Change some fields of a task. @return: a Deferred firing once on disk."""
        record = self.records[task_id]
        record.update(fields)
        fields["id"] = task_id
        d = self._journal.append(fields)
        if fields.get("finished"):
            weight = spec_weight(record.get("spec"))
            small_record(record)
            self._dropped(weight)
        elif fields.get("phase") == "staged":
            self._dropped(_drop_inline_data(record.get("spec")))
        return d

    def _dropped(self, weight):
        self.live_bytes = max(0, self.live_bytes - weight)
        self.dead_bytes += weight
        if self.dead_bytes > self.compact_bytes and self.dead_bytes > self.live_bytes:
            self._journal.compact_soon(self._snapshot)

    def write_ahead(self):
        """Put what is queued in the file now (with its commit group), fsync later."""
        self._journal.write_ahead()

    def forget(self, task_id):
        if self.records.pop(task_id, None) is not None:
            self._journal.append_nowait({"id": task_id, "forget": True})
            self._maybe_compact()

    def _maybe_compact(self):
        if self._journal.lines > len(self.records) * 2 + self.compact_slack:
            self._journal.compact_soon(self._snapshot)

    def _snapshot(self):
        for record in self.records.values():
            if record.get("finished"):
                small_record(record)  # a finished task is never run again
        self.dead_bytes = 0
        self.live_bytes = sum(spec_weight(r.get("spec")) for r in self.records.values())
        return list(self.records.values())

    def compact(self):
        self._journal.compact(self._snapshot())

    def stop(self):
        """@return: a Deferred firing once everything is on disk and the file closed."""
        return self._journal.stop()
