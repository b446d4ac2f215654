// The agent's page: figures from status.json (same origin), redrawn every 2 s.
"use strict";

(() => {
  const {el, setText, duration, clock, ago, badge, getJSON, poll} = everest;

  function rows(tbody, items, columns, empty) {
    if (!items.length) {
      tbody.replaceChildren(el("tr", {}, el("td", {class: "empty", colspan: columns}, empty)));
    } else {
      tbody.replaceChildren(...items);
    }
  }

  function pilotValue(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function showPilots(pilots) {
    const section = document.getElementById("pilots-section");
    if (!Array.isArray(pilots)) { section.hidden = true; return; }
    section.hidden = false;
    setText("pilots-count", "(" + pilots.length + ")");
    const keys = [];
    for (const pilot of pilots) {
      for (const key of Object.keys(pilot || {})) if (!keys.includes(key)) keys.push(key);
    }
    document.getElementById("pilots-head").replaceChildren(...keys.map((key) => el("th", {}, key)));
    rows(document.getElementById("pilots"),
      pilots.map((pilot) => el("tr", {}, ...keys.map((key) => {
        const value = (pilot || {})[key];
        return el("td", {class: key === "state" ? "" : (typeof value === "number" ? "num" : "")},
          key === "state" && typeof value === "string" ? badge(value) : pilotValue(value));
      }))), Math.max(1, keys.length), "no pilots");
  }

  function render(data) {
    const now = data.time;
    document.title = "everest-agent " + (data.hostname || "");
    setText("hostname", data.hostname);
    setText("version", "version " + data.version);
    setText("handler", data.handler + " handler");
    setText("platform", data.platform);

    const connection = data.connection || {};
    const state = connection.state || "unknown";
    document.getElementById("connection").replaceChildren(badge(state));
    setText("connection-since", connection.since ? "since " + clock(connection.since) + " (" + ago(connection.since, now) + ")" +
      (connection.reconnects ? ", " + connection.reconnects + " reconnects" : "") : "");

    const slots = data.slots;
    setText("slots", slots.busy + " / " + slots.total);
    document.getElementById("slots-bar").style.width = (slots.total ? 100 * Math.min(1, slots.busy / slots.total) : 0) + "%";
    setText("slots-waiting", slots.waiting ? slots.waiting + " tasks waiting for slots" : "no task waiting for slots");

    const tasks = data.tasks;
    setText("queued", tasks.queued);
    setText("running", tasks.running);
    setText("finished", tasks.finished);
    const byState = tasks.by_state || {};
    setText("finished-split", ["DONE", "FAILED", "CANCELED"].map((s) => (byState[s] || 0) + " " + s.toLowerCase()).join(", "));

    const outbox = data.outbox;
    setText("outbox", outbox.pending);
    const oldest = outbox.oldest;
    setText("outbox-oldest", oldest ? "oldest: " + [oldest.type, oldest.task_id, oldest.state].filter(Boolean).join(" ") +
      (typeof oldest.age === "number" ? ", " + duration(oldest.age) + " old" : "") : "every message acknowledged");

    showPilots(data.pilots);

    setText("failures-count", data.failures.length ? "(latest " + data.failures.length + ")" : "");
    rows(document.getElementById("failures"), data.failures.map((f) => el("tr", {},
      el("td", {class: "id"}, f.task_id),
      el("td", {}, clock(f.finished || f.created)),
      el("td", {class: "num"}, f.exit_code === null || f.exit_code === undefined ? "–" : f.exit_code),
      el("td", {class: "id"}, f.job_id || "–"),
      el("td", {class: "reason"}, f.reason || "–"))), 5, "no failed task");

    const events = [];
    const welcome = connection.last_welcome;
    if (welcome) events.push(el("tr", {}, el("td", {}, "welcome"), el("td", {}, clock(welcome.time)),
      el("td", {}, "heartbeat " + (welcome.heartbeat === null || welcome.heartbeat === undefined ? "–" : welcome.heartbeat + " s"))));
    const close = connection.last_close;
    if (close) events.push(el("tr", {}, el("td", {}, "close"), el("td", {}, clock(close.time)),
      el("td", {}, "code " + close.code + (close.reason ? ": " + close.reason : ""))));
    const failure = connection.last_failure;
    if (failure) events.push(el("tr", {}, el("td", {}, "connection failure"), el("td", {}, clock(failure.time)),
      el("td", {class: "reason"}, failure.reason)));
    rows(document.getElementById("events"), events, 3, "none yet");

    setText("updated", "updated " + clock(now));
  }

  poll(async () => render(await getJSON("status.json")), 2);
})();
