"""
The agent-platform wire contract, version 1: constants, codec and validation.

Both sides of the project (the agent and the reference platform) use this
module, so the contract is written down exactly once.  Nothing here does I/O.

Every WebSocket message is one text frame holding a UTF-8 JSON array whose
first element names the message type.  See ``docs/protocol.rst``.
"""

import base64
import binascii
import json
import re

PROTOCOL_VERSION = 1

#: Largest frame (and message) either side accepts; bigger ones close with 1009.
MAX_FRAME_SIZE = 1024 * 1024

#: Deepest nesting of arrays and objects in a message (the message itself is 1).
MAX_DEPTH = 64

#: Inline input ``data`` may carry at most this many decoded bytes.
MAX_INLINE_DATA = 64 * 1024

# Message types, platform -> agent.
WELCOME = "WELCOME"
TASK_SUBMIT = "TASK_SUBMIT"
TASK_CANCEL = "TASK_CANCEL"
TASK_MESSAGE = "TASK_MESSAGE"
ACK = "ACK"

# Message types, agent -> platform.
HELLO = "HELLO"
TASK_STATE = "TASK_STATE"
RESOURCE_STATE = "RESOURCE_STATE"
ERROR = "ERROR"

# WebSocket close codes used by the platform.
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INVALID_TOKEN = 4001
CLOSE_UNSUPPORTED_PROTOCOL = 4002
CLOSE_SESSION_ACTIVE = 4003

CLOSE_REASONS = {
    CLOSE_INVALID_TOKEN: "invalid token",
    CLOSE_UNSUPPORTED_PROTOCOL: "unsupported protocol version",
    CLOSE_SESSION_ACTIVE: "another session with this token is active",
    CLOSE_POLICY: "policy violation (no valid HELLO)",
    CLOSE_TOO_BIG: "frame too big",
}

# ERROR codes the agent sends.
E_MALFORMED = "malformed"
E_UNKNOWN_TYPE = "unknown-type"
E_INVALID = "invalid-message"
E_INVALID_TASK_ID = "invalid-task-id"
E_UNKNOWN_TASK = "unknown-task"

# Task states, in their only allowed order.
ACCEPTED = "ACCEPTED"
STAGING_IN = "STAGING_IN"
QUEUED = "QUEUED"
RUNNING = "RUNNING"
STAGING_OUT = "STAGING_OUT"
STAGED_OUT = "STAGED_OUT"  # Everest-dialect tasks only (section 8)
DONE = "DONE"
FAILED = "FAILED"
CANCELED = "CANCELED"

STATES = (ACCEPTED, STAGING_IN, QUEUED, RUNNING, STAGING_OUT, STAGED_OUT, DONE, FAILED, CANCELED)
TERMINAL = frozenset((DONE, FAILED, CANCELED))
STATE_RANK = {s: i for i, s in enumerate(STATES)}
for _s in TERMINAL:
    STATE_RANK[_s] = len(STATES)


def may_follow(old, new):
    """
    Whether a task in state C{old} may next report C{new}: states only move
    forward (skipping is allowed) and nothing follows a terminal state.
    """
    if old is None:
        return new in STATE_RANK
    if old in TERMINAL:
        return False
    return STATE_RANK[new] > STATE_RANK[old]


_TASK_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\Z")


def valid_task_id(task_id):
    """
    1-128 characters of C{[A-Za-z0-9._-]}, not starting with C{.}: safe as a
    file name and as a batch job name.
    """
    return isinstance(task_id, str) and _TASK_ID.match(task_id) is not None


class ProtocolError(Exception):
    """
    A message that the receiver cannot act on.  It is answered with an
    C{ERROR} message; the connection stays open.
    """

    def __init__(self, code, message, task_id=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.task_id = task_id

    def as_message(self):
        body = {"code": self.code, "message": self.message}
        if self.task_id is not None:
            body["taskId"] = self.task_id
        return [ERROR, body]


class SpecError(ValueError):
    """
    A task spec that breaks the contract.  The task fails with this reason
    before anything runs.
    """


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def hello(token, agent, hostname, handler, slots, tasks):
    """
    The body of the agent's C{HELLO} (the agent's and C{check}'s).

    @param agent: the agent's name and version (C{everest-agent/1.2}).
    @param tasks: the ids of the tasks the agent still knows (not finished,
        or finished with a report not yet acknowledged).
    """
    return {
        "token": token,
        "protocol": PROTOCOL_VERSION,
        "agent": agent,
        "hostname": hostname,
        "handler": handler,
        "slots": slots,
        "tasks": list(tasks),
    }


def encode(message):
    """
    Encode one message (a list whose first item is its type) as the UTF-8
    payload of a text frame.
    """
    return _encoder.encode(message).encode("utf-8")


def decode(payload):
    """
    Decode a text frame's payload into a list whose first item is a string.

    @raise ProtocolError: for anything else.
    """
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(E_MALFORMED, f"not valid JSON: {e}") from None
    except RecursionError:
        # The C decoder gives up at the interpreter's recursion limit.
        raise ProtocolError(E_MALFORMED, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ProtocolError(E_MALFORMED, "a message must be a JSON array whose first item is its type")
    if _openings(payload) > MAX_DEPTH and not _depth_within(message, MAX_DEPTH):
        raise ProtocolError(E_MALFORMED, f"JSON nested deeper than {MAX_DEPTH} levels")
    return message


def _openings(payload):
    """
    An upper bound of how deep C{payload} nests: every array or object
    opens with C{[} or C{{} (brackets inside strings count too, so it can
    only be too high).  Most messages have a handful, and then the walk of
    L{_depth_within} is not needed.
    """
    if isinstance(payload, str):
        return payload.count("[") + payload.count("{")
    return payload.count(b"[") + payload.count(b"{")


def _depth_within(value, limit):
    """
    Whether no array or object in C{value} is nested more than C{limit}
    deep.  Iterative: what the agent later does with a message (encode it,
    store it, walk it) recurses, so depth is bounded here, once.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (list, dict)))
        elif isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, (list, dict)))
    return True


def _check_arity(message, *counts):
    if len(message) not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise ProtocolError(
            E_INVALID, f"{message[0]} takes {expected} items, got {len(message)}"
        )


def check_task_id(message, index=1):
    """
    Return C{message[index]} if it is a valid task id.

    @raise ProtocolError: with code C{invalid-task-id} otherwise.
    """
    task_id = message[index]
    if not valid_task_id(task_id):
        shown = task_id if isinstance(task_id, str) else json.dumps(task_id)
        raise ProtocolError(
            E_INVALID_TASK_ID,
            f"invalid task id {shown[:140]!r}: 1-128 characters of "
            "[A-Za-z0-9._-], not starting with '.'",
            task_id=task_id if isinstance(task_id, str) else None,
        )
    return task_id


def parse_platform_message(message):
    """
    Check the shape of a decoded platform -> agent message.

    @return: C{(type, args)} with the arguments that follow the type.
    @raise ProtocolError: if the type is unknown or the items are wrong.
    """
    kind = message[0]
    if kind == WELCOME:
        _check_arity(message, 2)
        info = message[1]
        if not isinstance(info, dict) or not _is_int(info.get("ack", 0)):
            raise ProtocolError(E_INVALID, "WELCOME needs an object with an integer 'ack'")
        return kind, (info,)
    if kind == ACK:
        _check_arity(message, 2)
        if not _is_int(message[1]):
            raise ProtocolError(E_INVALID, "ACK needs an integer sequence number")
        return kind, (message[1],)
    if kind == TASK_SUBMIT:
        _check_arity(message, 3, 4)
        task_id = check_task_id(message)
        if not isinstance(message[2], dict):
            raise ProtocolError(E_INVALID, "TASK_SUBMIT needs a spec object", task_id)
        if len(message) == 3:
            return kind, (task_id, message[2])
        # Section 8: a context may follow the spec; it is kept, never interpreted.
        if not isinstance(message[3], dict):
            raise ProtocolError(
                E_INVALID, "TASK_SUBMIT: its fourth item, the 'context', must be an object", task_id
            )
        return kind, (task_id, message[2], message[3])
    if kind == TASK_CANCEL:
        _check_arity(message, 2)
        return kind, (check_task_id(message),)
    if kind == TASK_MESSAGE:
        _check_arity(message, 3)
        task_id = check_task_id(message)
        if not isinstance(message[2], str):
            raise ProtocolError(E_INVALID, "TASK_MESSAGE needs a text", task_id)
        return kind, (task_id, message[2])
    raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Task specs

_REQUIREMENTS = ("nodes", "coresPerNode", "memoryPerCore", "timeLimit")
MAX_FILES = 10000
MAX_ENVIRONMENT = 256 * 1024


def _relative_path(value, what):
    if not isinstance(value, str) or not value:
        raise SpecError(f"{what}: 'path' must be a non-empty string")
    if "\0" in value:
        raise SpecError(f"{what}: path {value!r} contains a NUL byte")
    if value.startswith("/"):
        raise SpecError(f"{what}: path {value!r} is absolute; it must be relative to the task directory")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise SpecError(f"{what}: path {value!r} leaves the task directory")
    if depth == 0:
        raise SpecError(f"{what}: path {value!r} names the task directory itself")
    return value


def validate_spec(spec):
    """
    Check a task spec against the contract and return a normalised copy:
    C{command}, C{environment}, C{inputs}, C{outputs} and
    C{resourceRequirements} always present.

    This checks what can be checked without touching the disk; symbolic
    links are checked again when files are written or read.

    @raise SpecError: with a reason fit for a C{FAILED} task.
    """
    if not isinstance(spec, dict):
        raise SpecError("the spec must be an object")
    command = spec.get("command")
    if not isinstance(command, str) or not command.strip():
        raise SpecError("'command' must be a non-empty string")
    if "\0" in command:
        raise SpecError("'command' contains a NUL byte")

    environment = spec.get("environment") or {}
    if not isinstance(environment, dict):
        raise SpecError("'environment' must be an object of strings")
    size = 0
    for name, value in environment.items():
        if not isinstance(value, str) or not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name):
            raise SpecError(f"environment variable {name[:64]!r} must have a valid name and a string value")
        if "\0" in value:
            raise SpecError(f"environment variable {name!r} contains a NUL byte")
        size += len(name) + len(value)
    if size > MAX_ENVIRONMENT:
        raise SpecError(f"the environment is larger than {MAX_ENVIRONMENT} characters")

    inputs = spec.get("inputs") or []
    if not isinstance(inputs, list) or len(inputs) > MAX_FILES:
        raise SpecError(f"'inputs' must be a list of at most {MAX_FILES} objects")
    clean_inputs = []
    seen = set()
    for i, item in enumerate(inputs):
        what = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{what} must be an object")
        path = _relative_path(item.get("path"), what)
        if path in seen:
            raise SpecError(f"{what}: path {path!r} is given twice")
        seen.add(path)
        clean = {"path": path, "executable": bool(item.get("executable", False))}
        if ("uri" in item) == ("data" in item):
            raise SpecError(f"{what}: give exactly one of 'uri' and 'data'")
        if "uri" in item:
            uri = item["uri"]
            if not isinstance(uri, str) or not re.match(r"https?://", uri):
                raise SpecError(f"{what}: 'uri' must be an http:// or https:// URL")
            clean["uri"] = uri
        else:
            data = item["data"]
            if not isinstance(data, str):
                raise SpecError(f"{what}: 'data' must be a base64 string")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise SpecError(f"{what}: 'data' is not valid base64") from None
            if len(raw) > MAX_INLINE_DATA:
                raise SpecError(f"{what}: inline data is {len(raw)} bytes, more than {MAX_INLINE_DATA}")
            clean["data"] = data
        if "sha256" in item and item["sha256"] is not None:
            digest = item["sha256"]
            if not isinstance(digest, str) or not re.match(r"[0-9a-fA-F]{64}\Z", digest):
                raise SpecError(f"{what}: 'sha256' must be 64 hex digits")
            clean["sha256"] = digest.lower()
        if "size" in item and item["size"] is not None:
            if not _is_int(item["size"]) or item["size"] < 0:
                raise SpecError(f"{what}: 'size' must be a non-negative integer")
            clean["size"] = item["size"]
        clean_inputs.append(clean)

    outputs = spec.get("outputs") or []
    if not isinstance(outputs, list) or len(outputs) > MAX_FILES:
        raise SpecError(f"'outputs' must be a list of at most {MAX_FILES} objects")
    clean_outputs = []
    for i, item in enumerate(outputs):
        what = f"outputs[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{what} must be an object")
        uri = item.get("uri")
        if not isinstance(uri, str) or not re.match(r"https?://", uri):
            raise SpecError(f"{what}: 'uri' must be an http:// or https:// URL")
        if ("path" in item) == ("pattern" in item):
            raise SpecError(f"{what}: give exactly one of 'path' and 'pattern'")
        if "path" in item:
            clean = {"path": _relative_path(item["path"], what), "uri": uri,
                     "optional": bool(item.get("optional", False))}
        else:
            pattern = item["pattern"]
            _relative_path(pattern, what)
            clean = {"pattern": pattern, "uri": uri}
        clean_outputs.append(clean)

    requirements = spec.get("resourceRequirements") or {}
    if not isinstance(requirements, dict):
        raise SpecError("'resourceRequirements' must be an object")
    clean_requirements = {}
    for key in _REQUIREMENTS:
        if requirements.get(key) is None:
            continue
        value = requirements[key]
        if not _is_number(value) or value <= 0 or (key != "timeLimit" and not _is_int(value)):
            raise SpecError(f"resourceRequirements.{key} must be a positive number")
        clean_requirements[key] = value

    clean_spec = dict(spec)
    clean_spec.update(
        command=command,
        environment=dict(environment),
        inputs=clean_inputs,
        outputs=clean_outputs,
        resourceRequirements=clean_requirements,
    )
    return clean_spec
