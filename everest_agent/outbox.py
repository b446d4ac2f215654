"""
The durable outbox of reliable messages.

Each reliable message gets the next sequence number and is appended to the
journal C{outbox.jsonl} in C{state_dir}; it is handed out for sending only
once that append is on disk (see L{everest_agent.journal} for how writes of
one reactor turn share one fsync).  An C{ACK} from the platform appends an
ack record and drops every message it covers from memory.  When the file
holds many more records than are still pending it is compacted: rewritten
as one C{next} record (so C{seq} keeps growing across restarts, even with
nothing pending), one C{ack} record (what the platform has), plus the
pending messages.

Records: C{{"seq": n, "msg": [...]}}, C{{"ack": n}}, C{{"next": n}}.
"""

import os
from collections import OrderedDict

from everest_agent.journal import Journal
from everest_agent.statedir import replay_outbox


class Outbox:
    #: Compact when the journal has this many more records than pending messages.
    compact_slack = 10000

    def __init__(self, state_dir, reactor, fsync=True, group=None, files=None):
        """
        @param files: an L{everest_agent.fsio.IFileIO}: compaction while
            the agent runs goes through it, off the reactor thread.
        """
        self._journal = Journal(os.path.join(state_dir, "outbox.jsonl"), reactor, fsync, files)
        if group is not None:
            group.add(self._journal)
        self._pending = OrderedDict()  # seq -> message, durable or not
        self.last_seq = 0  # highest seq ever given out
        self.acked = 0  # highest seq the platform acknowledged
        self.durable_seq = 0  # every message with seq <= this is on disk

    def load(self):
        """Read the journal back after a (re)start, then compact it."""
        pending, last_seq, acked = replay_outbox(self._journal.load())
        self._pending = OrderedDict(pending)
        self.last_seq = max(self.last_seq, last_seq)
        self.acked = max(self.acked, acked)
        self.durable_seq = self.last_seq
        self._compact()

    def put(self, build):
        """
        Give the next C{seq} to a message and queue it for disk.

        @param build: a callable taking C{seq} and returning the message.
        @return: C{(seq, message, durable)}, where C{durable} is a Deferred
            that fires once the message is on disk.
        """
        self.last_seq += 1
        seq = self.last_seq
        message = build(seq)
        self._pending[seq] = message
        d = self._journal.append({"seq": seq, "msg": message})

        def on_disk(_):
            self.durable_seq = max(self.durable_seq, seq)
            return seq

        return seq, message, d.addCallback(on_disk)

    def ack(self, seq):
        """
        The platform has every message with C{seq <=} this.

        @return: True if this acknowledged something new.
        """
        if seq <= self.acked:
            return False
        seq = min(seq, self.last_seq)
        if seq <= self.acked:
            return False
        self.acked = seq
        pending = self._pending
        while pending:
            first = next(iter(pending))
            if first > seq:
                break
            del pending[first]
        self._journal.append_nowait({"ack": seq})
        if self._journal.lines > len(pending) + self.compact_slack:
            self._journal.compact_soon(self._records)
        return True

    def durable_pending(self):
        """The unacknowledged messages already on disk, in seq order."""
        durable = self.durable_seq
        return [msg for seq, msg in self._pending.items() if seq <= durable]

    def __len__(self):
        return len(self._pending)

    def oldest(self):
        """C{(seq, message)} of the oldest unacknowledged message, or None."""
        for item in self._pending.items():
            return item
        return None

    def _records(self):
        """What a compacted journal holds."""
        records = [{"next": self.last_seq + 1}, {"ack": self.acked}]
        records.extend({"seq": s, "msg": m} for s, m in self._pending.items())
        return records

    def _compact(self):
        self._journal.compact(self._records())

    def stop(self):
        """@return: a Deferred firing once everything is on disk and the file closed."""
        return self._journal.stop()
