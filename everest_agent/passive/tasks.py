"""
The agent's side of passive sessions: L{PassiveTasks} implements
L{IPassiveTasks} over the L{TaskManager}, and routes the reports of the
tasks clients own to their sessions.

Ownership: a passive task's registry record holds C{owner}, a digest of the
client's whole credential (never the token).  Its reports go to that
credential's live sessions only, never to the platform; the platform's
tasks are never shown to a client.

Durability: a passive report is not kept in the outbox.  The task's
registry record (durable, rotated by C{keep_finished} like every finished
task) holds its latest state, its seq and its C{STAGED_OUT}; a client that
(re)connects is sent, from the records, the state of each of its tasks not
covered by its C{ACK}.  A client that never acknowledges costs one record
per task, no more.  The seq of passive messages comes from L{SeqCounter},
whose high-water mark is on disk before a seq above it is handed out, so
seq never goes back across restarts.
"""

import collections
import os
import time

from twisted.logger import Logger
from zope.interface import implementer

from everest_agent import protocol
from everest_agent.passive.server import IPassiveTasks
from everest_agent.protocol import ProtocolError

log = Logger(namespace="everest_agent.passive.tasks")

#: Error code of a TASK_SUBMIT beyond the credential's cap of unfinished tasks.
E_TOO_MANY = "too-many-tasks"
#: Error code of a TASK_SUBMIT whose id another owner (or the platform) uses.
E_ID_TAKEN = "task-id-taken"
#: Credentials whose ACK is remembered (the most recent ones): labels are
#: free, so their number is bounded; a forgotten one is sent its states
#: again on reconnecting (at least once, never fewer).
MAX_ACKED_OWNERS = 100_000


class SeqCounter:
    """
    Sequence numbers that never repeat across restarts: the file C{path}
    holds a mark above every seq handed out, raised C{block} at a time
    (written and fsynced before a seq above the old mark is used).  The
    file is in the state directory, the agent's own, and is written once
    every C{block} messages.
    """

    def __init__(self, path, block=4096):
        self.path = path
        self.block = block
        self.last = 0
        self._mark = 0

    def load(self):
        try:
            with open(self.path, encoding="ascii") as f:
                self._mark = int(f.read().strip() or 0)
        except FileNotFoundError:
            self._mark = 0
        except ValueError:
            raise ValueError(f"{self.path}: damaged; it must hold one number") from None
        self.last = self._mark
        self._raise()

    def next(self):
        self.last += 1
        if self.last >= self._mark:
            self._raise()
        return self.last

    def _raise(self):
        mark = self.last + self.block
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{mark}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._mark = mark


@implementer(IPassiveTasks)
class PassiveTasks:
    """
    @param manager: the agent's L{TaskManager}; its C{passive} is set to
        this object, which it asks to route owned tasks' reports.
    @param max_unfinished: unfinished tasks a credential may have at once.
    """

    def __init__(self, manager, state_dir, max_unfinished=1000, wallclock=time.time, max_total=10000):
        self.manager = manager
        self.max_total = max_total
        self.total = 0  # unfinished passive tasks of every owner
        self.registry = manager.registry
        self.max_unfinished = max_unfinished
        self.wallclock = wallclock
        self.seq = SeqCounter(os.path.join(state_dir, "passive-seq"))
        self.sessions = collections.defaultdict(set)  # owner -> live sessions
        self.acked = collections.OrderedDict()  # owner -> highest seq it acknowledged (this run)
        self.unfinished = collections.defaultdict(set)  # owner -> its unfinished task ids
        self.sent = 0
        manager.passive = self

    def load(self):
        """After the registry is loaded: the seq mark, and who owns what is unfinished."""
        self.seq.load()
        for task_id, record in self.registry.records.items():
            owner = record.get("owner")
            if owner is not None and not record.get("finished"):
                self.unfinished[owner].add(task_id)
                self.total += 1

    # -- routing (what the manager asks) -----------------------------------------

    def owner_of(self, task_id):
        record = self.registry.get(task_id)
        return None if record is None else record.get("owner")

    def report(self, task_id, state, info):
        """
        A state of an owned task: C{(seq, d)} like the sender's, C{d} firing
        with C{seq} once the task's record holds it; then it is sent to the
        owner's live sessions.
        """
        owner = self.owner_of(task_id)
        seq = self.seq.next()
        now = self.wallclock()
        message = [protocol.TASK_STATE, task_id, state, dict(info or (), seq=seq, time=now)]
        fields = {"state_time": now}
        if state == protocol.STAGED_OUT:
            fields["staged_out"] = {"seq": seq, "time": now, "info": dict(info or ())}
        if state in protocol.TERMINAL:
            self._finished(owner, task_id)
        d = self.registry.update(task_id, **fields)

        def durable(_):
            self._send_to(owner, message)
            return seq

        return seq, d.addCallback(durable)

    def _finished(self, owner, task_id):
        unfinished = self.unfinished.get(owner)
        if unfinished is not None and task_id in unfinished:
            unfinished.discard(task_id)
            self.total -= 1
            if not unfinished:
                del self.unfinished[owner]

    def task_message(self, task_id, text):
        """A task's message (task channel) for its owner's sessions; not kept."""
        owner = self.owner_of(task_id)
        self._send_to(owner, [protocol.TASK_MESSAGE, task_id, text, {"seq": self.seq.next()}])

    def _send_to(self, owner, message):
        for session in list(self.sessions.get(owner, ())):
            self.sent += 1
            session.send(message)

    # -- IPassiveTasks --------------------------------------------------------------

    def session_opened(self, client, session):
        self.sessions[client.owner].add(session)
        acked = self.acked.get(client.owner, 0)
        for message in self._current(client.owner):
            if message[3]["seq"] > acked:
                session.send(message)

    def _current(self, owner):
        """What a session of C{owner} is told on connecting, in seq order."""
        messages = []
        for task_id, record in self.registry.records.items():
            if record.get("owner") != owner or record.get("state") is None:
                continue
            staged = record.get("staged_out")
            if staged and record.get("state") != protocol.STAGED_OUT:
                messages.append([protocol.TASK_STATE, task_id, protocol.STAGED_OUT,
                                 dict(staged["info"], seq=staged["seq"], time=staged["time"])])
            info = dict(record.get("info") or ())
            info.update(seq=record.get("state_seq") or 0, time=record.get("state_time"))
            messages.append([protocol.TASK_STATE, task_id, record["state"], info])
        messages.sort(key=lambda m: m[3]["seq"])
        return messages

    def session_closed(self, client, session):
        live = self.sessions.get(client.owner)
        if live is not None:
            live.discard(session)
            if not live:
                del self.sessions[client.owner]

    def submit(self, client, task_id, spec, context):
        record = self.registry.get(task_id)
        if record is not None:
            if record.get("owner") != client.owner:
                raise ProtocolError(E_ID_TAKEN, f"task id {task_id} is in use on this agent; choose another",
                                    task_id)
            for message in self._current(client.owner):
                if message[1] == task_id:
                    self._send_to(client.owner, message)
            return
        unfinished = self.unfinished.get(client.owner, ())
        if self.total >= self.max_total:
            log.warn("Client {client} refused task {task_id}: {count} unfinished passive tasks in all",
                     client=client.label, task_id=task_id, count=self.total)
            raise ProtocolError(
                E_TOO_MANY,
                f"this agent has {self.total} unfinished tasks of its clients, the most it allows; "
                "wait for some to finish", task_id)
        if len(unfinished) >= self.max_unfinished:
            log.warn("Client {client} refused task {task_id}: {count} unfinished tasks already",
                     client=client.label, task_id=task_id, count=len(unfinished))
            raise ProtocolError(
                E_TOO_MANY,
                f"this client has {len(unfinished)} unfinished tasks, the most this agent allows; "
                "wait for some to finish", task_id)
        self.unfinished[client.owner].add(task_id)
        self.total += 1
        log.debug("Client {client} submitted task {task_id}", client=client.label, task_id=task_id)
        self.manager.submit(task_id, spec, context, owner=client.owner)

    def _own(self, client, task_id, what):
        if self.owner_of(task_id) != client.owner:
            # The same answer as for a task that does not exist.
            raise ProtocolError(protocol.E_UNKNOWN_TASK, f"{what} of unknown task {task_id}", task_id)

    def cancel(self, client, task_id):
        self._own(client, task_id, "cancel")
        self.manager.cancel(task_id, owner=client.owner)

    def deliver(self, client, task_id, text):
        self._own(client, task_id, "message")
        self.manager.deliver(task_id, text, owner=client.owner)

    def ack(self, client, seq):
        acked = self.acked
        if seq > acked.get(client.owner, 0):
            acked[client.owner] = min(seq, self.seq.last)
        if client.owner in acked:
            acked.move_to_end(client.owner)
        while len(acked) > MAX_ACKED_OWNERS:
            acked.popitem(last=False)

    def lookup(self, task_id):
        owner = self.owner_of(task_id)
        if owner is None:
            return None  # the platform's tasks are not served here
        return owner, self.manager.task_dir(task_id)
