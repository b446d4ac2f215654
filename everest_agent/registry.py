"""
The durable task registry: what the agent knows about each task.

One journal, C{tasks.jsonl} in C{state_dir}, of records that each update one
task: the first holds the spec, later ones the fields that changed (state,
job id, result, the C{seq} of its terminal report...).  Loading merges them;
compaction rewrites one record per task (finished ones without their spec).
Writes share fsyncs with everything else written in the same reactor turn.
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


class TaskRegistry:
    compact_slack = 10000

    def __init__(self, state_dir, reactor, fsync=True, group=None, files=None):
        """
        @param files: an L{everest_agent.fsio.IFileIO}: compaction while
            the agent runs goes through it, off the reactor thread.
        """
        self._journal = Journal(os.path.join(state_dir, "tasks.jsonl"), reactor, fsync, files)
        if group is not None:
            group.add(self._journal)
        self.records = {}  # task id -> merged record

    def load(self):
        self.records = merge_records(self._journal.load())
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
        return self._journal.append(record)

    def update(self, task_id, **fields):
        """Change some fields of a task. @return: a Deferred firing once on disk."""
        self.records[task_id].update(fields)
        fields["id"] = task_id
        return self._journal.append(fields)

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
                record["spec"] = None  # a finished task is never run again
        return list(self.records.values())

    def compact(self):
        self._journal.compact(self._snapshot())

    def stop(self):
        """@return: a Deferred firing once everything is on disk and the file closed."""
        return self._journal.stop()
