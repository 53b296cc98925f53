// hydrod's page (SPEC §8): the nodes, and for one node a chart of each metric over a
// chosen range, drawn from the HTTP API with uPlot. Served by hydrod itself; it loads
// nothing from anywhere else. Data is only ever put in the page as text, never as HTML.
"use strict";

const TOKEN_KEY = "hydrod.token";
const REFRESH_MS = 30000;
const $ = (id) => document.getElementById(id);
let chosen = null; // the uid whose charts are shown
let charts = [];

// --- the token ---------------------------------------------------------------------
// A link may carry it as #token=...: it is kept, then taken out of the address bar (a
// fragment is never sent to a server, so it is in no log).
function takeTokenFromLink() {
  const found = new URLSearchParams(location.hash.slice(1)).get("token");
  if (found) {
    localStorage.setItem(TOKEN_KEY, found);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return Boolean(found);
}

class Unauthorised extends Error {}

async function api(path) {
  const headers = { Accept: "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const answer = await fetch(path, { headers, cache: "no-store" });
  if (answer.status === 401) throw new Unauthorised("the API wants its token");
  const body = await answer.json().catch(() => ({ error: answer.statusText }));
  if (!answer.ok) throw new Error(`${path.split("?")[0]}: ${answer.status} ${body.error || ""}`);
  return body;
}

function showError(error) {
  if (error instanceof Unauthorised) {
    $("login").hidden = false;
    $("nodes-section").hidden = true;
    $("node-section").hidden = true;
    $("error").hidden = true;
    return;
  }
  $("error").textContent = String(error.message || error);
  $("error").hidden = false;
}

// --- the nodes -----------------------------------------------------------------------
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "never";
}

function formatValue(value) {
  return Number.isInteger(value) ? String(value) : Number(value).toPrecision(4).replace(/\.?0+$/, "");
}

async function loadNodes() {
  try {
    const nodes = await api("/api/nodes");
    const latest = await Promise.all(nodes.map((n) =>
      api(`/api/nodes/${encodeURIComponent(n.uid)}/telemetry/last`).then((b) => b.values)));
    $("login").hidden = true;
    $("nodes-section").hidden = false;
    $("forget").hidden = !localStorage.getItem(TOKEN_KEY);
    $("error").hidden = true;
    renderNodes(nodes, latest);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if (chosen && !nodes.some((n) => n.uid === chosen)) chosen = null;
  } catch (error) {
    showError(error);
  }
}

function renderNodes(nodes, latest) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  $("no-nodes").hidden = nodes.length > 0;
  nodes.forEach((node, i) => {
    const row = el("tr");
    row.dataset.uid = node.uid;
    if (node.uid === chosen) row.classList.add("chosen");
    row.append(el("td", node.name ? `${node.name} (${node.uid})` : node.uid), el("td", node.type),
               el("td", node.status, node.status), el("td", node.gh_uid ? `${node.gh_uid} / ${node.zone_uid}` : "unbound"),
               el("td", when(node.last_seen_at)));
    const values = el("td");
    for (const v of latest[i]) {
      const item = el("span", `${v.channel} ${v.metric} `, "value");
      item.title = "at " + when(v.ts);
      item.append(el("b", formatValue(v.value)), document.createTextNode(v.unit ? " " + v.unit : ""));
      values.append(item);
    }
    row.append(values);
    row.addEventListener("click", () => showNode(node.uid, latest[i]));
    body.append(row);
  });
}

// --- the charts ----------------------------------------------------------------------
function localInput(date) { // a Date as a datetime-local input's value
  const shifted = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return shifted.toISOString().slice(0, 19);
}

function range() {
  const span = $("span").value;
  if (span === "custom") {
    const from = new Date($("from").value), to = new Date($("to").value);
    if (isNaN(from) || isNaN(to)) throw new Error("choose both times of the range");
    return [from, to];
  }
  const to = new Date();
  return [new Date(to.getTime() - Number(span) * 1000), to];
}

async function showNode(uid, values) {
  chosen = uid;
  for (const row of $("nodes").tBodies[0].rows) row.classList.toggle("chosen", row.dataset.uid === uid);
  $("node-section").hidden = false;
  $("node-title").textContent = uid;
  $("node-section").dataset.series = JSON.stringify(values.map((v) => [v.channel, v.metric]));
  await drawCharts();
}

async function drawCharts() {
  const series = JSON.parse($("node-section").dataset.series || "[]");
  charts.forEach((chart) => chart.destroy());
  charts = [];
  const box = $("charts");
  box.replaceChildren();
  if (series.length === 0) {
    box.append(el("p", "This node has sent no telemetry yet.", "empty"));
    return;
  }
  let from, to;
  try {
    [from, to] = range();
  } catch (error) {
    showError(error);
    return;
  }
  const step = $("step").value;
  const uid = chosen;
  await Promise.all(series.map(async ([channel, metric]) => {
    const figure = el("div", undefined, "chart");
    figure.dataset.metric = metric;
    figure.dataset.channel = channel;
    const title = el("h3", `${metric} · ${channel}`);
    figure.append(title);
    box.append(figure);
    const query = new URLSearchParams({ metric, channel, from: from.toISOString(), to: to.toISOString(), step });
    try {
      const answer = await api(`/api/nodes/${encodeURIComponent(uid)}/telemetry?${query}`);
      if (uid !== chosen) return;
      const n = answer.points.length;
      title.append(el("span", `step ${answer.step}, ${n} point${n === 1 ? "" : "s"}`, "meta"));
      figure.dataset.points = answer.points.length;
      if (answer.points.length === 0) {
        figure.append(el("p", "No samples in this range.", "empty"));
        return;
      }
      charts.push(draw(figure, answer, from, to));
    } catch (error) {
      figure.append(el("p", String(error.message || error), "empty"));
      if (error instanceof Unauthorised) showError(error);
    }
  }));
}

function draw(figure, answer, from, to) { // the x axis spans the chosen range
  const points = answer.points;
  const xs = points.map((p) => Date.parse(p.ts) / 1000);
  const data = [xs, points.map((p) => p.avg)];
  const lines = [{}, { label: answer.step === "raw" ? "value" : "avg", stroke: "#2f6b2f", width: 2 }];
  if (answer.step !== "raw") {
    data.push(points.map((p) => p.min), points.map((p) => p.max));
    lines.push({ label: "min", stroke: "#7fa8c9", width: 1 }, { label: "max", stroke: "#d08a5b", width: 1 });
  }
  const width = Math.max(320, figure.clientWidth - 16);
  const span = [from.getTime() / 1000, to.getTime() / 1000];
  return new uPlot({ width, height: 220, series: lines, scales: { x: { time: true, range: () => span } } },
                   data, figure);
}

// --- wiring --------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromLink();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    loadNodes();
  });
  $("forget").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("refresh").addEventListener("click", loadNodes);
  window.addEventListener("hashchange", () => takeTokenFromLink() && loadNodes()); // the link, in this tab
  $("span").addEventListener("change", () => {
    const custom = $("span").value === "custom";
    $("range").classList.toggle("custom-range", custom);
    if (custom && !$("from").value) {
      const now = new Date();
      $("from").value = localInput(new Date(now.getTime() - 86400000));
      $("to").value = localInput(now);
    }
  });
  $("range").addEventListener("submit", (event) => {
    event.preventDefault();
    drawCharts();
  });
  loadNodes();
  setInterval(loadNodes, REFRESH_MS);
});
