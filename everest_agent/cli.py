"""
The C{everest-agent} command.

The agent itself runs under twistd (C{twistd everest-agent --config FILE});
this command holds the tools around it.
"""

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
    if command in ("version", "--version"):
        print(f"everest-agent {__version__}")
        return 0
    sys.stderr.write(f"everest-agent: unknown command {command!r}\n\n{USAGE}")
    return 2
