// The reference platform's page: agents and every task, from the JSON API,
// redrawn every 2 s.  The API token comes from the URL fragment
// (#token=...), which browsers never send to the server, and goes with every
// request as "Authorization: Bearer <token>".
"use strict";

(() => {
  const {el, setText, duration, clock, ago, badge, getJSON, poll} = everest;

  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  const headers = token ? {Authorization: "Bearer " + token} : {};
  const STATES = ["SUBMITTED", "ACCEPTED", "STAGING_IN", "QUEUED", "RUNNING", "STAGING_OUT", "STAGED_OUT", "DONE", "FAILED", "CANCELED"];
  const FINISHED = new Set(["DONE", "FAILED", "CANCELED"]);

  async function api(path) {
    try {
      return await getJSON("api/" + path, headers);
    } catch (error) {
      if (error.status === 401) {
        error.explain = token ? "the API refused this page's token (401; #token=... in the address)"
          : "the API needs its token (401): open this page as /#token=<the platform's API token>";
      }
      throw error;
    }
  }

  // -- agents ----------------------------------------------------------------

  function agentRow(agent, now) {
    const resource = agent.resource || {};
    const slots = typeof resource.slots === "number" ? (resource.busy || 0) + " / " + resource.slots : "–";
    return el("tr", {},
      el("td", {class: "id"}, agent.name),
      el("td", {}, badge(agent.connected ? "connected" : "disconnected")),
      el("td", {}, resource.hostname || "–"),
      el("td", {}, resource.handler || "–"),
      el("td", {class: "num"}, slots),
      el("td", {class: "num"}, typeof resource.queued === "number" ? resource.queued : "–"),
      el("td", {}, typeof resource.time === "number" ? ago(resource.time, now) : "–"));
  }

  // -- tasks: one row per task, redrawn only when the task changed ------------

  const rows = new Map();  // taskId -> {row, key, text, state}
  const tbody = () => document.getElementById("tasks");
  const details = new Map();  // taskId -> the task's /api/tasks/<id> (finished tasks only)

  async function taskDetails(taskId) {
    if (!details.has(taskId)) details.set(taskId, await api("tasks/" + encodeURIComponent(taskId)));
    return details.get(taskId);
  }

  // An output's link: its URI is in the task's spec, fetched when clicked,
  // then the file is fetched with the token and handed to the browser.
  function outputLink(taskId, output) {
    const size = typeof output.size === "number" ? " (" + output.size + " B)" : "";
    return el("a", {href: "#", title: "download " + output.path, onclick: async (event) => {
      event.preventDefault();
      try {
        const task = await taskDetails(taskId);
        const declared = [...((task.spec || {}).outputs || []), ...((task.spec || {}).outputData || [])];
        const spec = declared.find((o) => o && o.path === output.path);
        const uri = (spec && spec.uri) || output.uri;
        if (!uri) throw new Error("no URI for " + output.path);
        const response = await fetch(uri, {headers});
        if (!response.ok) throw new Error(response.status + " " + response.statusText);
        const url = URL.createObjectURL(await response.blob());
        const save = el("a", {href: url, download: output.path.split("/").pop()});
        document.body.append(save);
        save.click();
        save.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } catch (error) {
        alert("Cannot fetch " + output.path + ": " + error.message);
      }
    }}, output.path + size);
  }

  function taskRow(task) {
    const info = task.info || {};
    const state = task.state || "SUBMITTED";
    const last = el("td", {class: "outputs"});
    for (const output of Array.isArray(info.outputs) ? info.outputs : (Array.isArray(info.outputData) ? info.outputData : [])) {
      if (output && typeof output.path === "string") last.append(outputLink(task.taskId, output));
    }
    if (info.reason) last.append(el("span", {class: "reason"}, String(info.reason)));
    if (info.reason) last.classList.add("reason");
    const seconds = (v) => typeof v === "number" ? duration(v) : "–";
    return el("tr", {"data-task": task.taskId, "data-state": state},
      el("td", {class: "id"}, task.taskId),
      el("td", {}, task.agent || "–"),
      el("td", {}, badge(state)),
      el("td", {}, typeof info.time === "number" ? clock(info.time) : "–"),
      el("td", {class: "num"}, seconds(info.stageInTime)),
      el("td", {class: "num"}, seconds(info.runTime)),
      el("td", {class: "num"}, seconds(info.stageOutTime)),
      el("td", {class: "num"}, info.exitCode === null || info.exitCode === undefined ? "–" : info.exitCode),
      last);
  }

  function matches(entry, text, stateFilter) {
    if (stateFilter === "active" && FINISHED.has(entry.state)) return false;
    if (stateFilter && stateFilter !== "active" && entry.state !== stateFilter) return false;
    return !text || entry.text.includes(text);
  }

  function applyFilter() {
    const text = document.getElementById("filter").value.trim().toLowerCase();
    const stateFilter = document.getElementById("state-filter").value;
    let shown = 0;
    for (const entry of rows.values()) {
      entry.row.hidden = !matches(entry, text, stateFilter);
      if (!entry.row.hidden) shown += 1;
    }
    setText("shown", rows.size && shown !== rows.size ? shown + " shown" : "");
  }

  function showTasks(tasks) {
    const body = tbody();
    if (!tasks.length && !rows.size) {
      body.replaceChildren(el("tr", {}, el("td", {class: "empty", colspan: 9},
        "no task yet: POST /api/tasks {\"spec\": {...}}")));
      return;
    }
    if (rows.size === 0) body.replaceChildren();
    const seen = new Set();
    let previous = null;
    for (const task of tasks) {
      seen.add(task.taskId);
      const info = task.info || {};
      const key = (task.state || "") + "|" + (info.seq === undefined ? "" : info.seq) + "|" + (info.time || "") + "|" + (task.agent || "");
      let entry = rows.get(task.taskId);
      if (!entry || entry.key !== key) {
        const row = taskRow(task);
        const text = [task.taskId, task.agent || "", task.state || "SUBMITTED", info.reason || ""].join(" ").toLowerCase();
        if (entry) entry.row.replaceWith(row);
        entry = {row, key, text, state: task.state || "SUBMITTED"};
        rows.set(task.taskId, entry);
      }
      // Keep the API's order (submission order).
      const expected = previous ? previous.nextSibling : body.firstChild;
      if (expected !== entry.row) body.insertBefore(entry.row, expected);
      previous = entry.row;
    }
    for (const [taskId, entry] of rows) {
      if (!seen.has(taskId)) { entry.row.remove(); rows.delete(taskId); }
    }
    applyFilter();
  }

  function showCounts(tasks) {
    const counts = {};
    for (const task of tasks) {
      const state = task.state || "SUBMITTED";
      counts[state] = (counts[state] || 0) + 1;
    }
    const cards = document.getElementById("state-cards");
    cards.replaceChildren(...STATES.filter((s) => counts[s] || ["RUNNING", "DONE", "FAILED"].includes(s)).map((s) =>
      el("div", {class: "card"}, el("div", {class: "label"}, s.replace("_", " ").toLowerCase()),
        el("div", {class: "value", id: "count-" + s}, counts[s] || 0))));
    const finished = tasks.filter((t) => FINISHED.has(t.state)).length;
    setText("summary", tasks.length + " tasks, " + finished + " finished");
    setText("tasks-count", "(" + tasks.length + ")");
    return finished;
  }

  let lastFinished = null;
  async function refresh() {
    const [agents, tasks] = await Promise.all([api("agents"), api("tasks")]);
    const now = Date.now() / 1000;
    setText("agents-count", "(" + agents.length + ")");
    const agentRows = agents.map((agent) => agentRow(agent, now));
    document.getElementById("agents").replaceChildren(...(agentRows.length ? agentRows :
      [el("tr", {}, el("td", {class: "empty", colspan: 7}, "no agent configured"))]));
    const finished = showCounts(tasks);
    if (lastFinished !== null) {
      const rate = (finished - lastFinished.count) / Math.max(0.001, now - lastFinished.time);
      setText("rate", rate > 0 ? rate.toFixed(1) + " tasks/s finishing" : "");
    }
    lastFinished = {count: finished, time: now};
    showTasks(tasks);
    setText("updated", "updated " + clock(now));
  }

  document.getElementById("filter").addEventListener("input", applyFilter);
  document.getElementById("state-filter").addEventListener("change", applyFilter);
  poll(refresh, 2);
})();
