"""
Passive mode's tasks: L{IPassiveTasks} for the agent (contract, section 9).

A client's tasks are the agent's usual tasks (same manager, worker,
registry records, staging, handlers), recorded with an C{owner}: a digest of
the client's credential, never its token.  What differs is where their
reports go: L{PassiveTasks.report} (called by the manager for an owned
task) sends a C{TASK_STATE} to the live sessions of that credential, once
the task's record holding that state is on disk.  There is no outbox: the
record is the only copy, the latest state per task, so a client that never
sends C{ACK} costs nothing more, and finished records rotate with
C{keep_finished} like every task's.  A session that opens gets the current
state of each of its credential's tasks (those an C{ACK} does not cover).

Sequence numbers come from one counter for every passive client, reserved
on disk (C{passive-seq} in C{state_dir}) a block ahead, so no C{seq} is
used twice, across restarts and C{kill -9} included.
"""

import collections
import os

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from everest_agent import protocol, tlsfiles
from everest_agent.passive.server import IPassiveTasks, passive_site

log = Logger(namespace="everest_agent.passive.tasks")

#: seqs reserved on disk at a time.
SEQ_BLOCK = 100000

E_TOO_MANY = "too-many-tasks"


class SeqCounter:
    """
    A durable counter: C{next()} never returns a number twice, even across
    a crash, since the file records a high-water mark before it is reached.
    The file is the agent's own (in C{state_dir}); it is written at start,
    then once every C{block} numbers (half a block ahead, through C{run}).
    """

    def __init__(self, path, run=None, block=SEQ_BLOCK):
        self._path, self._run, self._block = path, run, block
        self.last = 0
        self._reserved = 0
        self._reserving = False

    def load(self):
        try:
            with open(self._path, encoding="ascii") as f:
                self.last = int(f.read().strip() or 0)
        except FileNotFoundError:
            self.last = 0
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{self._path}: cannot read passive mode's sequence counter: {e}") from None
        self._write(self.last + self._block)

    def _write(self, mark):
        tmp = self._path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(mark).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        self._reserved = max(self._reserved, mark)

    def next(self):
        self.last += 1
        if self.last > self._reserved:
            self._write(self.last + self._block)  # the write ahead fell behind: now, here
        elif self.last > self._reserved - self._block // 2 and not self._reserving and self._run is not None:
            self._reserving = True
            d = self._run(self._write, self._reserved + self._block)

            def done(result):
                self._reserving = False
                return result

            d.addBoth(done).addErrback(lambda f: log.failure("Reserving passive seqs failed", f))
        return self.last


@implementer(IPassiveTasks)
class PassiveTasks:
    """
    @param manager: the L{everest_agent.manager.TaskManager}; this object
        becomes its C{passive}.
    @param max_client_tasks: unfinished tasks one credential may have.
    @param max_tasks: unfinished passive tasks of all clients together.
    """

    def __init__(self, manager, seq, wallclock, max_client_tasks=1000, max_tasks=10000):
        self.manager = manager
        self.registry = manager.registry
        self.seq = seq
        self.wallclock = wallclock
        self.max_client_tasks = max_client_tasks
        self.max_tasks = max_tasks
        self.sessions = collections.defaultdict(set)  # owner -> live sessions
        self.acked = {}  # owner -> highest seq it acknowledged (this run)
        self.unfinished = collections.defaultdict(set)  # owner -> unfinished task ids
        self.unfinished_total = 0
        manager.passive = self

    def load(self):
        """After the registry is loaded: the unfinished tasks of each owner."""
        self.seq.load()
        for task_id, record in self.registry.records.items():
            owner = record.get("owner")
            if owner is not None and not record.get("finished"):
                self._unfinished_add(owner, task_id)

    def _unfinished_add(self, owner, task_id):
        tasks = self.unfinished[owner]
        if task_id not in tasks:
            tasks.add(task_id)
            self.unfinished_total += 1

    def _unfinished_discard(self, owner, task_id):
        tasks = self.unfinished.get(owner)
        if tasks is not None and task_id in tasks:
            tasks.discard(task_id)
            self.unfinished_total -= 1
            if not tasks:
                del self.unfinished[owner]

    # -- reports (the manager calls these for owned tasks) -----------------------

    def report(self, owner, task_id, state, info):
        """
        A state of an owned task.  @return: C{(seq, d)}: d fires with C{seq}
        once the record written with it is durable, and then the state goes
        to the owner's live sessions.
        """
        seq = self.seq.next()
        fields = dict(info or ())
        fields["seq"] = seq
        fields["time"] = self.wallclock()
        message = [protocol.TASK_STATE, task_id, state, fields]
        if state in protocol.TERMINAL:
            self._unfinished_discard(owner, task_id)
        # The worker writes the record with this state right after this call,
        # in this reactor turn, so this update's durability covers it too.
        d = self.registry.update(task_id, state_seq=seq)

        def durable(_):
            self._send(owner, message)
            return seq

        return seq, d.addCallback(durable)

    def task_message(self, owner, task_id, text):
        """A message from an owned task's channel: to its owner's live sessions (not kept)."""
        self._send(owner, [protocol.TASK_MESSAGE, task_id, text, {"seq": self.seq.next()}])
        return defer.succeed(None)

    def resend(self, task_id, record):
        """A TASK_SUBMIT again of a task its owner already has: its current state."""
        for message in self._current(task_id, record):
            self._send(record["owner"], message)

    def _current(self, task_id, record, acked=0):
        """
        The messages that tell a task's current state: the state itself and,
        for a finished task that staged out, its C{STAGED_OUT} first (its
        C{outputData} is what a client needs to fetch the outputs, and the
        terminal state does not repeat it).  Those an ACK covers are left out.
        """
        state = record.get("state")
        if state is None:
            return []  # its ACCEPTED is on the way
        messages = []
        staged = record.get("staged_out")
        if state in protocol.TERMINAL and isinstance(staged, dict) and staged.get("seq", 0) > acked:
            fields = {"outputData": staged.get("outputData") or [], "seq": staged["seq"]}
            messages.append([protocol.TASK_STATE, task_id, protocol.STAGED_OUT, fields])
        seq = record.get("state_seq")
        if not (isinstance(seq, int) and seq <= acked):
            fields = dict(record.get("info") or ())
            fields["seq"] = seq
            messages.append([protocol.TASK_STATE, task_id, state, fields])
        return messages

    def _send(self, owner, message):
        for session in list(self.sessions.get(owner, ())):
            session.send(message)

    # -- IPassiveTasks -----------------------------------------------------------

    def session_opened(self, client, session):
        self.sessions[client.owner].add(session)
        acked = self.acked.get(client.owner, 0)
        count = 0
        for task_id, record in list(self.registry.records.items()):
            if record.get("owner") != client.owner:
                continue
            messages = self._current(task_id, record, acked)
            for message in messages:
                session.send(message)
            count += bool(messages)
        if count:
            log.info("Passive client {client}: sent the current state of {count} tasks",
                     client=client.label, count=count)

    def session_closed(self, client, session):
        sessions = self.sessions.get(client.owner)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.sessions[client.owner]
                if client.owner not in self.unfinished:
                    self.acked.pop(client.owner, None)

    def submit(self, client, task_id, spec, context):
        owner = client.owner
        record = self.registry.get(task_id)
        if record is None:
            if len(self.unfinished.get(owner, ())) >= self.max_client_tasks:
                raise protocol.ProtocolError(
                    E_TOO_MANY,
                    f"this client has {self.max_client_tasks} unfinished tasks, the most allowed "
                    "([passive] max_client_tasks); submit again once some have finished", task_id)
            if self.unfinished_total >= self.max_tasks:
                raise protocol.ProtocolError(
                    E_TOO_MANY,
                    f"the agent has {self.max_tasks} unfinished passive-mode tasks, the most allowed "
                    "([passive] max_tasks); submit again later", task_id)
        self.manager.submit(task_id, spec, context, owner=owner)
        if record is None and task_id in self.registry:
            self._unfinished_add(owner, task_id)
            log.info("Passive client {client} submitted task {task_id}", client=client.label, task_id=task_id)

    def cancel(self, client, task_id):
        self.manager.cancel(task_id, owner=client.owner)

    def deliver(self, client, task_id, text):
        self.manager.deliver(task_id, text, owner=client.owner)

    def ack(self, client, seq):
        if seq > self.acked.get(client.owner, 0):
            self.acked[client.owner] = seq

    def lookup(self, task_id):
        record = self.registry.get(task_id)
        if record is None or record.get("owner") is None:
            return None
        return record["owner"], self.manager.task_dir(task_id)

    def close_sessions(self):
        for sessions in list(self.sessions.values()):
            for session in list(sessions):
                session.dropConnection(abort=True)  # (a close handshake would outlive the agent)


class NoPassiveClients:
    """
    The manager's C{passive} while passive mode is off: tasks a client
    submitted when it was on still run and are recorded, and are told to no
    one (certainly not to the platform).
    """

    def report(self, owner, task_id, state, info):
        return None, defer.succeed(None)

    def resend(self, task_id, record):
        pass


class PassiveListener(Service):
    """
    The passive-mode listener as a service: one TCP (or TLS) port with the
    site of L{everest_agent.passive.server.passive_site}.
    """

    def __init__(self, tasks, tokens, reactor, listen, pool, tls_cert="", tls_key=""):
        self.tasks, self.tokens, self.reactor = tasks, tokens, reactor
        self.listen, self.pool = listen, pool
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.port = None
        self.site = None

    @property
    def scheme(self):
        return "https" if self.tls_cert else "http"

    @property
    def address(self):
        """C{(host, port)} listened on (the real port once started)."""
        if self.port is None:
            return self.listen
        return self.listen[0], self.port.getHost().port

    def startService(self):
        super().startService()
        self.pool.start()
        self.site = passive_site(self.tasks, self.tokens, self.reactor, self.pool)
        host, port = self.listen
        if self.tls_cert:
            # (The chain after the certificate goes to clients too.)
            options = tlsfiles.server_options(self.tls_cert, self.tls_key)
            self.port = self.reactor.listenSSL(port, self.site, options, interface=host)
        else:
            self.port = self.reactor.listenTCP(port, self.site, interface=host)
        log.info("Passive mode listening on {scheme}://{host}:{port} (WebSocket /agent/ws, files /files/)",
                 scheme=self.scheme, host=host, port=self.address[1])

    async def _stop(self):
        self.tasks.close_sessions()
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        self.pool.stop()

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())
