"""
C{everest-agent import-config}: the old Everest agent's JSON configuration
(C{agent.conf}) turned into this agent's C{agent.ini}.

L{convert} is pure: a decoded JSON object in; the INI text, the secret files
to write (tokens never go into the INI) and the keys that could not be
carried over, each with the reason, out.  The command in L{everest_agent.cli}
reads the file, writes the secrets (mode 0600) and prints the rest.

Periods (C{pingPeriod}, C{pongTimeout}, a handler's C{pollPeriod}) are
numbers whose unit real configurations do not agree on.  With
C{periods="auto"} a value of 1000 or more is taken as milliseconds (no
keep-alive or poll period of a quarter of an hour or more is plausible,
while the old agent's millisecond defaults are in the tens of thousands)
and a smaller one as seconds; C{"s"} and C{"ms"} force one unit.
"""

import configparser
import json
import math
import posixpath
import re
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from everest_agent import config as agent_config

AGENT_TOKEN_FILE = "agent-token"
CLIENT_TOKENS_FILE = "client-tokens"

HANDLER_TYPES = {
    "local": "local", "slurm": "slurm", "torque": "torque", "pbs": "pbs", "pbspro": "pbs",
    "pbs_pro": "pbs", "sge": "sge", "gridengine": "sge", "grid_engine": "sge",
}
LOG_LEVELS = {
    "trace": "debug", "debug": "debug", "fine": "debug", "info": "info", "warn": "warn",
    "warning": "warn", "error": "error", "critical": "critical", "fatal": "critical",
}


class ImportConfigError(Exception):
    """The configuration cannot be converted; the message names the key (never a token)."""


@dataclass(frozen=True)
class SecretFile:
    name: str  # file name inside the secrets directory
    text: str


@dataclass(frozen=True)
class Note:
    key: str
    reason: str

    def __str__(self):
        return f"{self.key}: not carried over: {self.reason}"


@dataclass(frozen=True)
class Result:
    ini: str
    secrets: tuple
    notes: tuple


def parse_json(text, source="agent.conf"):
    """Decode C{text}; a duplicate key, non-JSON or a non-object is an L{ImportConfigError}."""

    def pairs(items):
        obj = {}
        for key, value in items:
            if key in obj:
                raise ImportConfigError(f"{source}: the key {key!r} appears twice in one object")
            obj[key] = value
        return obj

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ImportConfigError(f"{source}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ImportConfigError(f"{source}: must hold a JSON object, not {_kind(data)}")
    return data


def _kind(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


class _Converter:
    def __init__(self, data, secrets_dir, source, periods):
        if periods not in ("auto", "s", "ms"):
            raise ValueError("periods must be auto, s or ms")
        self.data, self.secrets_dir, self.source, self.periods = data, secrets_dir, source, periods
        self.notes, self.secrets = [], []
        self.sections = {}  # section -> [(key, value, comment)]

    # -- reading the JSON --

    def fail(self, key, message):
        raise ImportConfigError(f"{self.source}: {key}: {message}")

    def note(self, key, reason):
        self.notes.append(Note(key, reason))

    def obj(self, parent, name, path, known):
        """The object C{parent[name]} ({} when absent); its unknown keys noted."""
        value = parent.get(name, {})
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, not {_kind(value)}")
        for key in value:
            if key not in known:
                self.note(f"{path}.{key}", "not a key of the Everest agent this tool knows")
        return value

    def typed(self, parent, name, path, types, what, default=None):
        if name not in parent:
            return default
        value = parent[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            self.fail(path, f"must be {what}, not {_kind(value)}")
        return value

    def boolean(self, parent, name, path, default=None):
        return self.typed(parent, name, path, (bool,), "true or false", default)

    def text(self, parent, name, path, secret=False):
        value = self.typed(parent, name, path, (str,), "a string")
        if value is not None and not secret:
            self.representable(path, value)
        return value

    def integer(self, parent, name, path, low, high=None):
        value = self.typed(parent, name, path, (int,), "a whole number")
        if value is not None and (value < low or high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            self.fail(path, f"must be {bound}, not {value}")
        return value

    def period(self, parent, name, path):
        """(seconds, comment) or None."""
        value = self.typed(parent, name, path, (int, float), "a number of seconds or milliseconds")
        if value is None:
            return None
        if not math.isfinite(value) or value <= 0:
            self.fail(path, f"must be a positive number, not {value}")
        unit = self.periods
        if unit == "auto":
            unit = "ms" if value >= 1000 else "s"
        seconds = value / 1000 if unit == "ms" else value
        how = "milliseconds" if unit == "ms" else "seconds"
        return _number(seconds), f"{path} = {_number(value)}, taken as {how}"

    def representable(self, path, value):
        if "\n" in value or "\r" in value or re.search(r"\s;", value) or value != value.strip():
            self.fail(path, "has a line break, surrounding white space or ' ;', which an INI value cannot hold")

    # -- writing the INI --

    def put(self, section, key, value, comment=None):
        self.sections.setdefault(section, []).append((key, value, comment))

    def secret(self, name, lines):
        self.secrets.append(SecretFile(name, "".join(line + "\n" for line in lines)))
        return posixpath.join(self.secrets_dir, name)

    # -- the mapping --

    def run(self):
        data = self.data
        for key in data:
            if key not in ("resource", "protocol", "security", "taskProtocol", "logging"):
                self.note(key, "not a section of the Everest agent this tool knows")
        protocol = self.obj(data, "protocol", "protocol",
                            {"activeMode", "passiveMode", "pingPeriod", "pongTimeout", "resourceInfoPeriod"})
        active = self.active(protocol)
        passive = self.passive(protocol)
        if not active and not passive:
            self.fail("protocol", "neither activeMode nor passiveMode is enabled; the agent would do nothing")
        for name, key in (("pingPeriod", "ping_interval"), ("pongTimeout", "ping_timeout")):
            got = self.period(protocol, name, f"protocol.{name}")
            if got is None:
                continue
            if active:
                self.put("platform", key, *got)
            else:
                self.note(f"protocol.{name}", "active mode is off and passive mode here has no such key")
        if "resourceInfoPeriod" in protocol:
            self.period(protocol, "resourceInfoPeriod", "protocol.resourceInfoPeriod")
            self.note("protocol.resourceInfoPeriod",
                      "the platform sets how often resource state is sent (WELCOME heartbeat)")
        handler = self.resource()
        self.task_protocol(handler)
        self.security()
        self.logging()
        return self.render()

    def active(self, protocol):
        mode = self.obj(protocol, "activeMode", "protocol.activeMode", {"enabled", "serverURI", "agentToken"})
        if not mode or not self.boolean(mode, "enabled", "protocol.activeMode.enabled", True):
            if mode.get("agentToken") is not None:
                self.note("protocol.activeMode.agentToken", "active mode is off; the token is not written")
            return False
        url = self.text(mode, "serverURI", "protocol.activeMode.serverURI")
        if not url:
            self.fail("protocol.activeMode.serverURI", "missing; active mode needs the platform's URL")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            self.fail("protocol.activeMode.serverURI", f"{url!r} is not a ws:// or wss:// URL with a host")
        token = self.text(mode, "agentToken", "protocol.activeMode.agentToken", secret=True)
        if not token:
            self.fail("protocol.activeMode.agentToken", "missing; active mode needs the agent's token")
        self.check_token(token.strip(), "protocol.activeMode.agentToken")
        self.put("platform", "url", url)
        comment = None
        if parts.scheme == "ws" and not agent_config.is_loopback(parts.hostname):
            comment = "plain ws:// to another host: the agent refuses it unless allow_insecure = yes"
            self.note("protocol.activeMode.serverURI (ws://)",
                      "allow_insecure is not set for you; use wss:// or set it knowingly")
        self.put("platform", "token_file", self.secret(AGENT_TOKEN_FILE, [token.strip()]), comment)
        return True

    def check_token(self, token, path, limit=agent_config.MAX_SECRET_FILE - 1):
        try:
            agent_config.check_token_text(token, path)
        except agent_config.ConfigError:
            self.fail(path, "a token must be printable ASCII without white space")
        if len(token) > limit:
            self.fail(path, f"longer than {limit} characters")

    def passive(self, protocol):
        mode = self.obj(protocol, "passiveMode", "protocol.passiveMode",
                        {"enabled", "agentPort", "clientTokens", "uploadDir"})
        if not mode or not self.boolean(mode, "enabled", "protocol.passiveMode.enabled", True):
            if mode.get("clientTokens"):
                self.note("protocol.passiveMode.clientTokens", "passive mode is off; the tokens are not written")
            return False
        port = self.integer(mode, "agentPort", "protocol.passiveMode.agentPort", 1, 65535)
        if port is None:
            self.fail("protocol.passiveMode.agentPort", "missing; passive mode needs a port")
        tokens = self.typed(mode, "clientTokens", "protocol.passiveMode.clientTokens", (list,), "a list of strings")
        if not tokens:
            self.fail("protocol.passiveMode.clientTokens", "missing or empty; passive mode needs a client token")
        for number, token in enumerate(tokens):
            where = f"protocol.passiveMode.clientTokens[{number}]"
            if not isinstance(token, str):
                self.fail(where, f"must be a string, not {_kind(token)}")
            self.check_token(token, where, 1024)
            if token.startswith("#"):
                self.fail(where, "starts with #, which the tokens file takes for a comment")
        self.put("passive", "enabled", "true")
        self.put("passive", "listen", f"0.0.0.0:{port}",
                 "every address, as the old agent's agentPort; narrow it if clients are local")
        self.put("passive", "client_tokens_file", self.secret(CLIENT_TOKENS_FILE, tokens))
        if "uploadDir" in mode:
            self.text(mode, "uploadDir", "protocol.passiveMode.uploadDir")
            self.note("protocol.passiveMode.uploadDir",
                      "passive mode here takes no uploads; a task's inputData fetches its files")
        return True

    BATCH_OPTIONS = {
        "queue": {"slurm": "partition", "torque": "queue", "pbs": "queue", "sge": "queue"},
        "partition": {"slurm": "partition"},
        "account": {"slurm": "account"},
        "qos": {"slurm": "qos"},
        "project": {"sge": "project"},
        "pe": {"sge": "pe"},
        "parallelEnvironment": {"sge": "pe"},
        "commandDir": {t: "command_dir" for t in ("slurm", "torque", "pbs", "sge")},
        "binDir": {t: "command_dir" for t in ("slurm", "torque", "pbs", "sge")},
    }

    def resource(self):
        res = self.obj(self.data, "resource", "resource", {"tasksDir", "maxTasks", "taskHandler", "keepTaskDir"})
        tasks_dir = self.text(res, "tasksDir", "resource.tasksDir")
        if tasks_dir is not None:
            if not tasks_dir:
                self.fail("resource.tasksDir", "must not be empty")
            comment = None if tasks_dir.startswith(("/", "~")) else \
                "relative: taken from the directory the agent starts in"
            self.put("agent", "work_dir", tasks_dir, comment)
        max_tasks = self.integer(res, "maxTasks", "resource.maxTasks", 1)
        if max_tasks is not None:
            self.put("agent", "max_tasks", str(max_tasks))
        keep = self.boolean(res, "keepTaskDir", "resource.keepTaskDir")
        if keep is True:
            self.put("agent", "keep_task_dirs", "all", "resource.keepTaskDir = true")
        elif keep is False:
            self.put("agent", "keep_task_dirs", "0", "resource.keepTaskDir = false: removed once reported")
        options = ({"type", "pollPeriod", "pollInterval", "submitArgs", "extraArgs"} | set(self.BATCH_OPTIONS))
        handler = self.obj(res, "taskHandler", "resource.taskHandler", options)
        raw = self.text(handler, "type", "resource.taskHandler.type")
        kind = "local" if raw is None else HANDLER_TYPES.get(raw.strip().lower())
        if kind is None:
            self.fail("resource.taskHandler.type",
                      f"{raw!r} has no counterpart here (known: {', '.join(sorted(HANDLER_TYPES))})")
        self.put("handler", "type", kind)
        for name in sorted(set(handler) - {"type"}):
            path = f"resource.taskHandler.{name}"
            if name not in options:
                continue  # noted by obj()
            if kind == "local":
                self.note(path, "the local handler has no options")
            elif name in ("pollPeriod", "pollInterval"):
                self.put("handler", "poll_interval", *self.period(handler, name, path))
            elif name in ("submitArgs", "extraArgs"):
                self.extra_args(handler, name, path)
            else:
                target = self.BATCH_OPTIONS[name].get(kind)
                value = self.text(handler, name, path)
                if target is None:
                    self.note(path, f"the {kind} handler has no such option")
                else:
                    self.put("handler", target, value, f"{path}" if target != name else None)
        return kind

    def extra_args(self, handler, name, path):
        value = handler[name]
        if isinstance(value, str):
            words = value.split()
        elif isinstance(value, list) and all(isinstance(w, str) for w in value):
            words = value
            if any(not w or re.search(r"\s", w) for w in words):
                self.note(path, "an argument holds white space or is empty; extra_args is split on white space")
                return
        else:
            self.fail(path, f"must be a string or a list of strings, not {_kind(value)}")
        if words:
            self.representable(path, " ".join(words))
            self.put("handler", "extra_args", " ".join(words))

    def task_protocol(self, handler):
        tp = self.obj(self.data, "taskProtocol", "taskProtocol", {"enabled", "port"})
        enabled = self.boolean(tp, "enabled", "taskProtocol.enabled", bool(tp))
        port = self.integer(tp, "port", "taskProtocol.port", 0, 65535)
        if not tp:
            return
        self.put("task_channel", "enabled", "true" if enabled else "false")
        if port is not None:
            host = "127.0.0.1" if handler == "local" else "0.0.0.0"
            self.put("task_channel", "listen", f"{host}:{port}",
                     None if handler == "local" else "every address: compute nodes must reach it")

    def security(self):
        sec = self.obj(self.data, "security", "security", {"allowedCommands"})
        if "allowedCommands" not in sec:
            return
        entries = sec["allowedCommands"]
        if not isinstance(entries, list):
            self.fail("security.allowedCommands", f"must be a list, not {_kind(entries)}")
        if not entries:
            self.note("security.allowedCommands", "an empty list; here no allowed_commands allows every command")
            return
        patterns = []
        for number, entry in enumerate(entries):
            where = f"security.allowedCommands[{number}]"
            if isinstance(entry, list) and entry and all(isinstance(w, str) for w in entry):
                if any(shlex.quote(w) != w for w in entry):
                    self.note(where, "a literal command with words that need shell quoting has no single exact form")
                    continue
                pattern = re.escape(" ".join(entry))
            elif isinstance(entry, str):
                pattern = entry
            else:
                self.fail(where, f"must be a regular expression or a list of words, not {_kind(entry)}")
            try:
                re.compile(pattern)
            except re.error as e:
                self.note(where, f"not a regular expression Python reads ({e})")
                continue
            if pattern != pattern.strip() or not pattern or "\n" in pattern or "\r" in pattern \
                    or re.search(r"\s;", pattern):
                self.note(where, "surrounding white space, a line break or ' ;' cannot be kept in the INI")
                continue
            if pattern[0] in "#;":
                pattern = f"[{pattern[0]}]{pattern[1:]}"  # a line starting so would be a comment
            patterns.append(pattern)
        if not patterns:
            self.fail("security.allowedCommands",
                      "none of its entries can be carried over, and no allowed_commands would allow every command")
        self.put("security", "allowed_commands", patterns,
                 "each must match the whole command; literal lists are escaped")

    def logging(self):
        log = self.obj(self.data, "logging", "logging", {"level"})
        level = self.text(log, "level", "logging.level")
        if level is None:
            return
        mapped = LOG_LEVELS.get(level.strip().lower())
        if mapped is None:
            self.note("logging.level", f"{level!r} is none of {', '.join(agent_config.LOG_LEVELS)}; info is used")
        else:
            self.put("agent", "log_level", mapped)

    def render(self):
        out = [f"; agent.ini made by everest-agent import-config from {self.source}.",
               "; Check it with: everest-agent check --config agent.ini"]
        if self.notes:
            out.append("; Not carried over:")
            out.extend(f";   {note}" for note in self.notes)
        order = ["platform", "agent", "handler", "task_channel", "security", "passive"]
        expected = {}
        for section in order:
            if section not in self.sections:
                continue
            out += ["", f"[{section}]"]
            for key, value, comment in self.sections[section]:
                if comment:
                    out.append(f"; {comment}")
                if isinstance(value, list):
                    out.append(f"{key} =")
                    out.extend(f"    {line}" for line in value)
                    expected[(section, key)] = "\n" + "\n".join(value)
                else:
                    out.append(f"{key} = {value}")
                    expected[(section, key)] = value
        ini = "\n".join(out) + "\n"
        self.self_check(ini, expected)
        return Result(ini, tuple(self.secrets), tuple(self.notes))

    @staticmethod
    def self_check(ini, expected):
        """Read the text back as the agent's loader does: every value must come out as put in."""
        parser = configparser.ConfigParser(
            interpolation=None, inline_comment_prefixes=(";",), default_section="\0none")
        parser.optionxform = str
        parser.read_string(ini)
        for (section, key), value in expected.items():
            got = parser.get(section, key)
            if got.strip() != value.strip():
                raise ImportConfigError(f"[{section}] {key}: the value would not read back as written")


def _number(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def convert(data, secrets_dir, source="agent.conf", periods="auto"):
    """
    @param data: the decoded C{agent.conf} (see L{parse_json}).
    @param secrets_dir: absolute directory the secret files will be written
        to; the INI names them there.
    @return: a L{Result}.
    @raise ImportConfigError: a key of a wrong type or value, a missing or
        malformed token, nothing to run.
    """
    if not isinstance(data, dict):
        raise ImportConfigError(f"{source}: must hold a JSON object, not {_kind(data)}")
    return _Converter(data, secrets_dir, source, periods).run()
