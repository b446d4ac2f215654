"""
What the agent is doing, readable from outside the process.

Two halves:

 - L{StatusFile}, used by the running agent: it records the connection's
   state (and since when, how many reconnects, the last close or failure)
   in C{state_dir/status.json}, replaced atomically (temporary file, then
   rename) with mode 0600 at each change.  Changes are rare (a connection
   event, not a task event), so this costs nothing on the hot paths.  The
   token is never written; the platform URL is written without any user
   name, password or query string.

 - L{read_state}, used by C{everest-agent status} (and C{check}): it reads
   the state directory without changing anything in it, whether the agent
   runs or not.  The journals (C{tasks.jsonl}, C{outbox.jsonl}) are read
   and merged the way L{everest_agent.registry.TaskRegistry} and
   L{everest_agent.outbox.Outbox} do, but never compacted or rewritten:
   only the running agent may do that.  Whether the agent runs is told by
   its lock on C{state_dir/lock} (see L{lock_holder}).
"""

import json
import os
import sys
import time

from twisted.logger import Logger

from everest_agent import __version__, protocol
from everest_agent.statedir import read_outbox, read_registry
from everest_agent.transfer.urls import public_url

STATUS_FILE = "status.json"
LOCK_FILE = "lock"

#: Connection states recorded in status.json.
STARTING = "starting"
CONNECTED = "connected"
DISCONNECTED = "disconnected"
STOPPED = "stopped"


def write_private_atomically(path, data):
    """Replace C{path} with C{data} (bytes): a 0600 temporary file, then rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class StatusFile:
    """
    The running agent's C{status.json}.

    The agent calls L{starting}, L{welcomed}, L{lost}, L{closed},
    L{failed} and L{stopped}; each call rewrites the file.  A write that
    fails (disk full) is logged and otherwise ignored: the status file is
    for people, nothing depends on it.

    @ivar connects: sessions that reached C{WELCOME} since the agent started.
    @ivar reconnects: those after the first.
    """

    log = Logger()

    def __init__(self, state_dir, url, wallclock=time.time, pid=None, extra=None):
        self.path = os.path.join(state_dir, STATUS_FILE)
        self._time = wallclock
        self.data = {
            "pid": os.getpid() if pid is None else pid,
            "version": __version__,
            "started": None,
            "updated": None,
            "platform": public_url(url),
            "connection": {
                "state": STARTING,
                "since": None,
                "connects": 0,
                "reconnects": 0,
                "disconnects": 0,
                "last_welcome": None,
                "last_close": None,
                "last_failure": None,
            },
        }
        self.data.update(extra or {})

    @property
    def connection(self):
        return self.data["connection"]

    @property
    def connects(self):
        return self.connection["connects"]

    @property
    def reconnects(self):
        return self.connection["reconnects"]

    def _set_state(self, state):
        connection = self.connection
        if connection["state"] != state or connection["since"] is None:
            connection["state"] = state
            connection["since"] = self._time()

    def starting(self, **extra):
        """The agent starts (state directory locked); C{extra} is recorded as is."""
        self.data.update(extra)
        self.data["pid"] = os.getpid() if self.data.get("pid") is None else self.data["pid"]
        self.data["started"] = self._time()
        self.connection["state"] = STARTING
        self.connection["since"] = self.data["started"]
        self.write()

    def welcomed(self, ack=None, heartbeat=None):
        connection = self.connection
        connection["connects"] += 1
        connection["reconnects"] = max(0, connection["connects"] - 1)
        connection["last_welcome"] = {"time": self._time(), "ack": ack, "heartbeat": heartbeat}
        self._set_state(CONNECTED)
        self.write()

    def lost(self):
        """A session that had reached C{WELCOME} ended."""
        if self.connection["state"] == CONNECTED:
            self.connection["disconnects"] += 1
        self._set_state(DISCONNECTED)
        self.write()

    def closed(self, code, reason):
        """A connection closed (welcomed or not) with WebSocket C{code}."""
        self.connection["last_close"] = {
            "time": self._time(),
            "code": code,
            "reason": protocol.CLOSE_REASONS.get(code) or (reason or "")[:200],
        }
        if self.connection["state"] != CONNECTED:
            self._set_state(DISCONNECTED)
        self.write()

    def failed(self, reason):
        """A connection attempt failed before the WebSocket opened."""
        self.connection["last_failure"] = {"time": self._time(), "reason": str(reason)[:300]}
        if self.connection["state"] != CONNECTED:
            self._set_state(DISCONNECTED)
        self.write()

    def stopped(self):
        self._set_state(STOPPED)
        self.write()

    def write(self):
        self.data["updated"] = self._time()
        try:
            write_private_atomically(self.path, json.dumps(self.data, indent=1, sort_keys=True).encode() + b"\n")
        except OSError as e:
            self.log.warn("Cannot write {path}: {error}", path=self.path, error=e.strerror or str(e))


# -- reading the state directory (never writing it) ----------------------------


def _lock_file_pid(path):
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(state_dir, proc_locks="/proc/locks"):
    """
    Whether an agent holds the state directory's lock, without touching it.

    Taking the lock, even for an instant, could make an agent starting at
    that moment fail ("another agent is using the state directory"), so it
    is looked up instead: on Linux in C{/proc/locks} (an C{FLOCK} on the
    lock file's inode); elsewhere by the pid the agent wrote in the lock
    file, if that process is alive.

    @return: C{(running, pid)}: C{running} is True, False, or None when it
        cannot be told; C{pid} is the agent's (or the last agent's) pid, or
        None.
    """
    path = os.path.join(state_dir, LOCK_FILE)
    pid = _lock_file_pid(path)
    try:
        st = os.stat(path)
    except OSError:
        return False, None
    try:
        with open(proc_locks, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = None
    if lines is not None:
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        for line in lines:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 3568 fd:00:2531452 0 EOF" (blocked
            # waiters show "->" as an extra field).
            if "->" in fields:
                continue
            if len(fields) < 6 or fields[1] != "FLOCK":
                continue
            dev_major, _, rest = fields[5].partition(":")
            dev_minor, _, inode = rest.partition(":")
            if inode != str(st.st_ino):
                continue
            holder = int(fields[4]) if fields[4].isdigit() else None
            # Some file systems (overlays) show another device than stat():
            # then the pid the agent wrote must match.
            if f"{dev_major}:{dev_minor}" == device or (holder is not None and holder == pid):
                return True, holder if holder else pid
        return False, pid
    if pid is None:
        return None, None
    return (True if _pid_alive(pid) else False), pid


def hello_tasks(records, acked):
    """
    The C{HELLO} task list the agent would send with this state on disk:
    the tasks not finished, or finished with a report not yet acknowledged
    (as L{everest_agent.manager.TaskManager} computes it at start);
    passive clients' tasks are never in it.
    """
    listed = []
    for task_id, record in records.items():
        if record.get("owner") is not None:
            continue  # a passive client's task: never named to the platform
        if record.get("finished"):
            seq = record.get("terminal_seq")
            if seq is not None and seq <= acked:
                continue
        listed.append(task_id)
    return sorted(listed)


def read_status_file(state_dir):
    try:
        with open(os.path.join(state_dir, STATUS_FILE), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _message_summary(seq, message, now):
    summary = {"seq": seq}
    if isinstance(message, list) and message:
        summary["type"] = message[0]
        if len(message) > 1 and isinstance(message[1], str):
            summary["task_id"] = message[1]
        if message[0] == protocol.TASK_STATE and len(message) > 3 and isinstance(message[3], dict):
            summary["state"] = message[2]
            when = message[3].get("time")
            if isinstance(when, (int, float)):
                summary["time"] = when
                summary["age"] = max(0.0, now - when)
    return summary


def recent_failures(records, count):
    """
    The C{count} most recently finished of the FAILED tasks in C{records}
    (C{{task id: registry record}}), newest first, with their reasons.
    """
    failed = []
    for task_id, record in records.items():
        if record.get("state") != protocol.FAILED:
            continue
        info = record.get("info") or {}
        job = record.get("job") or {}
        failed.append({
            "task_id": task_id,
            "reason": info.get("reason") or record.get("failure") or "",
            "exit_code": info.get("exitCode"),
            "job_id": info.get("jobId") or (job.get("id") if job.get("batch") else None),
            "created": record.get("created"),
            "finished": record.get("finished_at") or record.get("finished_time"),
        })
    failed.sort(key=lambda f: (f["finished"] or f["created"] or 0), reverse=True)
    return failed[:count]


def read_state(state_dir, now=None, failures=5, proc_locks="/proc/locks"):
    """
    Everything C{everest-agent status} shows, as a JSON-able dict.

    @param failures: how many of the most recent failed tasks to list.
    @raise OSError: if the state directory cannot be read at all.
    """
    now = time.time() if now is None else now
    os.listdir(state_dir)  # raises if missing or unreadable
    running, pid = lock_holder(state_dir, proc_locks)
    status = read_status_file(state_dir)
    records = read_registry(state_dir)
    pending, last_seq, acked = read_outbox(state_dir)

    by_state = {}
    unfinished = 0
    dirs_kept = dirs_removed = 0  # of finished tasks (see retention.py)
    for record in records.values():
        state = record.get("state") or "NEW"
        by_state[state] = by_state.get(state, 0) + 1
        if not record.get("finished"):
            unfinished += 1
        elif record.get("dir_removed"):
            dirs_removed += 1
        else:
            dirs_kept += 1

    connection = dict((status or {}).get("connection") or {})
    if running is False and connection.get("state") not in (None, STOPPED):
        # The agent died without saying so: its last word is stale.
        connection["state"] = STOPPED
        connection["stale"] = True
    result = {
        "state_dir": state_dir,
        "running": running,
        "pid": pid,
        "agent": status,
        "connection": connection or None,
        "tasks": {
            "total": len(records),
            "unfinished": unfinished,
            "by_state": dict(sorted(by_state.items(), key=lambda kv: protocol.STATE_RANK.get(kv[0], -1))),
        },
        "task_dirs": {
            "kept": dirs_kept,
            "removed": dirs_removed,
            "policy": (status or {}).get("keep_task_dirs"),
        },
        "outbox": {
            "pending": len(pending),
            "last_seq": last_seq,
            "acked": acked,
            "oldest": _message_summary(*pending[0], now) if pending else None,
        },
        "failures": recent_failures(records, failures),
        "time": now,
    }
    return result


# -- the human form -----------------------------------------------------------------


def _when(t, now):
    if not isinstance(t, (int, float)):
        return "?"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{stamp} ({_duration(now - t)} ago)"


def _duration(seconds):
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds // 60 % 60} min"
    return f"{seconds // 86400} d {seconds // 3600 % 24} h"


def _pilot_lines(agent):
    """Pilot mode: one line per pilot, and a warning for pilots that never connected back."""
    pilots = agent.get("pilots")
    if not isinstance(pilots, dict):
        return []
    listed = pilots.get("pilots") or []
    lines = [f"pilots: {len(listed)}"]
    for p in listed:
        lines.append(f"  pilot {p.get('id')}: job {p.get('jobId') or '-'}, {p.get('state')}, "
                     f"{p.get('coresUsed')}/{p.get('coresTotal')} cores used, {p.get('tasks')} tasks")
    if pilots.get("unreachable"):
        lines.append(f"  WARNING: {pilots['unreachable']} pilot job(s) ran but never connected back to "
                     f"{pilots.get('address')}; check [pilot] advertise_address and firewalls")
    return lines


def format_state(state):
    """The lines C{everest-agent status} prints for L{read_state}'s result."""
    now = state["time"]
    lines = []
    agent = state["agent"] or {}
    running, pid = state["running"], state["pid"]
    if running:
        started = agent.get("started") if agent.get("pid") == pid else None
        since = f", started {_when(started, now)}" if started else ""
        lines.append(f"agent: running, pid {pid}{since}")
    elif running is None:
        lines.append(f"agent: unknown (cannot tell whether pid {pid} is the agent)")
    else:
        last = f" (last pid {pid})" if pid else ""
        lines.append(f"agent: not running{last}")
    if agent.get("version"):
        lines.append(f"version: everest-agent {agent['version']}, handler {agent.get('handler', '?')}, "
                     f"{agent.get('slots', '?')} slots")
    if agent.get("platform"):
        lines.append(f"platform: {agent['platform']}")
    if agent.get("passive"):
        lines.append(f"passive mode: on, listening on {agent['passive']}")
    lines.extend(_pilot_lines(agent))
    connection = state["connection"]
    if connection:
        text = f"connection: {connection.get('state')} since {_when(connection.get('since'), now)}"
        if connection.get("stale"):
            text = f"connection: none (the agent is not running; last recorded {_when(agent.get('updated'), now)})"
        count = connection.get("reconnects", 0)
        text += f"; {count} reconnect{'s' if count != 1 else ''}"
        lines.append(text)
        close = connection.get("last_close")
        if close:
            lines.append(f"last close: code {close.get('code')} ({close.get('reason') or 'no reason'}) "
                         f"at {_when(close.get('time'), now)}")
        failure = connection.get("last_failure")
        if failure and connection.get("state") != CONNECTED:
            lines.append(f"last connection failure: {failure.get('reason')} at {_when(failure.get('time'), now)}")
    else:
        lines.append("connection: unknown (no status.json: the agent has not run with this state directory "
                     "since it learnt to write one)")
    tasks = state["tasks"]
    if tasks["total"]:
        parts = ", ".join(f"{n} {s}" for s, n in tasks["by_state"].items())
        lines.append(f"tasks: {tasks['unfinished']} unfinished of {tasks['total']} known ({parts})")
    else:
        lines.append("tasks: none known")
    dirs = state.get("task_dirs") or {}
    if dirs.get("kept") or dirs.get("removed"):
        policy = f" (keep_task_dirs = {dirs['policy']})" if dirs.get("policy") else ""
        lines.append(f"task directories: {dirs['kept']} of finished tasks kept{policy}, "
                     f"{dirs['removed']} removed; plus one per unfinished task")
    outbox = state["outbox"]
    if outbox["pending"]:
        oldest = outbox["oldest"]
        what = oldest.get("type", "?")
        if "task_id" in oldest:
            what += f" {oldest['task_id']}"
        if "state" in oldest:
            what += f" {oldest['state']}"
        age = f", {_duration(oldest['age'])} old" if "age" in oldest else ""
        lines.append(f"outbox: {outbox['pending']} messages not acknowledged; oldest seq {oldest['seq']} "
                     f"({what}{age})")
    else:
        lines.append(f"outbox: every message acknowledged (last seq {outbox['last_seq']})")
    if state["failures"]:
        lines.append("recent failures:")
        for f in state["failures"]:
            extra = []
            if f.get("exit_code") is not None and f"exit code {f['exit_code']}" not in (f["reason"] or ""):
                extra.append(f"exit code {f['exit_code']}")
            if f.get("job_id"):
                extra.append(f"job {f['job_id']}")
            when = f.get("finished") or f.get("created")
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if isinstance(when, (int, float)) else "?"
            suffix = f" [{', '.join(extra)}]" if extra else ""
            lines.append(f"  {f['task_id']}  {stamp}  {f['reason']}{suffix}")
    monitor = agent.get("monitor")
    if monitor and running:
        lines.append(f"monitor: {monitor}/metrics, {monitor}/healthz")
    return lines


# -- the command ---------------------------------------------------------------------


def state_dir_from_config(path):
    """
    C{[agent] state_dir} of the configuration file C{path}, read leniently:
    C{status} must work for someone who may not read the token file.

    @raise everest_agent.config.ConfigError: if the file cannot be read.
    """
    import configparser

    from everest_agent import config as agent_config

    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";",), default_section="\0none"
    )
    parser.optionxform = str
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise agent_config.ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise agent_config.ConfigError(f"{path}: cannot read the configuration file: {e}") from None
    key = agent_config.SCHEMA["agent"]["state_dir"]
    if parser.has_option("agent", "state_dir") and parser.get("agent", "state_dir").strip():
        return key.parse(parser.get("agent", "state_dir"))
    return key.default


#: Exit statuses of ``everest-agent status``.
EXIT_CONNECTED, EXIT_DISCONNECTED, EXIT_ERROR, EXIT_NOT_RUNNING = 0, 1, 2, 3


def exit_status(state):
    if not state["running"]:
        return EXIT_NOT_RUNNING
    if (state["connection"] or {}).get("state") == CONNECTED:
        return EXIT_CONNECTED
    return EXIT_DISCONNECTED


USAGE = """\
Show what the agent is doing, from its state directory (whether it runs or
not): the connection and since when, tasks by state, the oldest message the
platform has not acknowledged, the latest failures and why.

Exit status: 0 running and connected, 1 running but not connected,
3 not running, 2 the state could not be read.
"""


def main(argv, out=None, err=None):
    import argparse

    from everest_agent import config as agent_config

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = argparse.ArgumentParser(prog="everest-agent status", description=USAGE)
    parser.add_argument("--config", "-c", default="/etc/everest-agent/agent.ini")
    parser.add_argument("--state-dir", help="read this state directory (instead of the config's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    parser.add_argument("--failures", type=int, default=5, help="how many recent failures to list (default 5)")
    args = parser.parse_args(argv)
    try:
        state_dir = args.state_dir or state_dir_from_config(args.config)
        state = read_state(os.path.abspath(state_dir), failures=args.failures)
    except agent_config.ConfigError as e:
        err.write(f"everest-agent status: {e}\n")
        return EXIT_ERROR
    except FileNotFoundError:
        if args.json:
            out.write(json.dumps({"state_dir": state_dir, "running": False, "exists": False}) + "\n")
        else:
            out.write(f"agent: not running (no state directory {state_dir}: the agent never ran with it)\n")
        return EXIT_NOT_RUNNING
    except OSError as e:
        err.write(f"everest-agent status: cannot read the state directory {state_dir}: {e.strerror or e}\n")
        return EXIT_ERROR
    if args.json:
        out.write(json.dumps(state, indent=1, sort_keys=True) + "\n")
    else:
        out.write("\n".join(format_state(state)) + "\n")
    return exit_status(state)
