// Helpers shared by the agent's and the platform's pages.
// Data goes into the page only as text (textContent, text nodes), never as HTML.
"use strict";

const everest = (() => {
  // el("td", {class: "num", title: "..."}, "text", otherNode, ...)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, value) {
    document.getElementById(id).textContent = value === undefined || value === null ? "–" : String(value);
  }

  function duration(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    if (seconds < 10) return seconds.toFixed(2) + " s";
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor(seconds / 60) % 60 + " min";
    return Math.floor(seconds / 86400) + " d " + Math.floor(seconds / 3600) % 24 + " h";
  }

  function clock(unixSeconds) {
    if (typeof unixSeconds !== "number") return "–";
    const d = new Date(unixSeconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    const today = new Date().toDateString() === d.toDateString();
    const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    return today ? time : d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time;
  }

  function ago(unixSeconds, now) {
    if (typeof unixSeconds !== "number") return "–";
    return duration(Math.max(0, (now || Date.now() / 1000) - unixSeconds)) + " ago";
  }

  function badge(text, kind) {
    return el("span", {class: "badge " + (kind || String(text).toLowerCase())}, text);
  }

  // Fetch JSON; an error carries the HTTP status and the server's message.
  async function getJSON(url, headers) {
    const response = await fetch(url, {headers: headers || {}, cache: "no-store"});
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message += ": " + (await response.json()).error; } catch (e) { /* not JSON */ }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  // Call refresh() now and every `seconds`; show its failures in #problem.
  function poll(refresh, seconds) {
    const problem = document.getElementById("problem");
    let timer = null;
    async function tick() {
      try {
        await refresh();
        problem.hidden = true;
        problem.textContent = "";
        document.body.classList.remove("stale");
      } catch (error) {
        problem.hidden = false;
        problem.textContent = "Cannot refresh: " + (error.explain || error.message) + " (retrying)";
        document.body.classList.add("stale");
      }
      timer = setTimeout(tick, seconds * 1000);
    }
    tick();
    return () => clearTimeout(timer);
  }

  return {el, setText, duration, clock, ago, badge, getJSON, poll};
})();
