// The Bios dashboard: polls the server's own routes with the key typed into the page, and draws
// with uPlot (vendored by scripts/setup_console_assets.sh). No data is rendered as HTML: text
// goes in through textContent only.
"use strict";

const POLL_MS = 2000;
const SERIES_POINTS = 900; // queue depth / memory points kept (30 minutes at 2 s)
const KEY_ITEM = "bios-console-key";

const state = {
  key: sessionStorage.getItem(KEY_ITEM),
  runs: new Map(), // run id -> {run, metrics, steps: [], lastRequest, chart, row}
  charts: {},
  queue: [[], []],
  memory: [[], []],
  timer: null,
};

// Exposed for the browser test and for debugging from the devtools console.
window.biosConsole = {
  state,
  lossPoints(runId) {
    const r = state.runs.get(runId);
    return r && r.chart ? r.chart.data[0].length : -1;
  },
  ready: false,
};

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["X-API-Key"] = state.key;
  return h;
}

async function api(path, init) {
  const res = await fetch(path, Object.assign({ headers: headers() }, init || {}));
  if (!res.ok) {
    let detail = res.statusText;
    try { const b = await res.json(); detail = b.detail || (b.error && b.error.message) || detail; } catch (_) {}
    const err = new Error(detail);
    err.status = res.status;
    throw err;
  }
  return res.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function chart(target, label, color, opts) {
  const o = Object.assign({
    width: 420, height: 180,
    scales: { x: { time: false } },
    series: [{ label: "x" }, { label, stroke: color, width: 2, points: { show: true, size: 4 } }],
    axes: [{}, {}],
    legend: { show: true },
  }, opts || {});
  return new uPlot(o, [[], []], target);
}

// ----------------------------------------------------------------------------- key

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("key").focus();
}

async function start() {
  try {
    await api("/api/v1/training_runs?limit=1");
  } catch (e) {
    if (e.status === 401) { showLogin(state.key ? "That key was refused: " + e.message : ""); return; }
    showLogin("The server did not answer: " + e.message);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  document.getElementById("logout").hidden = !state.key;
  document.getElementById("who").textContent = state.key ? "key ••••" + state.key.slice(-4) : "local server (no keys)";
  if (!state.charts.util) {
    state.charts.util = chart(document.getElementById("chart-util"), "busy", "#2b6cb0",
      { scales: { x: { time: true }, y: { range: [0, 1] } } });
    state.charts.queue = chart(document.getElementById("chart-queue"), "queued + running", "#c05621",
      { scales: { x: { time: true } } });
    state.charts.memory = chart(document.getElementById("chart-memory"), "RSS MiB", "#2f855a",
      { scales: { x: { time: true } } });
  }
  await poll();
  loadModels();
}

// ----------------------------------------------------------------------------- polling

async function poll() {
  clearTimeout(state.timer);
  try {
    await Promise.all([pollServer(), pollRuns()]);
    window.biosConsole.ready = true;
  } catch (e) {
    if (e.status === 401) { showLogin("The key was refused: " + e.message); return; }
    console.warn("poll failed", e);
  }
  state.timer = setTimeout(poll, POLL_MS);
}

async function pollServer() {
  const [status, util] = await Promise.all([
    api("/api/v1/console/status"),
    api("/api/v1/engine/utilization?last=200").catch(() => null),
  ]);
  let queued = 0, rss = null;
  for (const m of status.models) {
    queued += m.queued_training + m.queued_samples + m.running;
    if (m.rss_mib !== null) rss = m.rss_mib;
  }
  push(state.queue, status.time, queued);
  state.charts.queue.setData(state.queue);
  if (rss !== null) { push(state.memory, status.time, rss); state.charts.memory.setData(state.memory); }
  if (util) {
    state.charts.util.setData([util.cycles.map(c => c.started_at), util.cycles.map(c => c.busy_fraction)]);
  }
}

function push(series, x, y) {
  series[0].push(x); series[1].push(y);
  if (series[0].length > SERIES_POINTS) { series[0].shift(); series[1].shift(); }
}

async function pollRuns() {
  const runs = [];
  for (let offset = 0; ; offset += 100) {
    const page = await api(`/api/v1/training_runs?limit=100&offset=${offset}`);
    runs.push(...page.training_runs);
    const total = page.cursor ? page.cursor.total_count : runs.length;
    if (!page.training_runs.length || runs.length >= total) break;
  }
  document.getElementById("runs-count").textContent = `(${runs.length})`;
  const changed = [];
  for (const run of runs) {
    let r = state.runs.get(run.training_run_id);
    if (!r) {
      r = { run, steps: [], metrics: null, lastRequest: null, checkpoints: 0, doneSeq: -1, pending: false };
      state.runs.set(run.training_run_id, r);
      addRun(r);
    }
    r.run = run;
    if (r.lastRequest !== run.last_request_time || r.pending) changed.push(r);
  }
  // Only runs with new requests since the last poll are read again (history is incremental).
  await Promise.all(changed.map(refreshRun));
}

async function refreshRun(r) {
  const id = encodeURIComponent(r.run.training_run_id);
  const [metrics, history, cks] = await Promise.all([
    api(`/api/v1/training_runs/${id}/metrics`),
    api(`/api/v1/training_runs/${id}/history?after_seq=${r.doneSeq}&after_step=${r.steps.length}`),
    api(`/api/v1/training_runs/${id}/checkpoints`),
  ]);
  r.metrics = metrics;
  r.steps.push(...history.steps);
  r.checkpoints = cks.checkpoints.length;
  r.lastRequest = r.run.last_request_time;
  // Requests still queued or running finish without a new request: poll the run until none.
  r.pending = false;
  for (const q of history.requests) {
    if (q.status === "queued" || q.status === "running") { r.pending = true; break; }
    r.doneSeq = q.seq_id;
  }
  render(r);
}

// ----------------------------------------------------------------------------- runs

function addRun(r) {
  const tr = document.createElement("tr");
  tr.dataset.runId = r.run.training_run_id;
  r.cells = {};
  for (const name of ["run", "base", "steps", "loss", "tokens", "cycles", "wait", "checkpoints"]) {
    const td = el("td", "", ["steps", "loss", "tokens", "wait", "checkpoints"].includes(name) ? "num" : "");
    r.cells[name] = td;
    tr.appendChild(td);
  }
  document.querySelector("#runs tbody").appendChild(tr);
  const fig = el("figure");
  fig.dataset.runId = r.run.training_run_id;
  fig.appendChild(el("figcaption", "loss per step: " + r.run.training_run_id));
  const box = el("div", null, "loss-chart");
  fig.appendChild(box);
  document.getElementById("curves").appendChild(fig);
  r.figure = fig;
  r.chart = chart(box, "loss", "#6b46c1", { width: 360, height: 170 });
}

function render(r) {
  const m = r.metrics || {};
  const last = r.steps.length ? r.steps[r.steps.length - 1].loss : null;
  r.cells.run.textContent = r.run.training_run_id + (r.run.corrupted ? " (lost)" : "");
  r.cells.base.textContent = r.run.base_model;
  r.cells.steps.textContent = m.steps ?? "";
  r.cells.loss.textContent = last === null || last === undefined ? "" : last.toFixed(4);
  r.cells.tokens.textContent = m.tokens ?? "";
  r.cells.cycles.textContent = `${m.cycles_with_work ?? 0} / ${m.missed_cycles ?? 0}`;
  r.cells.wait.textContent = m.queue_wait_s === undefined ? "" : m.queue_wait_s.toFixed(2) + " s";
  r.cells.checkpoints.textContent = r.checkpoints;
  const pts = r.steps.filter(s => s.loss !== null);
  r.chart.setData([pts.map(s => s.step), pts.map(s => s.loss)]);
  r.figure.dataset.points = String(pts.length);
}

// ----------------------------------------------------------------------------- playground

let controller = null;

async function loadModels() {
  const sel = document.getElementById("pg-model");
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    const models = (await res.json()).data || [];
    sel.replaceChildren(...models.map(m => { const o = el("option", m.id); o.value = m.id; return o; }));
  } catch (e) {
    console.warn("models", e);
  }
}

function authHeaders() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function sample(ev) {
  ev.preventDefault();
  const out = document.getElementById("pg-out");
  out.textContent = "";
  out.classList.remove("error");
  controller = new AbortController();
  document.getElementById("pg-go").disabled = true;
  document.getElementById("pg-stop").disabled = false;
  try {
    const res = await fetch("/v1/completions", {
      method: "POST", headers: authHeaders(), signal: controller.signal,
      body: JSON.stringify({
        model: document.getElementById("pg-model").value,
        prompt: document.getElementById("pg-prompt").value,
        max_tokens: Number(document.getElementById("pg-max").value),
        temperature: Number(document.getElementById("pg-temp").value),
        stream: true,
      }),
    });
    if (!res.ok) {
      const b = await res.json().catch(() => ({}));
      throw new Error((b.error && b.error.message) || b.detail || res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) out.textContent += c.text || "";
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { out.classList.add("error"); out.textContent += "\n" + e.message; }
  } finally {
    controller = null;
    document.getElementById("pg-go").disabled = false;
    document.getElementById("pg-stop").disabled = true;
  }
}

// ----------------------------------------------------------------------------- wiring

document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  state.key = document.getElementById("key").value.trim() || null;
  if (state.key) sessionStorage.setItem(KEY_ITEM, state.key); else sessionStorage.removeItem(KEY_ITEM);
  start();
});
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  state.key = null;
  clearTimeout(state.timer);
  location.reload();
});
document.getElementById("playground").addEventListener("submit", sample);
document.getElementById("pg-stop").addEventListener("click", () => controller && controller.abort());
if (typeof uPlot === "undefined") {
  document.getElementById("main").replaceChildren(el("p",
    "The charting library is not installed: run scripts/setup_console_assets.sh on the server.", "error"));
  document.getElementById("main").hidden = false;
} else {
  start();
}
