"""
An optional local HTTP endpoint for monitoring: a page at C{/},
C{/status.json}, C{/healthz} and C{/metrics}.

Off unless the configuration says C{[monitor] listen = 127.0.0.1:9108}.

 - C{/} is a page for people (L{everest_agent.pages}): connection state and
   since when, slots, queued/running/finished tasks, the last failures with
   their reasons, messages awaiting acknowledgement, pilots when there are
   any.  It redraws itself every two seconds from C{/status.json}
   (L{status_snapshot}).

 - C{/healthz} answers 200 with a small JSON object while the agent runs
   (C{connected}, unfinished tasks, unacknowledged messages).  The agent is
   alive even while it is disconnected (it keeps retrying), so this is a
   liveness check; alert on C{everest_agent_connected} for the connection.
 - C{/metrics} is the Prometheus exposition, made by C{prometheus_client}
   (the C{metrics} extra: C{pip install 'everest-agent[metrics]'}).  Without
   it, C{/metrics} answers 501 and says so.

Every figure is read from the agent's live objects when Prometheus scrapes
(L{AgentCollector}), so nothing is counted on the hot paths.  The registry
is the agent's own L{CollectorRegistry}, not the process-wide default one.

The page is rendered in the reactor thread with
C{prometheus_client.exposition.choose_encoder}: not with
C{prometheus_client.twisted.MetricsResource}, a WSGI resource that would
run the collector in a thread pool, reading the agent's state while the
reactor thread changes it.
"""

import json

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web import resource, server

from everest_agent import __version__, pages, protocol
from everest_agent.status import _message_summary, public_url, recent_failures

try:
    import prometheus_client
    from prometheus_client import exposition
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
except ImportError:  # the optional "metrics" extra is not installed
    prometheus_client = None

NOT_INSTALLED = (
    b"/metrics needs the Python package prometheus_client, which is not installed.\n"
    b"Install it in the agent's environment (pip install 'everest-agent[metrics]') "
    b"and restart the agent.\n"
)

#: Task states as labels; NEW is a task recorded but not yet ACCEPTED.
TASK_STATES = ("NEW",) + protocol.STATES


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def handler_poll_figures(handler):
    """
    What a batch handler tells about its scheduler polls, if anything:
    C{(polls, failures, last duration in seconds)}, each None when the
    handler has no such attribute.  Read: C{poll_count} (or C{polls}),
    C{poll_failures}, C{last_poll_duration}.
    """
    polls = _number(getattr(handler, "poll_count", None))
    if polls is None:
        polls = _number(getattr(handler, "polls", None))
    return (
        polls,
        _number(getattr(handler, "poll_failures", None)),
        _number(getattr(handler, "last_poll_duration", None)),
    )


class AgentCollector:
    """A C{prometheus_client} collector reading an L{EverestAgent} at scrape time."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        agent = self.agent
        manager = agent.manager
        outbox = agent.outbox
        status = getattr(agent, "status", None)
        now = agent.wallclock()

        info = InfoMetricFamily("everest_agent", "The agent's version and handler.")
        info.add_metric([], {"version": __version__, "handler": agent.handler.name})
        yield info

        connected = GaugeMetricFamily("everest_agent_connected", "1 while a session with the platform is up (after WELCOME).")
        connected.add_metric([], 1 if agent.sender.connected else 0)
        yield connected

        if status is not None:
            connection = status.connection
            if connection.get("since") is not None:
                since = GaugeMetricFamily(
                    "everest_agent_connection_state_since_seconds",
                    "Unix time of the last change of the connection state (connected or not).",
                )
                since.add_metric([], connection["since"])
                yield since
            if status.data.get("started") is not None:
                started = GaugeMetricFamily("everest_agent_start_time_seconds", "Unix time the agent started.")
                started.add_metric([], status.data["started"])
                yield started
            connects = CounterMetricFamily("everest_agent_connects", "Sessions that reached WELCOME since the agent started.")
            connects.add_metric([], connection["connects"])
            yield connects
            reconnects = CounterMetricFamily(
                "everest_agent_reconnects", "Sessions after the first that reached WELCOME since the agent started."
            )
            reconnects.add_metric([], connection["reconnects"])
            yield reconnects

        counts = dict.fromkeys(TASK_STATES, 0)
        for record in manager.registry.records.values():
            state = record.get("state") or "NEW"
            counts[state] = counts.get(state, 0) + 1
        tasks = GaugeMetricFamily(
            "everest_agent_tasks",
            "Tasks the agent knows, by state (finished ones stay known for a while after their report is acknowledged).",
            labels=["state"],
        )
        for state, count in counts.items():
            tasks.add_metric([state], count)
        yield tasks

        pool = manager.pool
        slots = GaugeMetricFamily("everest_agent_slots", "Slots (max_tasks).")
        slots.add_metric([], pool.capacity)
        yield slots
        busy = GaugeMetricFamily("everest_agent_slots_busy", "Slots held by tasks.")
        busy.add_metric([], pool.used)
        yield busy
        waiting = GaugeMetricFamily("everest_agent_tasks_waiting_for_slot", "Tasks waiting for free slots.")
        waiting.add_metric([], pool.queued)
        yield waiting

        depth = GaugeMetricFamily("everest_agent_outbox_pending", "Reliable messages not yet acknowledged by the platform.")
        depth.add_metric([], len(outbox))
        yield depth
        last = GaugeMetricFamily("everest_agent_outbox_last_seq", "Highest sequence number given to a reliable message.")
        last.add_metric([], outbox.last_seq)
        yield last
        acked = GaugeMetricFamily("everest_agent_outbox_acked_seq", "Highest sequence number the platform acknowledged.")
        acked.add_metric([], outbox.acked)
        yield acked
        oldest = outbox.oldest()
        age = GaugeMetricFamily(
            "everest_agent_outbox_oldest_pending_age_seconds",
            "Age of the oldest unacknowledged TASK_STATE (0 when nothing is pending).",
        )
        when = None
        if oldest is not None:
            message = oldest[1]
            if isinstance(message, list) and len(message) > 3 and isinstance(message[3], dict):
                when = _number(message[3].get("time"))
        age.add_metric([], max(0.0, now - when) if when is not None else 0.0)
        yield age

        sent = CounterMetricFamily("everest_agent_messages_sent", "Messages sent to the platform (re-sends included).")
        sent.add_metric([], _number(getattr(agent.sender, "sent", 0)) or 0)
        yield sent
        reports = CounterMetricFamily("everest_agent_resource_reports", "RESOURCE_STATE messages sent.")
        reports.add_metric([], _number(getattr(agent.monitor, "sent", 0)) or 0)
        yield reports

        transferred = CounterMetricFamily(
            "everest_agent_transfer_bytes",
            "Bytes moved by file transfers: in = inputs downloaded, out = outputs uploaded. "
            "Rates: rate(everest_agent_transfer_bytes_total[5m]).",
            labels=["direction"],
        )
        stager = agent.stager
        transferred.add_metric(["in"], _number(getattr(stager, "bytes_in", 0)) or 0)
        transferred.add_metric(["out"], _number(getattr(stager, "bytes_out", 0)) or 0)
        yield transferred

        pilot_summary = getattr(agent.handler, "pilot_summary", None)
        if pilot_summary is not None:  # pilot mode
            pilots = pilot_summary()
            family = GaugeMetricFamily("everest_agent_pilots", "Pilot jobs by state.", labels=["state"])
            for state in ("submitting", "pending", "starting", "running", "draining", "away", "unreachable"):
                family.add_metric([state], sum(1 for p in pilots if p["state"] == state))
            yield family
            family = GaugeMetricFamily("everest_agent_pilot_cores", "Cores of the pilots: used, and total.",
                                       labels=["kind"])
            family.add_metric(["used"], sum(p["coresUsed"] for p in pilots))
            family.add_metric(["total"], sum(p["coresTotal"] for p in pilots))
            yield family

        polls, failures, duration = handler_poll_figures(agent.handler)
        if polls is not None:
            family = CounterMetricFamily("everest_agent_scheduler_polls", "Scheduler status polls done.")
            family.add_metric([], polls)
            yield family
        if failures is not None:
            family = CounterMetricFamily(
                "everest_agent_scheduler_poll_failures", "Scheduler status polls that failed (command error or timeout)."
            )
            family.add_metric([], failures)
            yield family
        if duration is not None:
            family = GaugeMetricFamily("everest_agent_scheduler_last_poll_duration_seconds", "How long the last scheduler poll took.")
            family.add_metric([], duration)
            yield family


def make_registry(agent, process=True):
    """The agent's own L{CollectorRegistry}: its collector and, on Linux, the process's."""
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    if process:
        prometheus_client.ProcessCollector(registry=registry)
    return registry


class MetricsPage(resource.Resource):
    isLeaf = True

    def __init__(self, agent):
        super().__init__()
        self.agent = agent
        self._registry = None

    @property
    def registry(self):
        if self._registry is None:
            self._registry = make_registry(self.agent)
        return self._registry

    def render_GET(self, request):
        if prometheus_client is None:
            request.setResponseCode(501)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return NOT_INSTALLED
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = exposition.choose_encoder(accept)
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return body


class HealthPage(resource.Resource):
    isLeaf = True

    def __init__(self, agent):
        super().__init__()
        self.agent = agent

    def render_GET(self, request):
        agent = self.agent
        status = getattr(agent, "status", None)
        body = {
            "status": "ok",
            "version": __version__,
            "connected": agent.sender.connected,
            "since": status.connection.get("since") if status is not None else None,
            "tasks": agent.manager.unfinished(),
            "outbox": len(agent.outbox),
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"


#: How the page groups task states.
QUEUED_STATES = frozenset(("NEW", protocol.ACCEPTED, protocol.STAGING_IN, protocol.QUEUED))
RUNNING_STATES = frozenset((protocol.RUNNING, protocol.STAGING_OUT, protocol.STAGED_OUT))

#: Failed tasks listed on the page.
PAGE_FAILURES = 10


def status_snapshot(agent):
    """
    What the page shows, as a JSON-able dict, read from the live agent.

    C{pilots} is there only when the agent has pilots to show: a list of
    objects from C{agent.pilot_summary()}, if the agent has that method and
    it returns a list.
    """
    manager = agent.manager
    outbox = agent.outbox
    pool = manager.pool
    now = agent.wallclock()
    status = getattr(agent, "status", None)
    by_state = {}
    for record in manager.registry.records.values():
        state = record.get("state") or "NEW"
        by_state[state] = by_state.get(state, 0) + 1
    connection = dict(status.connection) if status is not None else {}
    connection["connected"] = agent.sender.connected
    oldest = outbox.oldest()
    snapshot = {
        "version": __version__,
        "hostname": agent.config.agent.hostname,
        "handler": agent.handler.name,
        "platform": public_url(agent.config.platform.url) if agent.config.platform else None,
        "started": status.data.get("started") if status is not None else None,
        "connection": connection,
        "slots": {"total": pool.capacity, "busy": pool.used, "waiting": pool.queued},
        "tasks": {
            "queued": sum(n for s, n in by_state.items() if s in QUEUED_STATES),
            "running": sum(n for s, n in by_state.items() if s in RUNNING_STATES),
            "finished": sum(n for s, n in by_state.items() if s in protocol.TERMINAL),
            "by_state": by_state,
        },
        "failures": recent_failures(manager.registry.records, PAGE_FAILURES),
        "outbox": {
            "pending": len(outbox),
            "last_seq": outbox.last_seq,
            "acked": outbox.acked,
            "oldest": _message_summary(*oldest, now) if oldest is not None else None,
        },
        "time": now,
    }
    pilots = getattr(agent, "pilot_summary", None)
    pilots = pilots() if callable(pilots) else None
    if isinstance(pilots, list):
        snapshot["pilots"] = pilots
    return snapshot


class StatusPage(resource.Resource):
    isLeaf = True

    def __init__(self, agent):
        super().__init__()
        self.agent = agent

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(status_snapshot(self.agent)).encode() + b"\n"


def make_root(agent):
    root = resource.Resource()
    root.putChild(b"", pages.StaticFile("monitor.html"))
    root.putChild(b"static", pages.static_resource())
    root.putChild(b"status.json", StatusPage(agent))
    root.putChild(b"healthz", HealthPage(agent))
    root.putChild(b"metrics", MetricsPage(agent))
    return root


class MonitorService(Service):
    """
    Serves L{make_root} on C{address} (C{(host, port)}) while the agent runs.

    A port that cannot be bound is logged as an error and the agent runs on
    without the endpoint: monitoring must not stop the tasks.

    @ivar url: C{http://host:port} once listening, else None.
    """

    log = Logger()

    def __init__(self, agent, address, reactor):
        self.agent = agent
        self.address = address
        self.reactor = reactor
        self.port = None
        self.url = None

    def startService(self):
        super().startService()
        host, port = self.address
        site = server.Site(make_root(self.agent))
        site.noisy = False
        site.displayTracebacks = False
        try:
            self.port = self.reactor.listenTCP(port, site, interface=host)
        except Exception as e:  # CannotListenError, bad address
            self.log.error(
                "Cannot serve the monitor endpoint on {host}:{port}: {error}; "
                "running without it (fix [monitor] listen)",
                host=host, port=port, error=e,
            )
            return
        bound = self.port.getHost()
        shown = f"[{bound.host}]" if ":" in bound.host else bound.host
        self.url = f"http://{shown}:{bound.port}"
        if prometheus_client is None:
            self.log.warn(
                "Monitor endpoint on {url}: /healthz only; /metrics needs prometheus_client "
                "(pip install 'everest-agent[metrics]')",
                url=self.url,
            )
        else:
            self.log.info("Monitor page on {url}/, metrics on {url}/metrics, health on {url}/healthz", url=self.url)
        status = getattr(self.agent, "status", None)
        if status is not None:
            status.data["monitor"] = self.url
            status.write()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
