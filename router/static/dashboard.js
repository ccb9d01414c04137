// The router's dashboard: reads the admin API with the admin token the user typed in (kept in this tab's
// sessionStorage, sent as an Authorization header) and draws it with plain DOM and SVG. Every text from the
// server goes in through textContent, never as markup.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "router-admin-token";
const PALETTE = ["#1f77b4", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e"];
const SVG = "http://www.w3.org/2000/svg";
const RATE_SPAN_S = 60; // the "live" request rate: the complete intervals of about the last minute

// generation: which refresh is the latest. Each refresh takes a new one; one that finds a newer one (or a sign-out)
// after its fetches drops its results and schedules nothing, so there is one refresh loop, drawing the latest choice.
const state = { experiment: null, windowS: 300, stepS: 10, timer: null, arms: null, refreshes: 0, generation: 0 };

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return body;
}

// --- formatting ------------------------------------------------------------------------------------------------
const dash = "–";
const fixed = (value, digits) => (value === null || value === undefined ? dash : Number(value).toFixed(digits));
const percent = (value, digits = 2) => (value === null || value === undefined ? dash : `${(value * 100).toFixed(digits)}%`);
const signed = (value, digits) => (value >= 0 ? "+" : "") + value.toFixed(digits);
const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
const stamp = (seconds) => new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";

function cell(row, field, value, text, className) {
  const td = document.createElement("td");
  td.dataset.field = field;
  if (value !== null && value !== undefined) {
    td.dataset.value = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// --- sign in / out ---------------------------------------------------------------------------------------------
function showLogin(message) {
  clearTimeout(state.timer);
  $("board").hidden = true;
  $("controls").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  try {
    await loadExperiments();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(error.message);
    return;
  }
  $("login").hidden = true;
  $("controls").hidden = false;
  $("board").hidden = false;
  refresh();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.generation += 1; // a refresh still under way is dropped: no token-less call follows it
  state.experiment = null;
  state.arms = null;
  showLogin("");
}

async function loadExperiments() {
  const described = await api("/admin/experiments");
  const names = Object.keys(described.experiments);
  const select = $("experiment");
  const wanted = state.experiment && names.includes(state.experiment) ? state.experiment : names[0];
  select.replaceChildren(...names.map((name) => new Option(name, name, false, name === wanted)));
  state.experiment = wanted;
  return described;
}

// --- the refresh loop ------------------------------------------------------------------------------------------
async function refresh() {
  clearTimeout(state.timer);
  const generation = ++state.generation;
  if (!token() || $("board").hidden) return; // signed out: nothing to show, and no call without a token
  const name = state.experiment;
  const path = encodeURIComponent(name);
  // A report up to one refresh period old will do: open tabs share the router's latest instead of each
  // costing a new one (a report reads every row of the log).
  const maxAge = REFRESH_MS / 1000;
  const stale = () => generation !== state.generation || !token();
  try {
    const [described, report, series] = await Promise.all([
      api("/admin/experiments"),
      api(`/admin/report/${path}?max_age_s=${maxAge}`),
      api(`/admin/series/${path}?window_s=${state.windowS}&step_s=${state.stepS}`),
    ]);
    if (stale()) return; // a newer refresh (another window, experiment or action) or a sign-out took over
    render(described.experiments[name], report, series);
    $("refresh-error").textContent = "";
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
  } catch (error) {
    if (stale()) return;
    if (error.status === 401 || error.status === 403) {
      signOut();
      $("login-error").textContent = error.message;
      return;
    }
    $("refresh-error").textContent = `Could not refresh: ${error.message}`;
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function render(experiment, report, series) {
  const lastRate = rateSpan(series);
  $("coverage").textContent =
    `As of ${clock(series.until)} (refreshed every ${REFRESH_MS / 1000} s). Requests per second and latency: ` +
    `${clock(series.since)}–${clock(series.until)} in ${series.step_s} s intervals (the last one still filling); ` +
    `the Req/s column: the ${lastRate.seconds} s before ${clock(lastRate.end)}. Requests, accuracy, verdicts, ` +
    `shadow and events: ${report.since > 0 ? `since ${stamp(report.since)}` : "the whole request log"}.`;
  $("rate-header").textContent = `Req/s (${lastRate.seconds} s)`;
  $("rolled-back").hidden = !report.rolled_back;
  renderArms(experiment, report, series, lastRate);
  renderMethod(report.decision);
  const names = report.arms.map((row) => row.arm);
  renderLegend(names);
  drawLines($("chart-rate"), series, names, [{ key: "requests", scale: 1 / series.step_s, dashed: false }], "req/s");
  drawLines($("chart-latency"), series, names, [{ key: "p50", scale: 1, dashed: false },
                                                { key: "p99", scale: 1, dashed: true }], "ms");
  drawAccuracy($("chart-accuracy"), report.arms);
  renderWeights(experiment);
  renderShadow(report.shadow);
  renderEvents(report.events);
}

// The request rate of the complete intervals that make up about the last RATE_SPAN_S seconds.
function rateSpan(series) {
  const complete = series.starts.length - 1; // the last interval is still filling
  const count = Math.max(1, Math.min(complete, Math.round(RATE_SPAN_S / series.step_s)));
  const first = Math.max(0, complete - count);
  const rates = {};
  for (const [arm, values] of Object.entries(series.arms)) {
    const total = values.requests.slice(first, first + count).reduce((sum, value) => sum + value, 0);
    rates[arm] = total / (count * series.step_s);
  }
  return { rates, seconds: count * series.step_s, end: series.since + (first + count) * series.step_s };
}

function renderArms(experiment, report, series, lastRate) {
  const traffic = report.arms.map((arm) => {
    const row = document.createElement("tr");
    row.dataset.arm = arm.arm;
    if (arm.control) row.className = "control";
    const configured = experiment.arms[arm.arm];
    cell(row, "arm", arm.arm, arm.arm);
    cell(row, "target", arm.targets.join(", "), arm.targets.join(", ") || dash, "text");
    cell(row, "weight", configured ? configured.weight : null, configured ? String(configured.weight) : dash);
    const circuit = configured ? configured.circuit : null;
    cell(row, "circuit", circuit, circuit || dash, circuit && circuit !== "closed" ? "circuit-open" : "");
    cell(row, "requests", arm.requests, String(arm.requests));
    cell(row, "error_rate", arm.error_rate, percent(arm.error_rate));
    const rate = lastRate.rates[arm.arm];
    cell(row, "rate", rate === undefined ? null : rate, rate === undefined ? dash : rate.toFixed(2));
    for (const q of ["p50", "p95", "p99"]) cell(row, q, arm.latency_ms[q], fixed(arm.latency_ms[q], 1));
    // From each arm's latency sample (the p50/p95/p99 columns use every answer): the sizes say so.
    const latency = arm.latency_vs_control;
    cell(row, "latency_vs_control", latency, latency === null ? (arm.control ? "control" : dash)
      : ["p50", "p99"].map((q) => `${q} ${signed(latency[q].difference, 1)} ` +
        `(${signed(latency[q].ci95[0], 1)} to ${signed(latency[q].ci95[1], 1)})`).join(", ") +
        ` · sampled ${latency.samples[1]} vs ${latency.samples[0]}`, "text");
    return row;
  });
  $("arms").querySelector("tbody").replaceChildren(...traffic);

  const verdicts = report.arms.map((arm) => {
    const row = document.createElement("tr");
    row.dataset.arm = arm.arm;
    if (arm.control) row.className = "control";
    cell(row, "arm", arm.arm, arm.arm);
    cell(row, "feedback", arm.feedback, String(arm.feedback));
    const interval = arm.accuracy_ci95;
    cell(row, "accuracy", arm.accuracy, arm.accuracy === null ? dash
      : `${percent(arm.accuracy)} (${percent(interval[0], 1)}–${percent(interval[1], 1)})`);
    const versus = arm.vs_control;
    if (arm.control || !versus) {
      cell(row, "difference", null, arm.control ? "control" : dash);
      cell(row, "p_value_holm", null, dash);
      cell(row, "verdict", arm.control ? "control" : null, arm.control ? "control" : "not in the experiment now",
        "verdict");
    } else {
      const sequence = versus.confidence_sequence;
      cell(row, "difference", versus.difference, versus.difference === null ? dash
        : `${signed(versus.difference * 100, 2)} (${signed(sequence[0] * 100, 2)} to ${signed(sequence[1] * 100, 2)})`);
      cell(row, "p_value_holm", versus.p_value_holm, versus.p_value_holm < 0.001
        ? versus.p_value_holm.toExponential(1) : versus.p_value_holm.toFixed(3));
      const verdict = cell(row, "verdict", versus.verdict, versus.summary, "verdict");
      verdict.classList.add(`verdict-${versus.verdict.replace(" ", "-")}`);
    }
    return row;
  });
  $("verdicts").querySelector("tbody").replaceChildren(...verdicts);
}

function renderMethod(decision) {
  $("method").textContent =
    `Verdicts: ${decision.test}; α = ${decision.alpha} for all ${decision.candidates} candidate(s) together ` +
    `(intervals at ${(decision.interval_level * 100).toFixed(2)} %; a better or worse claim's at the level Holm ` +
    "rejected at, which excludes 0), valid however often this page refreshes. " +
    `"Too early" says how many more labels would find a ${(decision.min_difference * 100).toFixed(2)}-point ` +
    `difference with ${Math.round(decision.power * 100)} % power. Latency vs control: bootstrap 95 % intervals ` +
    "of the p50 and p99 differences, from a sample of each arm's answers (sizes shown: here vs control); the " +
    "p50/p95/p99 columns use every answer.";
}

function renderLegend(names) {
  $("legend").replaceChildren(...names.map((name, index) => {
    const span = document.createElement("span");
    span.className = `swatch-${index % PALETTE.length}`;
    span.textContent = name;
    return span;
  }));
}

// --- charts ----------------------------------------------------------------------------------------------------
function svgElement(tag, attributes, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

const FRAME = { left: 46, right: 10, top: 10, bottom: 24, width: 480, height: 220 };

function drawLines(svg, series, names, lines, unit) {
  const children = [];
  const n = series.starts.length;
  let top = 0;
  for (const name of names) {
    for (const line of lines) {
      for (const value of (series.arms[name] || {})[line.key] || []) {
        if (value !== null) top = Math.max(top, value * line.scale);
      }
    }
  }
  const plotW = FRAME.width - FRAME.left - FRAME.right;
  const plotH = FRAME.height - FRAME.top - FRAME.bottom;
  const x = (index) => FRAME.left + (n <= 1 ? 0 : (index / (n - 1)) * plotW);
  const yMax = top > 0 ? top * 1.1 : 1;
  const y = (value) => FRAME.top + plotH - (value / yMax) * plotH;
  for (const fraction of [0, 0.5, 1]) {
    const value = yMax * fraction;
    children.push(svgElement("line", { class: "grid", x1: FRAME.left, x2: FRAME.width - FRAME.right, y1: y(value), y2: y(value) }));
    children.push(svgElement("text", { x: FRAME.left - 4, y: y(value) + 3, "text-anchor": "end" },
      value >= 100 ? value.toFixed(0) : value.toFixed(1)));
  }
  children.push(svgElement("line", { class: "axis", x1: FRAME.left, x2: FRAME.left, y1: FRAME.top, y2: FRAME.top + plotH }));
  children.push(svgElement("text", { x: FRAME.left, y: FRAME.height - 6 }, clock(series.since)));
  children.push(svgElement("text", { x: FRAME.width - FRAME.right, y: FRAME.height - 6, "text-anchor": "end" },
    `${clock(series.until)} (${unit})`));
  let total = 0;
  names.forEach((name, index) => {
    const values = series.arms[name];
    if (!values) return;
    total += values.requests.reduce((sum, value) => sum + value, 0);
    for (const line of lines) {
      let path = "";
      values[line.key].forEach((value, i) => {
        if (value === null) return;
        path += `${path ? "L" : "M"}${x(i).toFixed(1)},${y(value * line.scale).toFixed(1)}`;
      });
      if (!path) continue;
      const color = PALETTE[index % PALETTE.length];
      const attributes = { d: path, fill: "none", stroke: color, "stroke-width": 1.6 };
      if (line.dashed) attributes["stroke-dasharray"] = "4 3";
      children.push(svgElement("path", attributes));
      values[line.key].forEach((value, i) => { // a point alone draws no line: each interval gets a mark
        if (value === null) return;
        children.push(svgElement("circle", { cx: x(i).toFixed(1), cy: y(value * line.scale).toFixed(1), r: 2,
                                             fill: line.dashed ? "#fff" : color, stroke: color }));
      });
    }
  });
  if (top === 0) {
    children.push(svgElement("text", { class: "empty", x: FRAME.width / 2, y: FRAME.height / 2, "text-anchor": "middle" },
      "no requests in this window"));
  }
  svg.dataset.totalRequests = String(total);
  svg.replaceChildren(...children);
}

function drawAccuracy(svg, arms) {
  const children = [];
  const plotW = FRAME.width - FRAME.left - FRAME.right;
  const plotH = FRAME.height - FRAME.top - FRAME.bottom;
  const judged = arms.filter((arm) => arm.accuracy !== null);
  const low = Math.max(0, Math.min(...judged.map((arm) => arm.accuracy_ci95[0]), 1) - 0.02);
  const high = Math.min(1, Math.max(...judged.map((arm) => arm.accuracy_ci95[1]), 0) + 0.02);
  const y = (value) => FRAME.top + plotH - ((value - low) / Math.max(high - low, 1e-9)) * plotH;
  for (const value of [low, (low + high) / 2, high]) {
    children.push(svgElement("line", { class: "grid", x1: FRAME.left, x2: FRAME.width - FRAME.right, y1: y(value), y2: y(value) }));
    children.push(svgElement("text", { x: FRAME.left - 4, y: y(value) + 3, "text-anchor": "end" }, percent(value, 1)));
  }
  const step = plotW / Math.max(arms.length, 1);
  arms.forEach((arm, index) => {
    const cx = FRAME.left + step * (index + 0.5);
    children.push(svgElement("text", { x: cx, y: FRAME.height - 6, "text-anchor": "middle" }, arm.arm));
    if (arm.accuracy === null) return;
    const color = PALETTE[index % PALETTE.length];
    const [lo, hi] = arm.accuracy_ci95;
    children.push(svgElement("line", { x1: cx, x2: cx, y1: y(lo), y2: y(hi), stroke: color, "stroke-width": 2 }));
    for (const end of [lo, hi]) {
      children.push(svgElement("line", { x1: cx - 6, x2: cx + 6, y1: y(end), y2: y(end), stroke: color, "stroke-width": 2 }));
    }
    children.push(svgElement("circle", { cx, cy: y(arm.accuracy), r: 4, fill: color }));
  });
  if (!judged.length) {
    children.push(svgElement("text", { class: "empty", x: FRAME.width / 2, y: FRAME.height / 2, "text-anchor": "middle" },
      "no labels yet"));
  }
  svg.replaceChildren(...children);
}

// --- the tables below the charts -------------------------------------------------------------------------------
function renderShadow(shadow) {
  const rows = shadow.map((entry) => {
    const row = document.createElement("tr");
    row.dataset.target = entry.target;
    cell(row, "target", entry.target, entry.target);
    cell(row, "compared", entry.compared, String(entry.compared));
    cell(row, "agreement", entry.agreement, percent(entry.agreement));
    cell(row, "errors", entry.errors, String(entry.errors));
    return row;
  });
  $("shadow").querySelector("tbody").replaceChildren(...rows);
  $("shadow").hidden = rows.length === 0;
  $("no-shadow").hidden = rows.length !== 0;
}

// The report holds the latest events only (router.report.EVENTS), oldest first.
function renderEvents(events) {
  const items = events.slice().reverse().map((event) => {
    const item = document.createElement("li");
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = event.kind;
    item.append(`${stamp(event.at)} `, kind, `: ${event.detail}`);
    return item;
  });
  $("events").replaceChildren(...items);
  $("events-note").textContent = `(the latest ${items.length}, newest first)`;
}

// --- actions ---------------------------------------------------------------------------------------------------
// The inputs are rebuilt only when the experiment or its arms change: a refresh never overwrites what is typed.
function renderWeights(experiment) {
  const names = Object.keys(experiment.arms);
  const key = `${state.experiment}:${names.join(",")}`;
  if (state.arms === key) return;
  state.arms = key;
  $("weight-inputs").replaceChildren(...names.map((name) => {
    const label = document.createElement("label");
    label.textContent = `${name} `;
    const input = document.createElement("input");
    input.type = "text";
    input.inputMode = "decimal";
    input.name = name;
    input.dataset.arm = name;
    input.value = String(experiment.arms[name].weight);
    label.appendChild(input);
    return label;
  }));
}

function message(text, ok) {
  const element = $("action-message");
  element.textContent = text;
  element.className = ok ? "ok" : "error";
}

// What was typed, as the server should judge it: a number when it reads as one, else the text itself (the
// router then says what is wrong with it, and changes nothing).
function typedWeight(text) {
  const trimmed = text.trim();
  return /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(trimmed) ? Number(trimmed) : trimmed;
}

async function applyWeights(event) {
  event.preventDefault();
  const weights = {};
  for (const input of $("weight-inputs").querySelectorAll("input")) weights[input.dataset.arm] = typedWeight(input.value);
  const reason = $("reason").value.trim() || "weights set from the dashboard";
  try {
    const result = await api(`/admin/experiments/${encodeURIComponent(state.experiment)}/weights`, {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ weights, reason }),
    });
    const applied = Object.entries(result.arms).map(([name, arm]) => `${name}=${arm.weight}`).join(", ");
    message(`Applied: ${applied}`, true);
    state.arms = null; // show the weights now in force
  } catch (error) {
    message(`Not applied: ${error.message}`, false);
    return;
  }
  refresh();
}

async function resetWeights() {
  try {
    const result = await api(`/admin/experiments/${encodeURIComponent(state.experiment)}/override`, { method: "DELETE" });
    const applied = Object.entries(result.arms).map(([name, arm]) => `${name}=${arm.weight}`).join(", ");
    message(`Back to the experiment file's weights: ${applied}`, true);
    state.arms = null;
  } catch (error) {
    message(`Not reset: ${error.message}`, false);
    return;
  }
  refresh();
}

function chooseWindow() {
  const [windowS, stepS] = $("traffic-window").value.split(":").map(Number);
  state.windowS = windowS;
  state.stepS = stepS;
  refresh();
}

function chooseExperiment() {
  state.experiment = $("experiment").value;
  state.arms = null;
  message("", true);
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("weights-form").addEventListener("submit", applyWeights);
  $("reset").addEventListener("click", resetWeights);
  $("traffic-window").addEventListener("change", chooseWindow);
  $("experiment").addEventListener("change", chooseExperiment);
  if (!token()) {
    showLogin("");
    return;
  }
  loadExperiments().then(() => {
    $("controls").hidden = false;
    $("board").hidden = false;
    refresh();
  }, (error) => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(error.message);
  });
});
