"""
Reading the state directory: the one place that knows what its journals'
records mean.

The agent's outbox and task registry load through these functions, and so
do C{everest-agent status}, C{everest-agent check} and the fault tests,
which read a state directory from outside without changing it (no
compaction, no lock).
"""

import os

from everest_agent.journal import Journal
from everest_agent.registry import merge_records

OUTBOX_FILE = "outbox.jsonl"
TASKS_FILE = "tasks.jsonl"


def read_journal(path):
    """Every complete record of a journal, in order (damaged lines skipped)."""
    return Journal(path, None).load()


def replay_outbox(records):
    """
    What an outbox journal's records say.

    @return: C{(pending, last_seq, acked)}: C{pending} is a list of the
        unacknowledged C{(seq, message)} in seq order; C{last_seq} the
        highest seq ever given out; C{acked} the highest acknowledged.
    """
    pending, last_seq, acked = {}, 0, 0
    for record in records:
        if isinstance(record.get("seq"), int):
            pending[record["seq"]] = record.get("msg")
            last_seq = max(last_seq, record["seq"])
        elif isinstance(record.get("ack"), int):
            acked = max(acked, record["ack"])
        elif isinstance(record.get("next"), int):
            last_seq = max(last_seq, record["next"] - 1)
    items = [(seq, msg) for seq, msg in sorted(pending.items()) if seq > acked]
    return items, max(last_seq, acked), acked


def read_outbox(state_dir):
    """L{replay_outbox} of C{state_dir}'s outbox, read without compacting."""
    return replay_outbox(read_journal(os.path.join(state_dir, OUTBOX_FILE)))


def read_registry(state_dir):
    """Task id -> merged record (L{merge_records}) of C{state_dir}'s registry."""
    return merge_records(read_journal(os.path.join(state_dir, TASKS_FILE)))
