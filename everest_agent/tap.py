"""
twistd plugin support: C{twistd everest-agent --config agent.ini}.

The configuration's C{[agent] log_level} is applied to everything twistd
logs (see L{filter_log_level}).
"""

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
from twisted.python import usage

from everest_agent import config as agent_config


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Attach this machine to an Everest platform: connect to it over a "
        "WebSocket, run the tasks it sends, report their states. Use twistd's "
        "-n to stay in the foreground, --pidfile and --logfile as usual."
    )
    optParameters = [
        ["config", "c", "/etc/everest-agent/agent.ini", "Path to the agent's configuration file (INI)."],
    ]

    def postOptions(self):
        try:
            self["parsed"] = agent_config.load(self["config"])
        except agent_config.ConfigError as e:
            # One clear line and a non-zero exit, before anything connects
            # (a UsageError would bury it under twistd's whole usage text).
            raise SystemExit(f"everest-agent: {e}") from None
        problem = agent_config.check_directories(self["parsed"])
        if problem:
            raise SystemExit(f"everest-agent: {self['config']}: {problem}")


def filter_log_level(level, beginner=None):
    """
    Make the log observers twistd is about to install skip events less
    important than C{level}.

    twistd calls the plugin's L{makeService} first, then picks its log
    observer (C{--logfile}, standard output with C{-n}, C{--syslog},
    C{--logger}) and hands it to C{globalLogBeginner.beginLoggingTo}; only
    then do services start.  So this wraps that one call: each observer
    twistd passes is put behind a L{FilteringLogObserver} with a
    L{LogLevelFilterPredicate}, whatever the destination, and including
    twistd's own start-up lines and the events buffered before logging
    began.  The wrapper removes itself after that call.

    @param level: a L{LogLevel} or its name (C{"debug"}, C{"info"},
        C{"warn"}, C{"error"}, C{"critical"}).
    @param beginner: the L{LogBeginner} (default: the global one).
    @return: a callable that takes the wrapper away if it was never used.
    """
    if isinstance(level, str):
        level = LogLevel.levelWithName(level)
    beginner = globalLogBeginner if beginner is None else beginner
    original = beginner.beginLoggingTo
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)

    def undo():
        if beginner.__dict__.get("beginLoggingTo") is beginLoggingTo:
            del beginner.beginLoggingTo

    def beginLoggingTo(observers, *args, **kwargs):
        undo()
        filtered = [FilteringLogObserver(observer, [predicate]) for observer in observers]
        return original(filtered, *args, **kwargs)

    beginner.beginLoggingTo = beginLoggingTo
    return undo


def makeService(options):
    from twisted.internet import reactor

    from everest_agent import gcpolicy
    from everest_agent.agent import EverestAgent

    config = options["parsed"]
    filter_log_level(getattr(config.agent, "log_level", "info"))
    gcpolicy.configure()  # this is the agent's process: a long-running server (code imported, no state yet)
    return EverestAgent(config, reactor)
