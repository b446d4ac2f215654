"""
C{everest-platform}: run the reference platform in the foreground, logging
to standard output, until interrupted.  Same options as
C{twistd -n everest-platform}.
"""

import sys

from twisted.python import usage


def main(argv=None):
    from everest_agent.platform import tap

    if argv is None:
        argv = sys.argv[1:]
    options = tap.Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"everest-platform: {e}", file=sys.stderr)
        print("Try 'everest-platform --help'.", file=sys.stderr)
        return 2

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.levelWithName(options["log-level"])
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(level)])]
    )
    platform_service = tap.makeService(options, reactor)
    if platform_service.platform.api_token_file:
        print(f"everest-platform: the API token is in {platform_service.platform.api_token_file}", flush=True)
    reactor.callWhenRunning(platform_service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", platform_service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
