"""
The C{everest-agent} command.

The agent itself runs under twistd (C{twistd everest-agent --config FILE});
this command holds the tools around it.
"""

import argparse
import os
import sys

from everest_agent import __version__

USAGE = f"""\
usage: everest-agent COMMAND [options]

commands:
  check     check the configuration, directories, scheduler commands and a
            real HELLO/WELCOME with the platform (--config FILE)
  status    what the agent is doing: connection, tasks, unacknowledged
            messages, recent failures (--config FILE, --json)
  demo      run a parameter sweep through a reference platform and an agent
            on this machine (loopback only), with a live progress line and
            the platform's page to watch it in a browser (--tasks N; --keep
            leaves both running to look and submit more tasks)
  import-config  print the agent.ini equivalent to an old Everest agent's
            JSON agent.conf; tokens go to files of mode 0600 in --out-dir
            (default: here; --force overwrites them; --periods auto|s|ms)
  version   print the version ({__version__})

The agent runs as a twistd plugin:
  twistd everest-agent --config /etc/everest-agent/agent.ini   (daemon)
  twistd -n everest-agent --config agent.ini                   (foreground)
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "check":
        from everest_agent import check

        return check.main(rest)
    if command == "status":
        from everest_agent import status

        return status.main(rest)
    if command == "demo":
        from everest_agent import demo

        return demo.main(rest)
    if command == "import-config":
        return import_config(rest)
    if command in ("version", "--version"):
        print(f"everest-agent {__version__}")
        return 0
    sys.stderr.write(f"everest-agent: unknown command {command!r}\n\n{USAGE}")
    return 2


def import_config(argv):
    """Read agent.conf, write its tokens (mode 0600), print the INI; notes go to stderr."""
    from everest_agent import importconfig

    parser = argparse.ArgumentParser(prog="everest-agent import-config")
    parser.add_argument("conf")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--periods", choices=("auto", "s", "ms"), default="auto")
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    try:
        try:
            with open(args.conf, "rb") as f:
                text = f.read(1 << 20).decode("utf-8")
        except OSError as e:
            raise importconfig.ImportConfigError(f"{args.conf}: cannot read it: {e.strerror}") from None
        except UnicodeDecodeError:
            raise importconfig.ImportConfigError(f"{args.conf}: not UTF-8 text") from None
        data = importconfig.parse_json(text, args.conf)
        result = importconfig.convert(data, out_dir, args.conf, args.periods)
        targets = [(os.path.join(out_dir, s.name), s.text) for s in result.secrets]
        if targets and not os.path.isdir(out_dir):
            raise importconfig.ImportConfigError(f"--out-dir {out_dir}: no such directory")
        for path, _ in targets:
            if os.path.lexists(path) and not args.force:
                raise importconfig.ImportConfigError(f"{path}: exists; remove it or give --force")
        for path, secret in targets:
            _write_secret(path, secret)
    except importconfig.ImportConfigError as e:
        sys.stderr.write(f"everest-agent import-config: {e}\n")
        return 1
    for note in result.notes:
        sys.stderr.write(f"everest-agent import-config: {note}\n")
    for path, _ in targets:
        sys.stderr.write(f"everest-agent import-config: wrote {path} (mode 0600)\n")
    sys.stdout.write(result.ini)
    return 0


def _write_secret(path, text):
    """Write a new file of mode 0600 next to C{path}, then rename it over (never through a link)."""
    from everest_agent.importconfig import ImportConfigError

    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise ImportConfigError(f"{path}: cannot write it: {e.strerror}") from None
