// The ollama-batch dashboard: one fetch of /status and of a page of /v1/batches, then live
// updates from /events (Server-Sent Events). No framework, no build step.
"use strict";

const PAGE = 20;          // batches per page
const HISTORY_S = 600;    // the throughput chart shows the last 10 minutes

const key = new URLSearchParams(location.search).get("key");
const state = {
  live: null,             // the last `status` event (unfinished batches and their figures)
  page: [],               // batch objects of the page shown
  cursors: [null],        // `after` cursor of each page seen (index 0: the newest page)
  pageIndex: 0,
  hasMore: false,
  samples: [],            // [unix seconds, results so far] for the chart
  paused: false,
};

const $ = (id) => document.getElementById(id);

function withKey(path) {
  if (!key) return path;
  return path + (path.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(key);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (key) headers["Authorization"] = "Bearer " + key;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

function fmtInt(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function fmtBytes(b) {
  if (b == null) return "–";
  const gib = b / 2 ** 30;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (b / 2 ** 20).toFixed(0) + " MiB";
}
function fmtDuration(s) {
  if (s == null) return "–";
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + (s % 60) + " s";
  const h = Math.floor(m / 60);
  return h + " h " + (m % 60) + " min";
}
function fmtAgo(unix) {
  if (!unix) return "";
  const d = Math.max(0, Math.round(Date.now() / 1000 - unix));
  return d < 60 ? d + " s ago" : d < 3600 ? Math.floor(d / 60) + " min ago" : Math.floor(d / 3600) + " h ago";
}
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    // Through the CSSOM: the page's CSP forbids inline style attributes.
    else if (k === "style") for (const [p, val] of Object.entries(v)) e.style.setProperty(p, val);
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "onclick") e.addEventListener("click", v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// ---- health strip and counters --------------------------------------------------------

function renderHealth(s) {
  $("version").textContent = s.version ? "v" + s.version : "";
  const b = s.backend;
  const up = b.reachable;
  const st = $("backend-state");
  st.textContent = (up === false ? "down" : up === true ? "up" : "unknown") + " · " + b.kind;
  st.className = "big " + (up === false ? "down" : up === true ? "up" : "");
  $("backend-url").textContent = b.url + (b.down_since ? " · down since " + new Date(b.down_since * 1000).toLocaleTimeString() : "");
  $("backend-error").textContent = b.last_error || "";

  const models = (s.gpu && s.gpu.loaded_models) || [];
  if (models.length) {
    const m = models[0];
    $("model").textContent = m.name;
    $("model-detail").textContent = fmtBytes(m.size_vram_bytes) + " of " + fmtBytes(m.size_bytes) + " in GPU memory" +
      (m.context_length ? " · context " + fmtInt(m.context_length) : "");
    $("model-warning").textContent = m.on_cpu_bytes > 0 ? "⚠ " + fmtBytes(m.on_cpu_bytes) + " runs on the CPU: the run is several times slower" : "";
  } else {
    const running = state.page.find((x) => x.status === "in_progress" && x.model);
    $("model").textContent = b.model || (running && running.model) || "as each line says";
    $("model-detail").textContent = b.kind === "ollama" ? "no model loaded right now" : "";
    $("model-warning").textContent = "";
  }

  const gpu = $("gpu");
  gpu.replaceChildren();
  if (!s.gpu || !s.gpu.available) {
    gpu.append(el("div", { class: "big" }, "unavailable"),
      el("div", { class: "muted", id: "gpu-reason" }, (s.gpu && s.gpu.unavailable_reason) || ""));
  } else {
    for (const d of s.gpu.devices) {
      const pct = d.total_bytes ? (100 * d.used_bytes / d.total_bytes) : 0;
      const bar = el("div", { class: "bar" }, el("div", { class: "done", style: { width: pct.toFixed(1) + "%" } }));
      gpu.append(el("div", { class: "gpu-row" },
        "GPU" + d.index + " " + d.name + ": " + fmtBytes(d.used_bytes) + " / " + fmtBytes(d.total_bytes) + " (peak " + fmtBytes(d.peak_used_bytes) + ")", bar));
    }
  }

  $("concurrency").textContent = s.in_flight + " in flight";
  $("concurrency-detail").textContent = "limit " + s.concurrency.current + " of " + s.concurrency.max +
    (s.concurrency.current < s.concurrency.max ? " (lowered after out-of-memory)" : "");

  for (const k of ["queued", "retry_wait", "in_flight", "succeeded", "failed", "remaining"]) {
    $("c-" + k).textContent = fmtInt(s.requests[k]);
  }
}

// ---- throughput chart -----------------------------------------------------------------

function addSample(s) {
  const now = s.at || Date.now() / 1000;
  state.samples.push([now, s.counters.results]);
  while (state.samples.length > 2 && now - state.samples[0][0] > HISTORY_S) state.samples.shift();
}

function renderChart() {
  const svg = $("chart");
  const W = 600, H = 120;
  const pts = [];
  for (let i = 1; i < state.samples.length; i++) {
    const [t0, r0] = state.samples[i - 1];
    const [t1, r1] = state.samples[i];
    if (t1 > t0) pts.push([t1, Math.max(0, (r1 - r0) / (t1 - t0))]);
  }
  const now = Date.now() / 1000;
  const max = Math.max(1, ...pts.map((p) => p[1]));
  const x = (t) => W - ((now - t) / HISTORY_S) * W;
  const y = (v) => H - 4 - (v / max) * (H - 12);
  let grid = "";
  for (const f of [0.25, 0.5, 0.75]) grid += `<line class="grid" x1="0" x2="${W}" y1="${y(max * f)}" y2="${y(max * f)}"/>`;
  if (pts.length < 2) {
    svg.innerHTML = grid;
  } else {
    const line = pts.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    const area = `${x(pts[0][0]).toFixed(1)},${H} ${line} ${x(pts[pts.length - 1][0]).toFixed(1)},${H}`;
    svg.innerHTML = grid + `<polygon class="area" points="${area}"/><polyline class="line" points="${line}"/>`;
  }
  const last = pts.length ? pts[pts.length - 1][1] : 0;
  $("rate-now").textContent = "· " + last.toFixed(1) + " requests/s now, peak " + max.toFixed(1);
}

// ---- batches ----------------------------------------------------------------------------

async function loadPage() {
  const after = state.cursors[state.pageIndex];
  const q = "/v1/batches?limit=" + PAGE + (after ? "&after=" + encodeURIComponent(after) : "");
  try {
    const page = await api(q);
    state.page = page.data;
    state.hasMore = page.has_more;
    if (page.has_more && page.last_id) state.cursors[state.pageIndex + 1] = page.last_id;
  } catch (e) {
    $("batches").replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "error" }, "Cannot list batches: " + e.message)));
    return;
  }
  renderBatches();
}

function liveOf(id) {
  return state.live && state.live.batches.find((b) => b.id === id);
}

async function cancel(id) {
  try { await api("/v1/batches/" + id + "/cancel", { method: "POST" }); } catch (e) { alert(e.message); }
  loadPage();
}

function renderBatches() {
  const body = $("batches");
  body.replaceChildren();
  if (!state.page.length) {
    body.append(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No batches yet.")));
  }
  for (const b of state.page) {
    const live = liveOf(b.id);
    const status = (live && live.status) || b.status;
    const total = live ? live.total : b.request_counts.total;
    const done = live ? live.completed : b.request_counts.completed;
    const failed = live ? live.failed : b.request_counts.failed;
    const p = live && live.progress;
    const pctDone = total ? 100 * done / total : 0;
    const pctFail = total ? 100 * failed / total : 0;
    const bar = el("div", { class: "bar", title: fmtInt(done) + " succeeded, " + fmtInt(failed) + " failed of " + fmtInt(total) },
      el("div", { class: "done", style: { width: pctDone.toFixed(2) + "%" } }),
      el("div", { class: "fail", style: { left: pctDone.toFixed(2) + "%", width: pctFail.toFixed(2) + "%" } }));
    const usage = b.usage || {};
    const prompt = p ? p.prompt_tokens : usage.input_tokens;
    const completion = p ? p.completion_tokens : usage.output_tokens;
    let cached = "–";
    if (p) {
      cached = p.cached_share == null ? (p.answers_without_cached_figure ? "unknown" : "–") : (100 * p.cached_share).toFixed(1) + " %";
    } else if (usage.input_tokens_details && usage.input_tokens_details.cached_tokens_reported === false) {
      cached = usage.input_tokens ? "unknown" : "–";
    } else if (usage.input_tokens_details && usage.input_tokens) {
      cached = (100 * usage.input_tokens_details.cached_tokens / usage.input_tokens).toFixed(1) + " %";
    }
    const conversation = (live ? live.mode : b.metadata && b.metadata.mode) === "conversation";
    const actions = el("td", {});
    if (status === "validating" || status === "in_progress") {
      actions.append(el("button", { type: "button", onclick: () => cancel(b.id) }, "Cancel"));
    }
    if (b.output_file_id) actions.append(el("a", { href: withKey("/v1/files/" + b.output_file_id + "/content"), download: b.id + "_output.jsonl" }, "output"));
    if (b.error_file_id) actions.append(el("a", { href: withKey("/v1/files/" + b.error_file_id + "/content"), download: b.id + "_errors.jsonl" }, "errors"));
    body.append(el("tr", { "data-batch-id": b.id, "data-status": status, "data-done": String(done + failed), "data-total": String(total) },
      el("td", { class: "id", title: new Date(b.created_at * 1000).toLocaleString() }, b.id.slice(0, 16) + "…", el("div", { class: "muted" }, fmtAgo(b.created_at) + (conversation ? " · conversation mode" : ""))),
      el("td", {}, el("span", { class: "pill " + status }, status.replace("_", " "))),
      el("td", {}, bar),
      el("td", {}, fmtInt(done + failed) + " / " + fmtInt(total) + (failed ? " (" + fmtInt(failed) + " failed)" : ""), answersLine(p)),
      el("td", {}, p && p.requests_per_second_recent != null ? p.requests_per_second_recent.toFixed(1) + "/s" : "–"),
      el("td", {}, p ? fmtDuration(p.eta_seconds) : "–"),
      el("td", {}, fmtInt(prompt) + " / " + fmtInt(completion)),
      el("td", {}, cached),
      actions));
  }
  $("page").textContent = "page " + (state.pageIndex + 1);
  $("newer").disabled = state.pageIndex === 0;
  $("older").disabled = !state.hasMore;
}

// JSON answers of a running batch: checked, fences removed, re-asks, rejected; lines reused.
function answersLine(p) {
  const a = p && p.answers;
  if (!a || !(a.checked || a.reused)) return "";
  const parts = [];
  if (a.checked) parts.push(fmtInt(a.checked) + " checked");
  if (a.fenced) parts.push(fmtInt(a.fenced) + " fenced");
  if (a.reasks) parts.push(fmtInt(a.reasks) + " re-asked");
  if (a.invalid) parts.push(fmtInt(a.invalid) + " invalid");
  if (a.truncated) parts.push(fmtInt(a.truncated) + " truncated");
  if (a.reused) parts.push(fmtInt(a.reused) + " reused");
  return el("div", { class: "muted answers" }, parts.join(" · "));
}

function renderErrors(s) {
  const ul = $("errors");
  ul.replaceChildren();
  const errs = (s.recent_errors || []).slice().reverse();
  if (!errs.length) ul.append(el("li", { class: "muted" }, "None."));
  for (const e of errs) {
    ul.append(el("li", {},
      el("span", { class: e.is_final ? "final" : "" }, e.is_final ? "failed " : "retry "),
      new Date(e.at * 1000).toLocaleTimeString() + " · " + e.batch.slice(0, 16) + "… line " + e.line + " · try " + e.attempt + " · " + e.error));
  }
}

// ---- live updates -------------------------------------------------------------------------

function onStatus(s) {
  state.live = s;
  addSample(s);
  if (state.paused) return;
  renderHealth(s);
  renderChart();
  renderBatches();
  renderErrors(s);
  document.body.dataset.ready = "1";
}

function connect() {
  const beacon = $("beacon");
  const es = new EventSource(withKey("/events"));
  es.addEventListener("open", () => { beacon.textContent = "live"; beacon.className = "beacon on"; });
  es.addEventListener("error", () => { beacon.textContent = "reconnecting…"; beacon.className = "beacon off"; });
  es.addEventListener("status", (ev) => onStatus(JSON.parse(ev.data)));
  for (const kind of ["batch_created", "batch_validated", "batch_failed", "batch_finished", "lagged"]) {
    es.addEventListener(kind, () => { if (!state.paused) loadPage(); });
  }
}

$("pause").addEventListener("click", () => {
  state.paused = !state.paused;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  $("beacon").className = "beacon " + (state.paused ? "paused" : "on");
  $("beacon").textContent = state.paused ? "paused" : "live";
  if (!state.paused && state.live) onStatus(state.live);
});
$("older").addEventListener("click", () => { state.pageIndex += 1; loadPage(); });
$("newer").addEventListener("click", () => { state.pageIndex = Math.max(0, state.pageIndex - 1); loadPage(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden && state.live) onStatus(state.live); });

loadPage().then(connect);
setInterval(() => { if (!state.paused && !document.hidden) loadPage(); }, 10000);
