"""
The reference platform's state machine: agents, sessions and tasks.

Nothing here knows about WebSocket or HTTP.  A transport (L{everest_agent.platform.ws})
hands each open connection to L{Platform.connection_made} and feeds the
L{Session} it gets back with the payloads of text frames; the session talks
back through the small connection interface described in L{Session}.

All timers go through the reactor given to L{Platform}, so tests can drive
the logic with a L{twisted.internet.task.Clock}.
"""

import collections
import hmac
import itertools
import json
import os
import secrets
import tempfile

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from everest_agent import dialect
from everest_agent import protocol as P

log = Logger(namespace="everest_agent.platform")

#: Reason of a task that the platform marks C{FAILED} because its agent no
#: longer knows it.
LOST_REASON = "lost by the agent"
CANCELED_UNSENT_REASON = "canceled before it was sent to the agent"
CANCELED_UNKNOWN_REASON = "canceled; the agent never accepted it"

#: Close code for a binary frame (RFC 6455: unsupported data).
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_GOING_AWAY = 1001

#: Name of the directory inside the file store that holds uploads in flight.
INCOMING = ".incoming"

STATE_FILE_VERSION = 1

_state_dumps = json.JSONEncoder(separators=(",", ":")).encode


API_TOKEN_FILE = "api-token"


def write_api_token(directory, token):
    """
    Write C{token} to C{directory/api-token}, mode 0600, replacing any
    earlier one atomically; return its path.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, API_TOKEN_FILE)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".api-token-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


class StateNotReached(Exception):
    """
    A task reached a terminal state without reaching the state that was
    waited for.

    @ivar task: the L{Task}.
    """

    def __init__(self, task, wanted):
        super().__init__(
            f"task {task.task_id} ended {task.state} ({(task.info or {}).get('reason')}) "
            f"without reaching {wanted}"
        )
        self.task = task
        self.wanted = wanted


class NotConnected(Exception):
    """
    The agent has no session.
    """


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def reliable_seq(message):
    """
    The sequence number of a reliable agent -> platform message, C{None} if
    the message is not reliable, or raise L{P.ProtocolError} if it should be
    and has no valid one.
    """
    kind = message[0]
    if kind not in (P.TASK_STATE, P.TASK_MESSAGE):
        return None
    holder = message[-1] if len(message) == 4 else None
    seq = holder.get("seq") if isinstance(holder, dict) else None
    if not _is_int(seq) or seq < 1:
        raise P.ProtocolError(P.E_INVALID, f"{kind} needs a positive integer 'seq' in its last item")
    return seq


def parse_agent_message(message):
    """
    Check the shape of a decoded agent -> platform message (other than
    C{HELLO}).

    @return: C{(type, args)}: C{TASK_STATE}: C{(taskId, state, info)};
        C{TASK_MESSAGE}: C{(taskId, text, seq)}; C{RESOURCE_STATE} and
        C{ERROR}: C{(info,)}.
    @raise P.ProtocolError: if the type is unknown or the items are wrong.
    """
    kind = message[0]
    if kind == P.TASK_STATE:
        P._check_arity(message, 4)
        task_id = P.check_task_id(message)
        state, info = message[2], message[3]
        if state not in P.STATES:
            raise P.ProtocolError(P.E_INVALID, f"unknown task state {str(state)[:32]!r}", task_id)
        if not isinstance(info, dict):
            raise P.ProtocolError(P.E_INVALID, "TASK_STATE needs an info object", task_id)
        return kind, (task_id, state, info)
    if kind == P.TASK_MESSAGE:
        P._check_arity(message, 4)
        task_id = P.check_task_id(message)
        if not isinstance(message[2], str):
            raise P.ProtocolError(P.E_INVALID, "TASK_MESSAGE needs a text", task_id)
        return kind, (task_id, message[2], reliable_seq(message))
    if kind in (P.RESOURCE_STATE, P.ERROR):
        P._check_arity(message, 2)
        if not isinstance(message[1], dict):
            raise P.ProtocolError(P.E_INVALID, f"{kind} needs an object")
        return kind, (message[1],)
    raise P.ProtocolError(P.E_UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}")


def _staged_out_problem(task, info):
    """What is wrong with a C{STAGED_OUT} report of C{task} (section 8), if anything."""
    if task.spec is not None and not dialect.is_everest(task.spec):
        return "STAGED_OUT for a native task (only Everest-dialect tasks report it)"
    entries = info.get("outputData")
    if not isinstance(entries, list):
        return "STAGED_OUT needs info.outputData, a list"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            return f"STAGED_OUT outputData[{i}] needs a 'path'"
        if not _is_int(entry.get("size")) or entry["size"] < 0:
            return f"STAGED_OUT outputData[{i}] needs a 'size', a non-negative integer"
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            return f"STAGED_OUT outputData[{i}] needs a 'sha256' of 64 hex digits"
        if "uri" in entry and not isinstance(entry["uri"], str):
            return f"STAGED_OUT outputData[{i}]: 'uri' must be a string"
    return None


class Task:
    """
    The platform's record of one task.

    @ivar history: C{[(state, info), ...]} in the order applied.  Entries the
        platform made itself (a task lost by its agent, canceled before it
        was sent) have C{info["platform"] = True} and no C{seq}.
    @ivar messages: texts of the C{TASK_MESSAGE}s received from the task.
    @ivar submitted: a C{TASK_SUBMIT} for it went on the wire (in the current
        session or an earlier one).
    @ivar unknown: the agent reported a task the platform never submitted.
    @ivar context: the object sent after the spec in C{TASK_SUBMIT}
        (section 8), or C{None}; the platform keeps it with the task.
    @ivar output_data: the C{outputData} of the task's C{STAGED_OUT}
        (Everest-dialect tasks), or C{None} before one came.
    """

    def __init__(self, task_id, agent, spec, context=None):
        self.task_id = task_id
        self.agent = agent
        self.spec = spec
        self.context = context
        self.output_data = None
        self.state = None
        self.info = None
        self.history = []
        self.messages = []
        self.submitted = False
        self.cancel_requested = False
        self.submit_count = 0
        self.repeats = 0
        self.unknown = False
        self._waiters = []
        self._message_waiters = []

    def __repr__(self):
        return f"<Task {self.task_id} agent={self.agent} state={self.state}>"

    @property
    def terminal(self):
        return self.state in P.TERMINAL

    @property
    def states(self):
        return [state for state, _ in self.history]

    def summary(self):
        return {"taskId": self.task_id, "agent": self.agent, "state": self.state, "info": self.info}

    def as_dict(self):
        d = self.summary()
        d.update(
            spec=self.spec,
            history=[[state, info] for state, info in self.history],
            messages=list(self.messages),
            submitted=self.submitted,
            cancelRequested=self.cancel_requested,
            unknown=self.unknown,
            context=self.context,
            outputData=self.output_data,
        )
        return d

    def to_json(self):
        d = self.as_dict()
        d.update(submitCount=self.submit_count, repeats=self.repeats)
        return d

    _encoded = None  # (what it depends on, JSON bytes of to_json())

    def encoded(self):
        """
        L{to_json} as compact JSON bytes, encoded again only if the task
        changed since (its lists only grow), so a state file with thousands
        of finished tasks is cheap to write again and again.
        """
        key = (self.state, len(self.history), len(self.messages), self.submitted,
               self.cancel_requested, self.unknown, self.submit_count, self.repeats)
        cached = self._encoded
        if cached is None or cached[0] != key:
            cached = self._encoded = (key, _state_dumps(self.to_json()).encode("utf-8"))
        return cached[1]

    @classmethod
    def from_json(cls, d):
        task = cls(d["taskId"], d["agent"], d.get("spec"), d.get("context"))
        task.output_data = d.get("outputData")
        task.state = d.get("state")
        task.info = d.get("info")
        task.history = [tuple(entry) for entry in d.get("history", [])]
        task.messages = list(d.get("messages", []))
        task.submitted = bool(d.get("submitted"))
        task.cancel_requested = bool(d.get("cancelRequested"))
        task.unknown = bool(d.get("unknown"))
        task.submit_count = int(d.get("submitCount", 0))
        task.repeats = int(d.get("repeats", 0))
        return task


class Agent:
    """
    The platform's record of one agent (one name, one or more tokens).

    @ivar last_seq: the highest agent sequence number received.
    @ivar acked: the value last sent to the agent in C{WELCOME} or C{ACK}.
    @ivar session: the live, welcomed L{Session}, or C{None}.
    @ivar hello: the last C{HELLO} body, without its token.
    @ivar resource: the latest C{RESOURCE_STATE} body.
    @ivar errors: C{ERROR} bodies received, oldest first.
    @ivar pending_messages: C{(taskId, text)} to send after the next C{WELCOME}.
    """

    def __init__(self, name):
        self.name = name
        self.last_seq = 0
        self.acked = 0
        self.session = None
        self.hello = None
        self.resource = None
        self.resource_count = 0
        self.errors = []
        self.pending_messages = []
        self.duplicates = 0
        self.welcomes = 0
        self.ack_wanted = False
        self._ack_call = None
        self._connected_waiters = []
        self._disconnected_waiters = []

    def __repr__(self):
        return f"<Agent {self.name} last_seq={self.last_seq} connected={self.session is not None}>"

    def summary(self):
        return {
            "name": self.name,
            "connected": self.session is not None,
            "lastSeq": self.last_seq,
            "resource": self.resource,
        }


class Session:
    """
    One connection from an agent, from its opening to its loss.

    The connection object must provide C{platform_send(payload, binary)},
    C{platform_close(code, reason)} (any close code, 1008 included) and
    C{platform_abort()}; and call L{receive} and L{lost}.

    @ivar agent: the L{Agent} once a valid C{HELLO} came, else C{None}.
    @ivar welcomed: C{WELCOME} was sent.
    @ivar close_code: the code this side closed with, if it did.
    """

    def __init__(self, platform, connection, peer):
        self.platform = platform
        self.connection = connection
        self.peer = peer
        self.agent = None
        self.hello = None
        self.welcomed = False
        self.closing = False
        self.close_code = None
        self.gone = False
        #: The last messages sent (not raw payloads), oldest first.
        self.sent = collections.deque(maxlen=10000)
        self._lost_waiters = []
        self._hello_timer = platform.reactor.callLater(platform.hello_timeout, self._hello_timeout)

    def __repr__(self):
        name = self.agent.name if self.agent else None
        return f"<Session peer={self.peer} agent={name} welcomed={self.welcomed}>"

    def send(self, message):
        """
        Send one message (a list) as a text frame.
        """
        if self.gone or self.closing:
            raise NotConnected(f"session {self.peer} is closed")
        self.sent.append(message)
        self.connection.platform_send(P.encode(message), False)

    def send_payload(self, payload, binary=False):
        if self.gone or self.closing:
            raise NotConnected(f"session {self.peer} is closed")
        self.connection.platform_send(payload, binary)

    def close(self, code, reason):
        """
        Close with a WebSocket close code; later messages are ignored.
        """
        self._cancel_hello_timer()
        if self.gone or self.closing:
            return
        self.closing = True
        self.close_code = code
        self.connection.platform_close(code, reason)

    def abort(self):
        """
        Drop the connection without a closing handshake.
        """
        self._cancel_hello_timer()
        if self.gone:
            return
        self.closing = True
        self.connection.platform_abort()

    def wait_lost(self):
        """
        A Deferred that fires (with C{None}) once the connection is gone.
        """
        if self.gone:
            return succeed(None)
        d = Deferred()
        self._lost_waiters.append(d)
        return d

    def receive(self, payload, binary=False):
        """
        The transport received one complete message.
        """
        if self.gone or self.closing:
            return
        self.platform._received(self, payload, binary)

    def lost(self):
        """
        The transport lost the connection.
        """
        if self.gone:
            return
        self.gone = True
        self._cancel_hello_timer()
        self.platform._session_lost(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def _cancel_hello_timer(self):
        if self._hello_timer is not None:
            if self._hello_timer.active():
                self._hello_timer.cancel()
            self._hello_timer = None

    def _hello_timeout(self):
        self._hello_timer = None
        log.warn("no HELLO from {peer} within {timeout} s; closing", peer=self.peer,
                 timeout=self.platform.hello_timeout)
        self.close(P.CLOSE_POLICY, "no HELLO in time")


class Platform:
    """
    The platform side of the agent-platform contract.

    @param tokens: C{{token: agent name}}.
    @param reactor: provides C{IReactorTime}; the global reactor if C{None}.
    @param heartbeat: seconds, sent in C{WELCOME}.
    @param hello_timeout: seconds a new connection has to send C{HELLO}.
    @param files_dir: the file store's directory (created if missing), or
        C{None} for no file store.
    @param files_auth: require C{Authorization: Bearer <agent token>} on the
        file store.
    @param api_token: the credential of the JSON API (C{/api/}), a string;
        when C{None}, a random one is made.
    @param api_token_dir: with no C{api_token}, the directory to write the
        made one to, as C{api-token} (mode 0600), for whoever runs the
        platform; its path is logged (never the token).
    @param state_file: a JSON snapshot of agents' C{last_seq} and tasks,
        loaded now if it exists, written after changes (at most once a
        second, and always before an C{ACK} or C{WELCOME} goes out) and on
        L{close}.

    @ivar violations: state-order and ownership violations by agents, as
        dicts; a correct agent leaves it empty.
    @ivar duplicates: reliable messages dropped because their C{seq} was
        already received.
    @ivar malformed: messages from agents that could not be acted on.
    @ivar malformed_messages: C{(agent name or peer, reason)} for each.
    @ivar file_requests: C{(method, path, authorized, had_authorization_header)}
        for each request to the file store.
    @ivar file_credentials: C{(method, path, whose)} for each request to the
        file store: C{"agent <name>"}, C{"api"}, C{"other"} or C{None} for
        the credential it carried (never the credential itself).
    @ivar api_token: the JSON API's bearer token.
    @ivar api_token_file: where it was written, or C{None}.
    @ivar ws_url: C{ws://host:port/compute/agent/v1} once listening.
    @ivar http_url: C{http://host:port} once listening.
    """

    ws_path = "/compute/agent/v1"

    #: With a state file, every ACK waits for a save of the whole state; the
    #: next ACK waits until this many times the last save's duration has
    #: passed since it (none under a fake clock), so that saving takes at
    #: most about a fifth of the time however big the state grows.  ACKs
    #: only let the agent forget what it sent: tasks never wait for them.
    ack_save_ratio = 4.0

    def __init__(self, tokens, reactor=None, heartbeat=30, hello_timeout=10.0,
                 files_dir=None, files_auth=True, state_file=None, api_token=None, api_token_dir=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        if not tokens:
            raise ValueError("at least one agent token is needed")
        self.tokens = {}
        self.agents = {}
        for token, name in tokens.items():
            if not isinstance(token, str) or not token or not isinstance(name, str) or not name:
                raise ValueError("tokens and agent names must be non-empty strings")
            self.tokens[token] = name
            if name not in self.agents:
                self.agents[name] = Agent(name)
        self.api_token_file = None
        if api_token is None:
            api_token = secrets.token_urlsafe(32)
            if api_token_dir is not None:
                self.api_token_file = write_api_token(api_token_dir, api_token)
                log.info("API token (Authorization: Bearer) written to {path}", path=self.api_token_file)
        elif not isinstance(api_token, str) or not api_token:
            raise ValueError("the API token must be a non-empty string")
        self.api_token = api_token
        self.heartbeat = heartbeat
        self.hello_timeout = hello_timeout
        self.files_dir = os.path.abspath(files_dir) if files_dir else None
        self.files_auth = files_auth
        self.state_file = state_file
        self.tasks = {}
        self.connections = set()
        self.violations = []
        self.duplicates = 0
        self.malformed = 0
        self.malformed_messages = []
        self.acks_sent = 0
        self.file_requests = []
        self.file_credentials = []
        self.variables = {}
        self.ws_url = None
        self.http_url = None
        self._ack_paused = False
        self._ack_welcome_frozen = False
        self._jobs = itertools.count(1)
        self._job_tasks = {}
        self._dirty = False
        self._save_call = None
        self._last_save = None
        self._save_cost = 0.0  # seconds the last save took
        self._closers = []
        self._closed = False
        if self.files_dir:
            os.makedirs(os.path.join(self.files_dir, INCOMING), exist_ok=True)
        if state_file and os.path.exists(state_file):
            self.load_state()

    # ------------------------------------------------------------------
    # Python API

    def agent(self, name=None):
        """
        The L{Agent} called C{name}, or the first configured one.

        @raise KeyError: for an unknown name.
        """
        if name is None:
            return next(iter(self.agents.values()))
        try:
            return self.agents[name]
        except KeyError:
            raise KeyError(f"no agent called {name!r}") from None

    def task(self, task_id):
        """
        @raise KeyError: for an unknown task.
        """
        try:
            return self.tasks[task_id]
        except KeyError:
            raise KeyError(f"no task {task_id!r}") from None

    @property
    def sessions(self):
        """
        C{{agent name: Session}} for every agent with a live, welcomed session.
        """
        return {name: a.session for name, a in self.agents.items() if a.session is not None}

    def connected(self, agent=None):
        return self.agent(agent).session is not None

    def submit(self, spec, task_id=None, agent=None, job=None, context=None):
        """
        Submit a task.  It goes on the wire now if its agent is connected,
        else after the agent's next C{WELCOME}.

        @param spec: the task spec, a dict, sent as is (the agent validates
            it): native, or in the Everest dialect (section 8).
        @param context: an object sent after the spec (C{TASK_SUBMIT}'s
            fourth item) and kept with the task; C{None} for none.
        @param task_id: the id; generated as C{j<job>-<k>-0} if C{None}.
        @param job: with a generated id, the job number to add the task to;
            a new job if C{None}.
        @return: the task id.
        @raise ValueError: for an invalid or duplicate id, a non-dict spec
            or context.
        @raise KeyError: for an unknown agent.
        """
        owner = self.agent(agent)
        if not isinstance(spec, dict):
            raise ValueError("a spec must be a dict")
        if context is not None and not isinstance(context, dict):
            raise ValueError("a context must be a dict")
        if task_id is None:
            task_id = self._new_task_id(job)
        elif not P.valid_task_id(task_id):
            raise ValueError(f"invalid task id {task_id!r}; use send_raw to send one anyway")
        if task_id in self.tasks:
            raise ValueError(f"task {task_id!r} exists already")
        task = Task(task_id, owner.name, spec, context)
        self.tasks[task_id] = task
        # (No log event per task here or in _apply_state: at 100,000 tasks a
        # burst, the events cost the platform a sixth of its CPU, logged or
        # filtered out.  Task states are in the API and the state file.)
        if owner.session is not None:
            self._send_submit(owner.session, task)
        self._changed()
        return task_id

    def resubmit(self, task_id):
        """
        Send a known task's C{TASK_SUBMIT} again, as a platform that lost
        track of its delivery would.  A correct agent does not run it again;
        it re-sends the task's current state, which is then expected.

        @raise NotConnected: if its agent has no session.
        """
        task = self.tasks[task_id]
        owner = self.agent(task.agent)
        if owner.session is None:
            raise NotConnected(owner.name)
        self._send_submit(owner.session, task)

    def cancel(self, task_id):
        """
        Cancel a task.  A task that never went on the wire is canceled on
        the platform side at once; a terminal one is left alone.

        @return: C{False} if the task was terminal already, else C{True}.
        """
        task = self.task(task_id)
        if task.terminal:
            return False
        if not task.submitted:
            self._platform_state(task, P.CANCELED, CANCELED_UNSENT_REASON)
            return True
        task.cancel_requested = True
        self._changed()
        session = self.agents[task.agent].session
        if session is not None:
            session.send([P.TASK_CANCEL, task_id])
        return True

    def send_message(self, task_id, text):
        """
        Send C{TASK_MESSAGE} to a task; queued until the next C{WELCOME} if
        its agent is not connected.
        """
        task = self.task(task_id)
        if not isinstance(text, str):
            raise ValueError("a message must be a str")
        agent = self.agents[task.agent]
        if agent.session is not None:
            agent.session.send([P.TASK_MESSAGE, task_id, text])
        else:
            agent.pending_messages.append((task_id, text))

    def send_raw(self, agent, message, binary=False):
        """
        Send anything to an agent's live session: a list is JSON-encoded,
        bytes go as they are (in a text frame unless C{binary}).

        @raise NotConnected: if the agent has no session.
        """
        session = self.agent(agent).session
        if session is None:
            raise NotConnected(f"agent {self.agent(agent).name} is not connected")
        if isinstance(message, (bytes, bytearray)):
            session.send_payload(bytes(message), binary)
        else:
            session.send(list(message))

    def wait_for(self, task_id, state=None):
        """
        A Deferred firing with the L{Task} once it reaches C{state} (or got
        past it by skipping it), or any terminal state if C{state} is
        C{None}.  It fails with L{StateNotReached} if the task ends
        otherwise.
        """
        task = self.task(task_id)
        if state is not None and state not in P.STATES:
            raise ValueError(f"unknown state {state!r}")
        d = Deferred(lambda d: task._waiters.remove((state, d)) if (state, d) in task._waiters else None)
        task._waiters.append((state, d))
        self._check_waiters(task)
        return d

    def wait_message(self, task_id, count=1):
        """
        A Deferred firing with the task's C{messages} list once it holds at
        least C{count} texts.
        """
        task = self.task(task_id)
        if len(task.messages) >= count:
            return succeed(task.messages)
        d = Deferred()
        task._message_waiters.append((count, d))
        return d

    def wait_connected(self, agent=None):
        """
        A Deferred firing with the L{Session} after the next C{WELCOME} to
        the agent (and the messages that follow it), or at once if the
        agent is connected.
        """
        record = self.agent(agent)
        if record.session is not None:
            return succeed(record.session)
        d = Deferred()
        record._connected_waiters.append(d)
        return d

    def wait_disconnected(self, agent=None):
        """
        A Deferred firing (with C{None}) once the agent has no session.
        """
        record = self.agent(agent)
        if record.session is None:
            return succeed(None)
        d = Deferred()
        record._disconnected_waiters.append(d)
        return d

    def disconnect(self, agent=None):
        """
        Drop the agent's connection abruptly (no closing handshake).

        @return: a Deferred firing once the session is gone.
        """
        session = self.agent(agent).session
        if session is None:
            return succeed(None)
        log.info("dropping the connection of agent {agent}", agent=session.agent.name)
        d = session.wait_lost()
        session.abort()
        return d

    @property
    def ack_paused(self):
        return self._ack_paused

    @ack_paused.setter
    def ack_paused(self, value):
        if value:
            self.pause_acks()
        else:
            self.resume_acks()

    def pause_acks(self, welcome=False):
        """
        Fault injection: send no C{ACK} until L{resume_acks}.  With
        C{welcome}, C{WELCOME} also reports only what was acknowledged
        before, as if the acknowledgements had been lost; the agent then
        re-sends and the platform drops the duplicates.
        """
        self._ack_paused = True
        self._ack_welcome_frozen = welcome

    def resume_acks(self):
        """
        Send ACKs again, starting with one per connected agent to catch up.
        """
        self._ack_paused = False
        self._ack_welcome_frozen = False
        for agent in self.agents.values():
            if agent.ack_wanted or agent.acked < agent.last_seq:
                self._schedule_ack(agent)

    # ------------------------------------------------------------------
    # File store

    def resolve_file(self, path):
        """
        The absolute path in the file store for a relative C{path} of
        C{/}-separated segments.

        @raise ValueError: if it is empty, has empty, C{.} or C{..}
            segments, names the upload area, or leaves the store.
        """
        if self.files_dir is None:
            raise ValueError("the platform has no file store")
        if not isinstance(path, str) or not path:
            raise ValueError("empty file path")
        segments = path.split("/")
        for segment in segments:
            if segment in ("", ".", "..") or "\0" in segment or "\\" in segment:
                raise ValueError(f"bad file path {path!r}")
        if segments[0] == INCOMING:
            raise ValueError(f"bad file path {path!r}")
        root = os.path.realpath(self.files_dir)
        full = os.path.join(root, *segments)
        resolved = os.path.realpath(full)
        if not resolved.startswith(root + os.sep):
            raise ValueError(f"file path {path!r} leaves the file store")
        return full

    def incoming_file(self):
        """
        A new named temporary file in the file store, for an upload.
        """
        return tempfile.NamedTemporaryFile(
            dir=os.path.join(self.files_dir, INCOMING), prefix="put-", delete=False
        )

    def put_file(self, path, data):
        """
        Store C{data} (bytes) at C{path} in the file store.
        """
        full = self.resolve_file(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with self.incoming_file() as f:
            f.write(data)
        os.replace(f.name, full)
        return full

    def get_file(self, path):
        """
        The bytes stored at C{path}.
        """
        with open(self.resolve_file(path), "rb") as f:
            return f.read()

    def file_url(self, path):
        """
        The full http(s) URL of C{path} in the file store.
        """
        from urllib.parse import quote

        if self.http_url is None:
            raise RuntimeError("the platform is not listening yet")
        self.resolve_file(path)
        return f"{self.http_url}/files/{quote(path)}"

    def token_name(self, token):
        """
        The agent name for C{token}, or C{None}; compares in constant time.
        """
        found = None
        given = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else b""
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode("utf-8"), given):
                found = name
        return found

    def authorized(self, area, token):
        """
        Whether bearer C{token} (a string or C{None}) is valid for C{area}:
        C{"api"} needs the API token; C{"files"} an agent's token or the API
        token (whether the store requires one is C{files_auth}).  Constant
        time.
        """
        if token is None:
            return False
        given = token.encode("utf-8", "surrogatepass")
        ok = hmac.compare_digest(self.api_token.encode("utf-8"), given)
        if area == "files":
            ok = self.token_name(token) is not None or ok
        return ok

    def set_urls(self, ws_url, http_url):
        self.ws_url = ws_url
        self.http_url = http_url

    # ------------------------------------------------------------------
    # Life cycle

    def add_closer(self, closer):
        """
        Register a callable returning a Deferred, called by L{close}
        (used by L{everest_agent.platform.server.listen} to stop listening).
        """
        self._closers.append(closer)

    def close(self):
        """
        Stop listening, drop every connection, cancel timers and save the
        state.

        @return: a Deferred firing once all of it is done.
        """
        waits = []
        for session in list(self.connections):
            waits.append(session.wait_lost())
            session.abort()
        closers, self._closers = self._closers, []
        for closer in closers:
            waits.append(closer())
        d = DeferredList(waits, consumeErrors=True)

        def done(_):
            for agent in self.agents.values():
                if agent._ack_call is not None and agent._ack_call.active():
                    agent._ack_call.cancel()
                agent._ack_call = None
            if self._save_call is not None and self._save_call.active():
                self._save_call.cancel()
            self._save_call = None
            if self.state_file and self._dirty:
                self.save_state()
            self._closed = True
            return None

        return d.addCallback(done)

    # ------------------------------------------------------------------
    # Durable state

    def _changed(self):
        self._dirty = True
        if not self.state_file or self._save_call is not None or self._closed:
            return
        now = self.reactor.seconds()
        delay = 0 if self._last_save is None else max(0.0, self._last_save + 1.0 - now)
        self._save_call = self.reactor.callLater(delay, self._save_later)

    def _save_later(self):
        self._save_call = None
        if self._dirty:
            self.save_state()

    def _flush(self):
        if self.state_file and self._dirty:
            self.save_state()

    def snapshot(self):
        snapshot = self.snapshot_head()
        snapshot["tasks"] = [task.to_json() for task in self.tasks.values()]
        return snapshot

    def _snapshot_bytes(self):
        """L{snapshot} as compact JSON, with each task's part cached (L{Task.encoded})."""
        snapshot = self.snapshot_head()
        head = _state_dumps(snapshot).encode("utf-8")
        tasks = b",".join([task.encoded() for task in self.tasks.values()])
        return b"".join((head[:-1], b',"tasks":[', tasks, b"]}"))

    def snapshot_head(self):
        """Everything of L{snapshot} but its tasks."""
        return {
            "version": STATE_FILE_VERSION,
            "agents": {
                name: {"lastSeq": a.last_seq, "resource": a.resource}
                for name, a in self.agents.items()
            },
            "variables": self.variables,
            "jobs": self._job_tasks,
        }

    def save_state(self):
        """
        Write the snapshot to C{state_file} atomically (temporary file,
        fsync, rename).
        """
        started = self.reactor.seconds()
        data = self._snapshot_bytes()
        directory = os.path.dirname(os.path.abspath(self.state_file))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".platform-state-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._dirty = False
        self._last_save = self.reactor.seconds()
        self._save_cost = self._last_save - started
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None

    def load_state(self):
        with open(self.state_file, "rb") as f:
            data = json.loads(f.read())
        if data.get("version") != STATE_FILE_VERSION:
            raise ValueError(f"{self.state_file}: unknown state file version {data.get('version')!r}")
        for name, record in data.get("agents", {}).items():
            agent = self.agents.get(name)
            if agent is None:
                agent = self.agents[name] = Agent(name)
            agent.last_seq = agent.acked = int(record.get("lastSeq", 0))
            agent.resource = record.get("resource")
        for entry in data.get("tasks", []):
            task = Task.from_json(entry)
            self.tasks[task.task_id] = task
            if task.agent not in self.agents:
                self.agents[task.agent] = Agent(task.agent)
        self.variables = data.get("variables", {})
        self._job_tasks = {str(k): int(v) for k, v in data.get("jobs", {}).items()}
        numbers = [int(k) for k in self._job_tasks if k.isdigit()]
        self._jobs = itertools.count(max(numbers, default=0) + 1)
        log.info("loaded platform state from {path}: {tasks} tasks", path=self.state_file,
                 tasks=len(self.tasks))

    # ------------------------------------------------------------------
    # Internals: sessions

    def connection_made(self, connection, peer="?"):
        """
        A transport opened a connection; returns its L{Session}.
        """
        session = Session(self, connection, peer)
        self.connections.add(session)
        log.debug("connection from {peer}", peer=peer)
        return session

    def _session_lost(self, session):
        self.connections.discard(session)
        agent = session.agent
        if agent is not None and agent.session is session:
            agent.session = None
            if agent._ack_call is not None and agent._ack_call.active():
                agent._ack_call.cancel()
            agent._ack_call = None
            log.info("agent {agent} disconnected ({peer})", agent=agent.name, peer=session.peer)
            waiters, agent._disconnected_waiters = agent._disconnected_waiters, []
            for d in waiters:
                d.callback(None)

    def _received(self, session, payload, binary):
        if binary:
            log.warn("binary frame from {peer}; closing", peer=session.peer)
            session.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not allowed")
            return
        if not session.welcomed:
            self._hello(session, payload)
            return
        agent = session.agent
        try:
            message = P.decode(payload)
            seq = reliable_seq(message)
        except P.ProtocolError as e:
            self._malformed(session, e.message)
            return
        if seq is not None:
            if seq <= agent.last_seq:
                self.duplicates += 1
                agent.duplicates += 1
                log.debug("duplicate seq {seq} from agent {agent} dropped", seq=seq, agent=agent.name)
                self._schedule_ack(agent)
                return
            agent.last_seq = seq
            self._changed()
            self._schedule_ack(agent)
        try:
            kind, args = parse_agent_message(message)
        except P.ProtocolError as e:
            self._malformed(session, e.message)
            return
        if kind == P.TASK_STATE:
            self._task_state(agent, seq, *args)
        elif kind == P.TASK_MESSAGE:
            self._task_message(agent, *args)
        elif kind == P.RESOURCE_STATE:
            agent.resource = args[0]
            agent.resource_count += 1
            self._changed()
        elif kind == P.ERROR:
            self._agent_error(agent, args[0])

    def _malformed(self, session, reason):
        who = session.agent.name if session.agent else session.peer
        self.malformed += 1
        self.malformed_messages.append((who, reason))
        log.warn("malformed message from {who}: {reason}", who=who, reason=reason)

    def _hello(self, session, payload):
        session._cancel_hello_timer()
        try:
            message = P.decode(payload)
        except P.ProtocolError as e:
            return self._reject_hello(session, f"first message: {e.message}")
        if message[0] != P.HELLO:
            return self._reject_hello(session, f"first message is {message[0][:32]!r}, not HELLO")
        if len(message) != 2 or not isinstance(message[1], dict):
            return self._reject_hello(session, "HELLO needs one object")
        info = message[1]
        token = info.get("token")
        tasks = info.get("tasks", [])
        if not isinstance(token, str) or "protocol" not in info:
            return self._reject_hello(session, "HELLO needs 'token' and 'protocol'")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            return self._reject_hello(session, "HELLO 'tasks' must be a list of task ids")
        name = self.token_name(token)
        if name is None:
            log.warn("invalid token from {peer}; closing", peer=session.peer)
            return session.close(P.CLOSE_INVALID_TOKEN, P.CLOSE_REASONS[P.CLOSE_INVALID_TOKEN])
        protocol = info["protocol"]
        if not _is_int(protocol) or protocol != P.PROTOCOL_VERSION:
            log.warn("agent {agent} speaks protocol {protocol!r}; closing", agent=name,
                     protocol=str(protocol)[:32])
            return session.close(P.CLOSE_UNSUPPORTED_PROTOCOL,
                                 P.CLOSE_REASONS[P.CLOSE_UNSUPPORTED_PROTOCOL])
        agent = self.agents[name]
        if agent.session is not None:
            log.warn("agent {agent} connected from {peer} while a session from {other} is live; closing",
                     agent=name, peer=session.peer, other=agent.session.peer)
            return session.close(P.CLOSE_SESSION_ACTIVE, P.CLOSE_REASONS[P.CLOSE_SESSION_ACTIVE])

        session.agent = agent
        session.hello = {k: v for k, v in info.items() if k != "token"}
        agent.hello = session.hello
        agent.session = session
        agent.welcomes += 1
        session.welcomed = True
        self._flush()
        ack = agent.acked if self._ack_welcome_frozen else agent.last_seq
        agent.acked = ack
        agent.ack_wanted = agent.last_seq > ack
        log.info("agent {agent} connected from {peer} ({software}, handler {handler}); ack {ack}",
                 agent=name, peer=session.peer, software=str(info.get("agent"))[:64],
                 handler=str(info.get("handler"))[:32], ack=ack)
        session.send([P.WELCOME, {"ack": ack, "heartbeat": self.heartbeat}])
        self._reconcile(agent, session, set(tasks))
        if session.gone or session.closing:
            return
        waiters, agent._connected_waiters = agent._connected_waiters, []
        for d in waiters:
            d.callback(session)

    def _reject_hello(self, session, reason):
        log.warn("closing connection from {peer}: {reason}", peer=session.peer, reason=reason)
        session.close(P.CLOSE_POLICY, reason[:120])

    def _reconcile(self, agent, session, listed):
        """
        After C{WELCOME}: fail the tasks the agent lost, (re)send the
        submits it never accepted, then cancels and queued messages.
        """
        submits, cancels = [], []
        for task in list(self.tasks.values()):
            if task.agent != agent.name or task.terminal:
                continue
            if task.state is not None:
                if task.task_id not in listed:
                    log.warn("agent {agent} no longer knows task {task_id} ({state}); failing it",
                             agent=agent.name, task_id=task.task_id, state=task.state)
                    self._platform_state(task, P.FAILED, LOST_REASON)
                elif task.cancel_requested:
                    cancels.append(task)
                continue
            # Never accepted, as far as the platform knows.
            if task.cancel_requested and task.task_id not in listed:
                self._platform_state(task, P.CANCELED, CANCELED_UNKNOWN_REASON)
                continue
            # (Re)send: if the agent knows it already, it re-sends its
            # current state, which _task_state accepts as a repeat.
            submits.append(task)
            if task.cancel_requested:
                cancels.append(task)
        for task in submits:
            self._send_submit(session, task)
        for task in cancels:
            session.send([P.TASK_CANCEL, task.task_id])
        pending, agent.pending_messages = agent.pending_messages, []
        for task_id, text in pending:
            session.send([P.TASK_MESSAGE, task_id, text])
        if agent.ack_wanted:
            self._schedule_ack(agent)

    def _send_submit(self, session, task):
        message = [P.TASK_SUBMIT, task.task_id, task.spec]
        if task.context is not None:
            message.append(task.context)
        session.send(message)
        task.submitted = True
        task.submit_count += 1
        self._changed()

    def _new_task_id(self, job):
        key = str(next(self._jobs)) if job is None else str(job)
        k = self._job_tasks.get(key, 0) + 1
        while True:
            task_id = f"j{key}-{k}-0"
            if task_id not in self.tasks:
                break
            k += 1
        self._job_tasks[key] = k
        return task_id

    # ------------------------------------------------------------------
    # Internals: ACKs

    def _schedule_ack(self, agent):
        agent.ack_wanted = True
        if self._ack_paused or agent.session is None or agent._ack_call is not None:
            return
        delay = 0
        if self.state_file and self._last_save is not None and self._save_cost:
            delay = max(0.0, self._last_save + self.ack_save_ratio * self._save_cost
                        - self.reactor.seconds())
        agent._ack_call = self.reactor.callLater(delay, self._send_ack, agent)

    def _send_ack(self, agent):
        agent._ack_call = None
        if self._ack_paused or agent.session is None or agent.session.closing:
            return
        self._flush()
        agent.acked = agent.last_seq
        agent.ack_wanted = False
        self.acks_sent += 1
        agent.session.send([P.ACK, agent.last_seq])

    # ------------------------------------------------------------------
    # Internals: tasks

    def _violation(self, agent, task_id, old, new, seq, reason):
        entry = {"agent": agent.name, "taskId": task_id, "old": old, "new": new, "seq": seq,
                 "reason": reason}
        self.violations.append(entry)
        log.error("contract violation by agent {agent}, task {task_id}: {reason} ({old} -> {new}, seq {seq})",
                  agent=agent.name, task_id=task_id, reason=reason, old=old, new=new, seq=seq)

    def _task_state(self, agent, seq, task_id, state, info):
        task = self.tasks.get(task_id)
        if task is None:
            log.warn("agent {agent} reports task {task_id} that the platform does not know",
                     agent=agent.name, task_id=task_id)
            task = Task(task_id, agent.name, None)
            task.unknown = True
            self.tasks[task_id] = task
        elif task.agent != agent.name:
            return self._violation(agent, task_id, task.state, state, seq,
                                   f"the task belongs to agent {task.agent}")
        old = task.state
        if old == state and task.repeats < task.submit_count - 1:
            # A re-sent TASK_SUBMIT makes the agent report its current state again.
            task.repeats += 1
            self._changed()
            return
        if not P.may_follow(old, state):
            return self._violation(agent, task_id, old, state, seq, "states out of order")
        if state == P.STAGED_OUT:
            problem = _staged_out_problem(task, info)
            if problem:
                return self._violation(agent, task_id, old, state, seq, problem)
            task.output_data = info["outputData"]
        self._apply_state(task, state, info)

    def _platform_state(self, task, state, reason):
        info = {"time": self.reactor.seconds(), "reason": reason, "platform": True}
        if state in P.TERMINAL:
            info["exitCode"] = None
        log.info("task {task_id} marked {state} by the platform: {reason}",
                 task_id=task.task_id, state=state, reason=reason)
        self._apply_state(task, state, info)

    def _apply_state(self, task, state, info):
        task.state = state
        task.info = info
        task.history.append((state, info))
        self._changed()
        self._check_waiters(task)

    def _check_waiters(self, task):
        if not task._waiters:
            return
        seen = task.states
        keep, fire, fail = [], [], []
        for wanted, d in task._waiters:
            if wanted is None:
                (fire if task.terminal else keep).append((wanted, d))
            elif wanted in seen or (
                task.state is not None
                and wanted not in P.TERMINAL
                and not task.terminal
                and P.STATE_RANK[task.state] > P.STATE_RANK[wanted]
            ):
                fire.append((wanted, d))
            elif task.terminal:
                fail.append((wanted, d))
            else:
                keep.append((wanted, d))
        task._waiters = keep
        for _, d in fire:
            d.callback(task)
        for wanted, d in fail:
            d.errback(StateNotReached(task, wanted))

    def _task_message(self, agent, task_id, text, seq):
        task = self.tasks.get(task_id)
        if task is None:
            log.warn("agent {agent} relays a message from task {task_id} that the platform does not know",
                     agent=agent.name, task_id=task_id)
            task = Task(task_id, agent.name, None)
            task.unknown = True
            self.tasks[task_id] = task
        elif task.agent != agent.name:
            return self._violation(agent, task_id, task.state, None, seq,
                                   f"message for a task of agent {task.agent}")
        task.messages.append(text)
        self._changed()
        self._variable_store(task, text)
        keep = []
        for count, d in task._message_waiters:
            if len(task.messages) >= count:
                d.callback(task.messages)
            else:
                keep.append((count, d))
        task._message_waiters = keep

    def _variable_store(self, task, text):
        """
        Everest's variable store: C{VAR_GET name} is answered with
        C{VAR_VALUE name value} (C{NULL} when unset); C{VAR_SET_MD name
        value} stores the value and sends C{VAR_VALUE name value} to every
        running task of the same job.
        """
        parts = text.split(" ", 2)
        job = task.task_id.split("-", 1)[0]
        if parts[0] == "VAR_GET" and len(parts) == 2:
            value = self.variables.get(job, {}).get(parts[1])
            self.send_message(task.task_id, f"VAR_VALUE {parts[1]} {'NULL' if value is None else value}")
        elif parts[0] == "VAR_SET_MD" and len(parts) == 3:
            name, value = parts[1], parts[2]
            self.variables.setdefault(job, {})[name] = value
            self._changed()
            for other in list(self.tasks.values()):
                if other.task_id.split("-", 1)[0] != job:
                    continue
                if other is task or other.state == P.RUNNING:
                    self.send_message(other.task_id, f"VAR_VALUE {name} {value}")

    def _agent_error(self, agent, info):
        agent.errors.append(info)
        task_id = info.get("taskId")
        log.warn("agent {agent} reports an error: {code}: {message} (task {task_id})",
                 agent=agent.name, code=str(info.get("code"))[:64],
                 message=str(info.get("message"))[:500], task_id=task_id)
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if (
            task is not None
            and info.get("code") == P.E_UNKNOWN_TASK
            and task.agent == agent.name
            and task.cancel_requested
            and task.state is None
        ):
            self._platform_state(task, P.CANCELED, CANCELED_UNKNOWN_REASON)


__all__ = [
    "Platform", "Session", "Task", "Agent", "StateNotReached", "NotConnected",
    "LOST_REASON", "parse_agent_message", "reliable_seq",
]
