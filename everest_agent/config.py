"""
The agent's configuration file (INI).

Every key the agent understands is declared once, in L{SCHEMA} and
L{HANDLER_KEYS}, with its type, default and a one-line description; the
reference documentation is checked against these tables.  Anything else in
the file (an unknown section or key, a bad value, a missing token, a token
file others can read) is an error whose message names the file, the section,
the key and what is wrong.
"""

import configparser
import errno
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable
from urllib.parse import urlsplit

from everest_agent.cache import parse_size

REQUIRED = object()


class ConfigError(Exception):
    """A configuration problem, with a message fit to show the user as is."""


@dataclass(frozen=True)
class Key:
    parse: Callable[[str], Any]
    default: Any
    doc: str


def _text(value):
    return value.strip()


def _positive_int(value):
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number of at least 1")
    return number


def _non_negative_int(value):
    number = int(value)
    if number < 0:
        raise ValueError("must be a whole number of at least 0")
    return number


def _positive_float(value):
    number = float(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _bool(value):
    lowered = value.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def _path(value):
    value = value.strip()
    if not value:
        return ""
    return os.path.abspath(os.path.expanduser(value))


def _regex_lines(value):
    patterns = []
    for line in value.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            patterns.append(re.compile(line))
        except re.error as e:
            raise ValueError(f"{line!r} is not a valid regular expression ({e})") from None
    return patterns


def _words(value):
    return value.split()


def _host_port(value):
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError("the port must be from 0 to 65535")
    return host.strip("[]"), number


def _choice(*choices):
    def parse(value):
        value = value.strip().lower()
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    return parse


def _handler_type(value):
    value = value.strip().lower()
    if value not in HANDLER_KEYS:
        raise ValueError("must be one of " + ", ".join(sorted(HANDLER_KEYS)))
    return value


def _env_names(value):
    names = value.split()
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\*?", name):
            raise ValueError(f"{name!r} is not an environment variable name (or a prefix ending with *)")
    return names


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _retention(value):
    """C{all} -> None (keep every one); C{N} -> ("count", N); C{N[smhd]} -> ("age", seconds)."""
    value = value.strip().lower()
    if value == "all":
        return None
    if value.isdigit():
        return ("count", int(value))
    if len(value) > 1 and value[:-1].isdigit() and value[-1] in _AGE_UNITS:
        return ("age", int(value[:-1]) * _AGE_UNITS[value[-1]])
    raise ValueError("must be a count (e.g. 1000), an age (e.g. 7d, 12h, 30m, 90s) or all")


# -- operations ([agent] log_level, [monitor]): see everest_agent/tap.py, monitor.py --

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def _log_level(value):
    value = value.strip().lower()
    value = {"warning": "warn"}.get(value, value)
    if value not in LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(LOG_LEVELS))
    return value


def _listen_address(value):
    """C{host:port} (C{[v6]:port}) -> C{(host, port)}; empty -> None (off)."""
    value = value.strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9108")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port)

# -- end of operations helpers --


SCHEMA = {
    "platform": {
        "url": Key(_text, REQUIRED, "WebSocket URL of the platform's agent endpoint (wss://...). The whole [platform] section may be left out when [passive] is enabled (passive mode only)."),
        "token": Key(_text, "", "The agent's secret token, inline. Use exactly one of token and token_file."),
        "token_file": Key(_path, "", "File holding the secret token (mode 0600). Use exactly one of token and token_file."),
        "ca_file": Key(_path, "", "PEM bundle of CA certificates to trust instead of the system store, for wss:// and https://."),
        "allow_insecure": Key(_bool, False, "Allow a plain ws:// URL to a host that is not loopback."),
        "ping_interval": Key(_positive_float, 30.0, "Seconds between WebSocket pings."),
        "ping_timeout": Key(_positive_float, 60.0, "Seconds without a pong before the connection is dropped and re-established."),
        "reconnect_initial_delay": Key(_positive_float, 1.0, "First reconnection delay in seconds."),
        "reconnect_max_delay": Key(_positive_float, 60.0, "Largest reconnection delay in seconds."),
        "reconnect_factor": Key(_positive_float, 2.0, "Factor by which the reconnection delay grows."),
        "welcome_timeout": Key(_positive_float, 30.0, "Seconds to wait for WELCOME after HELLO before reconnecting."),
    },
    "agent": {
        "work_dir": Key(_path, "/var/lib/everest-agent/tasks", "Directory holding one directory per task."),
        "state_dir": Key(_path, "/var/lib/everest-agent/state", "Directory for the durable outbox and task registry."),
        "max_tasks": Key(_positive_int, os.cpu_count() or 1, "Slots: tasks (local: cores) in use at once. Default: the number of CPUs."),
        "hostname": Key(_text, "", "Name reported to the platform. Default: this machine's fully qualified name."),
        "kill_grace": Key(_positive_float, 10.0, "Seconds between SIGTERM and SIGKILL when a task is canceled or exceeds its timeLimit."),
        "keep_task_dirs": Key(_retention, ("count", 1000), "Directories of finished, acknowledged tasks kept on disk: a count (the newest N, e.g. 1000), an age (e.g. 7d, 12h) or all; older ones are removed."),
        "keep_finished": Key(_non_negative_int, 10000, "Finished tasks remembered (for idempotent TASK_SUBMIT) after their report is acknowledged."),
        "on_stop": Key(_choice("leave", "cancel"), "leave", "What stopping the agent does to running tasks: leave them running (they are found again at the next start) or cancel them."),
        "log_level": Key(_log_level, "info", "Least important log messages written: debug, info, warn, error or critical (under twistd)."),
    },
    "handler": {
        "type": Key(_handler_type, "local", "Back end that runs tasks: local, slurm, torque, pbs or sge."),
    },
    "task_channel": {
        "enabled": Key(_bool, False, "Open the task channel: a TCP port through which running tasks exchange messages with the platform."),
        "listen": Key(_host_port, ("127.0.0.1", 0), "Address and port to listen on (port 0: any free port). Batch handlers need an address the compute nodes can reach."),
        "address": Key(_text, "", "Address given to tasks (EVEREST_AGENT_ADDRESS). Default: the listen address, or this machine's name when listening on all addresses."),
    },
    "security": {
        "allowed_commands": Key(_regex_lines, [], "Regular expressions, one per line; when given, a task command must match one as a whole."),
        "allowed_environment": Key(_env_names, [], "With allowed_commands: variables (or prefixes ending with *) a task's spec may set although they change what the shell or the loader runs (PATH, LD_*, BASH_ENV, ...)."),
    },
    "transfer": {
        "timeout": Key(_positive_float, 60.0, "Seconds to wait for a file server to connect and answer (its response headers; for an upload, after the last byte)."),
        "stall_timeout": Key(_positive_float, 60.0, "Seconds without a byte moving while a body streams before that attempt is aborted (and retried)."),
        "retries": Key(_non_negative_int, 5, "Retries of a transfer after transient failures (connection errors, timeouts, stalls, HTTP 408, 425, 429, 5xx); counts consecutive attempts that made no progress."),
        "retry_initial_delay": Key(_positive_float, 1.0, "Seconds before the first retry; the delay doubles on each further one, with jitter."),
        "retry_max_delay": Key(_positive_float, 60.0, "Largest delay in seconds between two retries (also caps a server's Retry-After)."),
        "max_concurrent": Key(_positive_int, 8, "Transfers (downloads and uploads) running at once, shared fairly among tasks."),
        "cache_dir": Key(_path, "", "Directory of the content cache for inputs that give a sha256. Default: .cache in work_dir (same file system, so inputs are hard-linked)."),
        "cache_size": Key(parse_size, 10 << 30, "Largest size of the content cache, in bytes or with a suffix K, M, G, T (powers of 1024), e.g. 10G. 0 turns the cache off."),
        "stage_out_timeout": Key(_positive_float, 86400.0, "Seconds one task's stage-out may take; uploads still running then are stopped and fail the task."),
        "max_stage_out": Key(parse_size, 1 << 40, "Largest total size of one task's outputs, in bytes or with a suffix K, M, G, T; outputs beyond it fail the task."),
        "max_output_entries": Key(_positive_int, 1_000_000, "Directory entries one output pattern may look at; a pattern that needs more fails the task."),
        "max_output_files": Key(_positive_int, 100_000, "Files one output pattern may match; a pattern that matches more fails the task."),
    },
    "pilot": {
        "enabled": Key(_bool, False, "Pilot mode: run tasks inside a few batch jobs (pilots) of the [handler] type instead of one job per task."),
        "max_pilots": Key(_positive_int, 2, "Pilot jobs at once, pending ones included."),
        "cores": Key(_positive_int, 1, "Cores each pilot asks for, on one node."),
        "walltime": Key(_positive_float, 3600.0, "Seconds each pilot asks for."),
        "idle_timeout": Key(_positive_float, 60.0, "A pilot with nothing to run for this many seconds ends."),
        "listen": Key(_host_port, ("0.0.0.0", 0), "Address and port where the agent listens for its pilots (port 0: any free port, kept across restarts)."),
        "advertise_address": Key(_text, "", "The host name pilots connect to. Default: this host's name ([agent] hostname)."),
        "python": Key(_text, "", "Interpreter that runs the pilot worker on the compute nodes. Default: the agent's own."),
        "heartbeat": Key(_positive_float, 10.0, "Seconds between heartbeats on a pilot's link; three missed drop it, and the pilot reconnects."),
        "connect_timeout": Key(_positive_float, 300.0, "Seconds a running pilot job may take to connect back before it is canceled as unreachable."),
        "reconnect_for": Key(_positive_float, 600.0, "Seconds a pilot keeps trying to reconnect to an absent agent before it ends (once its tasks end)."),
        "lost_timeout": Key(_positive_float, 120.0, "Seconds a pilot's link may stay down before the pilot is canceled and its tasks settled."),
    },
    "passive": {
        "enabled": Key(_bool, False, "Passive mode: clients connect to the agent (WebSocket at /agent/ws, task outputs at /files/) with an EverestAgentClientToken."),
        "listen": Key(_host_port, ("127.0.0.1", 8891), "host:port of the passive-mode WebSocket and file listener."),
        "client_tokens_file": Key(_path, "", "File of client tokens, one a line (mode 0600). Required when passive mode is enabled."),
        "tls_cert": Key(_path, "", "PEM certificate (chain) of the passive listener; with tls_key, clients use wss:// and https://."),
        "tls_key": Key(_path, "", "PEM private key of tls_cert (mode 0600)."),
        "max_client_tasks": Key(_positive_int, 1000, "Unfinished tasks one client credential may have at once; more TASK_SUBMITs are refused with an ERROR."),
        "max_tasks": Key(_positive_int, 10000, "Unfinished passive-mode tasks of all clients at once, so clients cannot take the active platform's memory."),
    },
    "monitor": {
        "listen": Key(_listen_address, None, "host:port of the local /healthz and /metrics HTTP endpoint, e.g. 127.0.0.1:9108. Default: empty, off."),
    },
}

_BATCH_KEYS = {
    "poll_interval": Key(_positive_float, 10.0, "Seconds between scheduler polls (one call covers every job)."),
    "command_timeout": Key(_positive_float, 60.0, "Seconds a scheduler command may take before it is killed and retried later."),
    "max_submit": Key(_positive_int, 16, "Job submissions in flight at once."),
    "extra_args": Key(_words, [], "Extra arguments for every submission (split on white space)."),
    "command_dir": Key(_path, "", "Directory holding the scheduler's commands (qsub, sbatch, ...). Default: empty, look them up in PATH."),
}


#: Keys of the [handler] section, by handler type (besides ``type``).
HANDLER_KEYS = {
    "local": {},
    "slurm": dict(
        _BATCH_KEYS,
        partition=Key(_text, "", "SLURM partition (--partition)."),
        account=Key(_text, "", "SLURM account (--account)."),
        qos=Key(_text, "", "SLURM quality of service (--qos)."),
        cores_as=Key(
            _choice("tasks", "cpus"),
            "tasks",
            "How coresPerNode is requested: tasks (--ntasks-per-node, e.g. MPI) or cpus (--cpus-per-task, e.g. threads).",
        ),
    ),
    "torque": dict(
        _BATCH_KEYS,
        queue=Key(_text, "", "Queue for qsub -q."),
        qstat_format=Key(
            _choice("text", "xml"),
            "text",
            "How job states are read: text (qstat -f; TORQUE and SLURM's PBS wrappers) or xml (qstat -x; TORQUE only).",
        ),
    ),
    "pbs": dict(_BATCH_KEYS, queue=Key(_text, "", "Queue for qsub -q.")),
    "sge": dict(
        _BATCH_KEYS,
        pe=Key(_text, "smp", "Parallel environment for multi-core jobs (qsub -pe <pe> N)."),
        memory_complex=Key(_text, "h_vmem", "Complex that memoryPerCore is requested with (qsub -l <complex>=<M>M); empty: none."),
        queue=Key(_text, "", "Queue for qsub -q."),
        project=Key(_text, "", "Project for qsub -P."),
    ),
}


def load(path, environ=None):
    """
    Read and check a configuration file.

    @return: a namespace with one namespace per section (C{config.platform.url},
        C{config.agent.max_tasks}, ...), plus C{config.path} and
        C{config.platform.token} holding the token itself.
    @raise ConfigError: with a one-line message naming file, section and key.
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";",), default_section="\0none"
    )
    parser.optionxform = str
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration file is not UTF-8 text") from None
    except configparser.Error as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"{path}: {message}") from None
    return from_parser(parser, path)


def from_parser(parser, path):
    config = SimpleNamespace(path=path)
    for section in parser.sections():
        if section not in SCHEMA:
            known = ", ".join(f"[{s}]" for s in SCHEMA)
            raise ConfigError(f"{path}: [{section}]: unknown section (known: {known})")

    def section_values(section, keys, present):
        values = {}
        for key, value in present.items():
            if key not in keys:
                known = ", ".join(sorted(keys))
                raise ConfigError(f"{path}: [{section}] {key}: unknown key (known: {known})")
        for key, spec in keys.items():
            if key in present:
                try:
                    values[key] = spec.parse(present[key])
                except ValueError as e:
                    raise ConfigError(
                        f"{path}: [{section}] {key}: bad value {present[key].strip()!r}: {e}"
                    ) from None
            elif spec.default is REQUIRED:
                raise ConfigError(f"{path}: [{section}] {key}: missing; this key is required")
            else:
                values[key] = spec.default
        return values

    for section, keys in SCHEMA.items():
        present = dict(parser.items(section)) if parser.has_section(section) else {}
        if section == "platform" and not parser.has_section(section):
            present = {"url": ""}  # replaced by None below (passive mode only)
        if section == "handler":
            raw = present.get("type", "local")
            try:
                handler_type = _handler_type(raw)
            except ValueError as e:
                raise ConfigError(f"{path}: [handler] type: bad value {raw.strip()!r}: {e}") from None
            keys = dict(keys, **HANDLER_KEYS[handler_type])
        setattr(config, section, SimpleNamespace(**section_values(section, keys, present)))

    if not parser.has_section("platform"):
        config.platform = None
        if not config.passive.enabled:
            raise ConfigError(
                f"{path}: neither [platform] (active mode) nor [passive] enabled = yes (passive mode): "
                "the agent would have no one to take tasks from"
            )
    else:
        _check_platform(config, path)
    _check_passive(config, path)
    agent = config.agent
    if not agent.hostname:
        agent.hostname = socket.getfqdn()
    if config.pilot.enabled and config.handler.type == "local":
        raise ConfigError(f"{path}: [pilot] enabled: pilot mode needs a batch [handler] type (slurm, torque, pbs or sge)")
    for key in ("work_dir", "state_dir"):
        if not getattr(agent, key):
            raise ConfigError(f"{path}: [agent] {key}: must not be empty")
    return config


def directory_problem(key, path, uid=None):
    """
    What makes C{path} (the [agent] C{key} directory) unsafe, as one line
    naming the directory and the fix, or None.

    It must be owned by the agent's user and not writable by group or
    others; each directory above it must be owned by root or that user and
    not writable by group or others unless sticky (like C{/tmp}), or another
    user could swap the directory or what is in it.  A directory that does
    not exist yet is created by the agent (mode 0700): only its parents are
    checked.
    """
    uid = os.geteuid() if uid is None else uid
    user = _user_name(uid)
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"[agent] {key} {path}: cannot check it: {e.strerror}"
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            return f"[agent] {key} {path}: not a directory; remove it or point [agent] {key} elsewhere"
        if st.st_uid != uid:
            return (f"[agent] {key} {path}: owned by {_user_name(st.st_uid)}, not by the agent's user "
                    f"{user}; fix: chown -R {user} {path} && chmod 700 {path} (or use another directory)")
        if st.st_mode & 0o022:
            return (f"[agent] {key} {path}: writable by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); fix: chmod 700 {path}")
    parent = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            pst = os.stat(parent)
        except OSError:
            pst = None
        if pst is not None:
            if pst.st_uid not in (0, uid):
                return (f"[agent] {key} {path}: the directory above it, {parent}, is owned by "
                        f"{_user_name(pst.st_uid)}, who could replace it; fix: use a directory "
                        f"under one owned by root or {user}")
            if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
                return (f"[agent] {key} {path}: the directory above it, {parent}, is writable by "
                        f"group or others (mode {stat.S_IMODE(pst.st_mode):04o}); fix: chmod go-w {parent}")
        up = os.path.dirname(parent)
        if up == parent:
            return None
        parent = up


def _user_name(uid):
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def check_directories(config):
    """The first L{directory_problem} of C{work_dir} and C{state_dir}, or None."""
    for key in ("state_dir", "work_dir"):
        problem = directory_problem(key, getattr(config.agent, key))
        if problem:
            return problem
    return None


def is_loopback(host):
    """
    Whether C{host} (a URL's host name) is a loopback address: C{localhost},
    or a literal IPv4/IPv6 loopback address.  A name that only looks like
    one (C{127.0.0.1.nip.io}, which any DNS server may resolve anywhere) is
    not.
    """
    host = (host or "").strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SecretFileError(Exception):
    """A secret file that cannot be used, with a message that holds no secret."""


#: Largest secret file read: a token is a line, not a file's worth.
MAX_SECRET_FILE = 4096


def read_secret_file(path, max_size=MAX_SECRET_FILE):
    """
    The stripped text of a file holding a secret (a token).

    The file is opened without following a final symbolic link and without
    blocking (a FIFO does not hang the caller), and checked on its
    descriptor before a byte is read: a regular file, at most C{max_size}
    bytes, that neither its group nor others may read or write.

    @raise SecretFileError: naming what is wrong and the fix, never the
        content.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SecretFileError("no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SecretFileError("is a symbolic link; point the configuration at the file itself") from None
        raise SecretFileError(f"cannot read it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError("not a regular file (a FIFO, device, socket or directory cannot hold a token)")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                f"others can read it (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        if st.st_size > max_size:
            raise SecretFileError(f"{st.st_size} bytes: too big for a token file (at most {max_size})")
        try:
            data = os.read(fd, max_size + 1)
        except OSError as e:
            raise SecretFileError(f"cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise SecretFileError(f"too big for a token file (at most {max_size} bytes)")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError("not UTF-8 text") from None
    if not text:
        raise SecretFileError("the file is empty")
    return text


_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+\Z")


def check_token_text(token, where):
    """
    A token goes into HTTP headers and JSON: printable ASCII, no white
    space.  The message never shows the token, a character of it or where
    in it the problem is.

    @raise ConfigError: otherwise.
    """
    if not _TOKEN_TEXT.match(token):
        raise ConfigError(
            f"{where}: the token must be printable ASCII without white space; "
            "copy it again from the platform"
        )


def _check_platform(config, path):
    platform = config.platform
    parts = urlsplit(platform.url)
    where = f"{path}: [platform] url"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"{where}: {platform.url!r} is not a ws:// or wss:// URL with a host")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}: {platform.url!r} has a bad port") from None
    if parts.scheme == "ws" and not is_loopback(parts.hostname) and not platform.allow_insecure:
        raise ConfigError(
            f"{where}: plain ws:// to {parts.hostname} would send the token unencrypted; "
            "use wss://, or set allow_insecure = yes if you really mean it"
        )
    if platform.ca_file and not os.path.isfile(platform.ca_file):
        raise ConfigError(f"{path}: [platform] ca_file: {platform.ca_file}: no such file")

    if bool(platform.token) == bool(platform.token_file):
        raise ConfigError(
            f"{path}: [platform] token: give exactly one of token and token_file"
            + (" (both are set)" if platform.token else " (neither is set)")
        )
    if platform.token_file:
        where = f"{path}: [platform] token_file: {platform.token_file}"
        try:
            platform.token = read_secret_file(platform.token_file)
        except SecretFileError as e:
            raise ConfigError(f"{where}: {e}") from None
    else:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: [platform] token: the file holds the token inline but others can read it "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}, or use token_file"
            )
    check_token_text(platform.token, f"{path}: [platform] token")


def _check_passive(config, path):
    """Passive mode's tokens file and TLS files: usable, and secret where they must be."""
    passive = config.passive
    passive.tokens = None
    if not passive.enabled:
        return
    from everest_agent.passive.credentials import CredentialError, read_tokens

    if not passive.client_tokens_file:
        raise ConfigError(f"{path}: [passive] client_tokens_file: missing; passive mode needs its clients' tokens")
    try:
        read_secret_file(passive.client_tokens_file, max_size=1 << 20)
        passive.tokens = read_tokens(passive.client_tokens_file)
    except (SecretFileError, CredentialError) as e:
        raise ConfigError(f"{path}: [passive] client_tokens_file: {passive.client_tokens_file}: {e}") from None
    if bool(passive.tls_cert) != bool(passive.tls_key):
        raise ConfigError(f"{path}: [passive] tls_cert: give both tls_cert and tls_key, or neither")
    if passive.tls_cert:
        if not os.path.isfile(passive.tls_cert):
            raise ConfigError(f"{path}: [passive] tls_cert: {passive.tls_cert}: no such file")
        try:
            read_secret_file(passive.tls_key, max_size=1 << 20)
        except SecretFileError as e:
            raise ConfigError(f"{path}: [passive] tls_key: {passive.tls_key}: {e}") from None
