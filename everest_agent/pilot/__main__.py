"""
C{python -m everest_agent.pilot}: the worker a pilot job runs.

The agent writes the command line into the pilot's job script; the secret
is read from a file only the agent's user can read (never from the command
line, which every user of the node can see).
"""

import argparse
import os
import stat
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m everest_agent.pilot")
    parser.add_argument("--agent", required=True, help="HOST:PORT of the agent's pilot port")
    parser.add_argument("--pilot-id", required=True)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--cores", type=int, required=True)
    parser.add_argument("--walltime", type=float, required=True)
    parser.add_argument("--kill-grace", type=float, default=10.0)
    parser.add_argument("--reconnect-for", type=float, default=600.0)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    return parser.parse_args(argv)


def read_secret(path):
    """The secret in C{path}, which must be readable by its owner only."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: others can read it (mode {stat.S_IMODE(st.st_mode):04o})")
    with open(path, encoding="ascii") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"{path}: empty")
    return secret


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    host, _, port = args.agent.rpartition(":")
    try:
        secret = read_secret(args.secret_file)
    except (OSError, ValueError) as e:
        print(f"everest pilot: cannot read the secret: {e}", file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    from twisted.internet import reactor

    from everest_agent.pilot.runner import run

    run(reactor, host.strip("[]"), int(port), args.pilot_id, secret, args.cores, args.walltime,
        kill_grace=args.kill_grace, reconnect_for=args.reconnect_for, heartbeat=args.heartbeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
