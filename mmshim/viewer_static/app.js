/* mmshim viewer: overview/jobs page and job page. Talks only to /api/v1 of the same origin. */
"use strict";

const API = "/api/v1";
const charts = [];

// ------------------------------------------------------------------ helpers

function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + u[i];
}

function dur(s) {
  if (s == null) return "–";
  if (s < 60) return s.toFixed(s < 1 ? 2 : s < 10 ? 1 : 0) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  if (s < 86400 * 2) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function money(v, cur) {
  if (v == null) return "–";
  const sym = (cur || "USD") === "USD" ? "$" : (cur + " ");
  const a = Math.abs(v);  // a short job costs fractions of a cent: show them, not $0.00
  return sym + (a >= 1000 ? Math.round(v).toLocaleString("en-US") : a > 0 && a < 0.01 ? v.toPrecision(2) : v.toFixed(2));
}

// Compute time in the unit that shows it: a short job keeps seconds, a long one hours.
function cpuTime(h) {
  if (h == null) return "–";
  if (h === 0 || h >= 1) return num(h, 1) + " vCPU-h";
  return h * 60 >= 1 ? (h * 60).toFixed(1) + " vCPU-min" : (h * 3600).toFixed(1) + " vCPU-s";
}

function num(v, d) { return v == null ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: d || 0 }); }

function when(t) {
  if (t == null) return "–";
  return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

async function api(path) {
  const r = await fetch(API + path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const err = new Error((body && body.message) || ("HTTP " + r.status));
    err.status = r.status;
    throw err;
  }
  return body;
}

function showError(e) {
  const box = document.getElementById("error");
  if (!box) return;
  box.hidden = false;
  box.textContent = "Could not load data: " + e.message;
}

function card(label, value, detail) {
  return el("div", { class: "card" }, el("div", { class: "label", text: label }),
    el("div", { class: "value", text: value }), el("div", { class: "detail", text: detail || "" }));
}

function chart(id) {
  const node = document.getElementById(id);
  if (!node || !window.echarts) return null;
  let c = echarts.getInstanceByDom(node);
  if (!c) { c = echarts.init(node, null, { renderer: "canvas" }); charts.push(c); }
  return c;
}

window.addEventListener("resize", () => charts.forEach((c) => c.resize()));

function statusPill(s) { return el("span", { class: "status " + s, text: s }); }

// ------------------------------------------------------------------ overview + jobs page

const state = { sort: "last_event", order: "desc", page: 1, per_page: 50 };

async function overviewPage() {
  loadOverview();
  loadDaily();
  setupFilters();
  loadJobs();
}

async function loadOverview() {
  let o;
  try { o = await api("/overview"); } catch (e) { showError(e); return; }
  const loading = document.getElementById("loading");
  if (o.loading) {
    loading.hidden = false;
    loading.textContent = `Reading the store: ${num(o.loading.done)} of ${num(o.loading.total)} jobs…`;
    setTimeout(loadOverview, 1500);
  } else {
    loading.hidden = true;
  }
  const c = o.cost, cur = c.currency;
  const rate = o.restores.success_rate == null ? "–" : (o.restores.success_rate * 100).toFixed(1) + " %";
  const cards = document.getElementById("cards");
  cards.replaceChildren(
    card("Jobs protected", num(o.jobs_protected), `of ${num(o.jobs)} jobs; ${num(o.jobs_restored)} restored`),
    card("Restores", `${num(o.restores.succeeded)} / ${num(o.restores.attempted)}`,
      `success rate ${rate}; ${num(o.restores.fallbacks)} fell back to a fresh start`),
    card("Checkpoints", num(o.checkpoints.taken), `${num(o.checkpoints.failed)} failed; ${num(o.checkpoints.in_store)} in store, ${bytes(o.checkpoints.bytes_stored)}`),
    card("Spot notices", num(o.spot_notices), `${num(o.rebalance_notices)} rebalance recommendations`),
    card("Compute kept", cpuTime(o.compute_hours_kept), `worth ${money(c.kept_usd, cur)} at the price paid (${money(c.kept_on_demand_usd, cur)} on-demand)`),
    card("Instance time", dur(3600 * (c.instance_hours.spot + c.instance_hours["on-demand"] + c.instance_hours.unknown)),
      `${dur(3600 * c.instance_hours.spot)} Spot, ${dur(3600 * c.instance_hours["on-demand"])} on-demand`),
    card("Cost", money(c.actual_usd, cur), `${money(c.spot_usd, cur)} Spot + ${money(c.on_demand_usd, cur)} on-demand`),
    card("Saved vs on-demand", money(c.savings_usd, cur), `all of it on-demand: ${money(c.on_demand_equivalent_usd, cur)}`),
  );
  const unpriced = Object.keys(c.unpriced_hours || {});
  const p = o.prices || {};
  document.getElementById("prices-note").textContent =
    `Costs use approximate ${p.region || ""} prices dated ${p.date || "?"} (${p.path || "price table"}), each job charged its vCPU share of the instance.` +
    (unpriced.length ? ` Not priced (not in the table): ${unpriced.join(", ")}.` : "");
}

async function loadDaily() {
  let d;
  try { d = await api("/series/daily"); } catch (e) { showError(e); return; }
  if (d.loading) setTimeout(loadDaily, 1500);
  const days = d.days.map((r) => r.date);
  const base = (yName, fmt, minInterval) => ({
    grid: { left: 64, right: 16, top: 28, bottom: 28 },
    tooltip: { trigger: "axis", valueFormatter: fmt },
    legend: { top: 0, textStyle: { fontSize: 11 } },
    xAxis: { type: "category", data: days },
    yAxis: { type: "value", name: yName, minInterval, axisLabel: { formatter: fmt } },
  });
  const size = chart("chart-size");
  if (size) size.setOption({ ...base("", bytes), series: [
    { name: "mean size", type: "line", data: d.days.map((r) => r.ckpt_size_mean), connectNulls: true },
    { name: "largest", type: "line", data: d.days.map((r) => r.ckpt_size_max), connectNulls: true },
    { name: "stored (new bytes)", type: "bar", data: d.days.map((r) => r.ckpt_stored) },
  ] }, true);
  const du = chart("chart-duration");
  if (du) du.setOption({ ...base("", dur), series: [
    { name: "mean duration", type: "line", data: d.days.map((r) => r.ckpt_duration_mean), connectNulls: true },
    { name: "longest", type: "line", data: d.days.map((r) => r.ckpt_duration_max), connectNulls: true },
    { name: "mean frozen", type: "line", data: d.days.map((r) => r.ckpt_frozen_mean), connectNulls: true },
  ] }, true);
  const rs = chart("chart-restores");
  if (rs) rs.setOption({ ...base("", (v) => num(v), 1), series: [
    { name: "restored", type: "bar", stack: "r", data: d.days.map((r) => r.restores_succeeded), itemStyle: { color: "#1f9d55" } },
    { name: "fell back", type: "bar", stack: "r", data: d.days.map((r) => r.fallbacks), itemStyle: { color: "#e08a00" } },
    { name: "spot notices", type: "line", data: d.days.map((r) => r.spot_notices), itemStyle: { color: "#d64545" } },
  ] }, true);
  const co = chart("chart-cost");
  const m = (v) => money(v, d.currency);
  if (co) co.setOption({ ...base("", m), series: [
    { name: "paid", type: "bar", data: d.days.map((r) => r.cost_usd), itemStyle: { color: "#2f6fdf" } },
    { name: "on-demand equivalent", type: "line", data: d.days.map((r) => r.on_demand_usd), itemStyle: { color: "#8a93a3" } },
    { name: "compute kept by restores", type: "line", data: d.days.map((r) => r.kept_usd), itemStyle: { color: "#1f9d55" } },
  ] }, true);
}

function setupFilters() {
  const form = document.getElementById("filters");
  let timer = null;
  const go = () => { state.page = 1; loadJobs(); };
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(go, 250); });
  form.addEventListener("reset", () => setTimeout(go, 0));
  form.addEventListener("submit", (e) => { e.preventDefault(); go(); });
  document.querySelectorAll("#jobs th[data-sort]").forEach((th) => {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      if (state.sort === key) state.order = state.order === "asc" ? "desc" : "asc";
      else { state.sort = key; state.order = ["job_id", "queue", "status"].includes(key) ? "asc" : "desc"; }
      state.page = 1;
      loadJobs();
    });
  });
}

let jobsSeq = 0;
async function loadJobs() {
  const form = document.getElementById("filters");
  const q = new URLSearchParams();
  for (const [k, v] of new FormData(form).entries()) if (v) q.set(k, v);
  q.set("sort", state.sort); q.set("order", state.order);
  q.set("page", state.page); q.set("per_page", state.per_page);
  const seq = ++jobsSeq;
  let r;
  try { r = await api("/jobs?" + q.toString()); } catch (e) { showError(e); return; }
  if (seq !== jobsSeq) return;
  if (r.loading) setTimeout(() => { if (seq === jobsSeq) loadJobs(); }, 1500);
  fillSelect(form.elements.status, Object.entries(r.facets.statuses).filter(([, n]) => n).map(([s, n]) => [s, `${s} (${n})`]));
  fillSelect(form.elements.queue, r.facets.queues.map((x) => [x, x]));
  document.querySelectorAll("#jobs th[data-sort]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.sort === r.sort);
    th.classList.toggle("asc", r.order === "asc");
  });
  const rows = r.jobs.map((j) => el("tr", { "data-job": j.job_id },
    el("td", { class: "mono" }, el("a", { href: "/jobs/" + encodeURIComponent(j.job_id), text: j.job_id })),
    el("td", {}, statusPill(j.status)),
    el("td", { text: j.queue || "–" }),
    el("td", { class: "num", text: num(j.attempts) }),
    el("td", { class: "num", text: num(j.checkpoints) }),
    el("td", { class: "num", text: bytes(j.bytes_stored) }),
    el("td", { class: "num", text: j.restores_attempted ? `${j.restores_succeeded}/${j.restores_attempted}` : "–" }),
    el("td", { class: "num", text: j.kept_vcpu_hours ? num(j.kept_vcpu_hours, 1) : "–" }),
    el("td", { class: "num", text: money(j.cost_usd) }),
    el("td", { text: j.last_event ? `${j.last_event.event} · ${when(j.last_event.time)}` : "–" }),
  ));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "10", text: "No jobs match." })));
  document.querySelector("#jobs tbody").replaceChildren(...rows);
  const pager = document.getElementById("pager");
  const prev = el("button", { type: "button", text: "‹ previous" });
  const next = el("button", { type: "button", text: "next ›" });
  prev.disabled = r.page <= 1; next.disabled = r.page >= r.pages;
  prev.addEventListener("click", () => { state.page--; loadJobs(); });
  next.addEventListener("click", () => { state.page++; loadJobs(); });
  pager.replaceChildren(prev, el("span", { text: `page ${r.page} of ${r.pages} · ${num(r.total)} jobs` }), next);
}

function fillSelect(sel, options) {
  const cur = sel.value;
  const first = sel.options[0];
  sel.replaceChildren(first, ...options.map(([v, t]) => el("option", { value: v, text: t })));
  sel.value = options.some(([v]) => v === cur) ? cur : "";
}

// ------------------------------------------------------------------ job page

const OUTCOME_COLORS = { succeeded: "#1f9d55", failed: "#d64545", reclaimed: "#e08a00", lost: "#8a93a3", running: "#2f6fdf" };

async function jobPage() {
  const jobId = decodeURIComponent(location.pathname.replace(/^\/jobs\//, ""));
  document.getElementById("crumb").textContent = jobId;
  document.title = "mmshim · " + jobId;
  let d;
  try { d = await api("/jobs/" + encodeURIComponent(jobId)); } catch (e) {
    if (e.status === 404) e.message = "this job is not in the store (any more)";
    showError(e); return;
  }
  const j = d.job;
  document.getElementById("job-title").textContent = j.job_id;
  document.getElementById("job-status").replaceWith(Object.assign(statusPill(j.status), { id: "job-status" }));
  const bundle = document.getElementById("bundle");
  bundle.href = API + "/jobs/" + encodeURIComponent(j.job_id) + "/bundle.tar.gz";
  bundle.setAttribute("download", "mmshim-" + j.job_id.replace(/:/g, "_") + "-logs.tar.gz");
  const span = j.first_event != null && j.last_event ? j.last_event.time - j.first_event : null;
  document.getElementById("cards").replaceChildren(
    card("Attempts", num(j.attempts), (j.hosts || []).join(", ")),
    card("Restores", j.restores_attempted ? `${j.restores_succeeded} / ${j.restores_attempted}` : "none",
      j.fallbacks ? `${j.fallbacks} fell back to a fresh start` : ""),
    card("Compute kept", cpuTime(j.kept_vcpu_hours), "run time restores did not repeat"),
    card("Checkpoints", num(j.checkpoints_committed), `${num(j.checkpoints_failed)} failed; ${num(j.checkpoints)} in store, ${bytes(j.bytes_stored)} stored`),
    card("Spot notices", num(j.spot_notices), (j.instance_types || []).join(", ")),
    card("Wall time", dur(span), `queue ${j.queue || "–"}`),
    card("Cost", money(j.cost_usd), j.exit_code != null ? `last exit code ${j.exit_code}` : ""),
  );
  timeline(d);
  checkpointChart(d);
  checkpointTable(d);
  eventTable(d);
}

function laneName(a) { return `#${a.attempt} ${a.host || "?"}`; }

function timeline(d) {
  const c = chart("timeline");
  const attempts = d.attempts;
  const lanes = attempts.map(laneName);
  const laneOf = {};
  attempts.forEach((a, i) => { laneOf[a.attempt] = i; });
  const runs = attempts.map((a, i) => ({
    value: [i, a.start * 1000, Math.max(a.end, a.outcome === "reclaimed" && a.spot_notice ? Math.min(a.spot_notice, a.end + 120) : a.end) * 1000],
    itemStyle: { color: OUTCOME_COLORS[a.outcome] || "#8a93a3", opacity: 0.35 },
    attempt: a,
  }));
  const marks = { checkpoint: [], failed: [], notice: [], reclaim: [], restore: [], fallback: [], exit: [] };
  const cpsById = {};
  for (const cp of d.checkpoints) cpsById[cp.checkpoint_id] = cp;
  let cur = attempts.length ? attempts[0].attempt : 1;
  for (const e of d.events) {
    if (typeof e.attempt === "number") cur = e.attempt;
    const lane = laneOf[cur];
    if (lane == null || typeof e.time !== "number") continue;
    const pt = (extra) => ({ value: [e.time * 1000, lane], ev: e, ...extra });
    switch (e.event) {
      case "checkpoint.committed": marks.checkpoint.push(pt()); break;
      case "checkpoint.failed": marks.failed.push(pt()); break;
      case "spot.notice": case "rebalance": marks.notice.push(pt()); break;
      case "restore.succeeded": marks.restore.push(pt()); break;
      case "restore.fallback": marks.fallback.push(pt()); break;
      case "exit": marks.exit.push(pt()); break;
      default: break;
    }
  }
  for (const a of attempts) {
    if (a.outcome === "reclaimed" || a.outcome === "lost") {
      const t = a.outcome === "reclaimed" && a.spot_notice ? Math.min(a.spot_notice, a.end + 120) : a.end;
      marks.reclaim.push({ value: [t * 1000, laneOf[a.attempt]], ev: { event: a.outcome === "reclaimed" ? "reclaimed by Spot" : "host lost (no exit recorded)", time: t, attempt: a.attempt } });
    }
  }
  const renderRun = (params, api) => {
    const lane = api.value(0);
    const s = api.coord([api.value(1), lane]);
    const e = api.coord([api.value(2), lane]);
    const h = api.size([0, 1])[1] * 0.5;
    const shape = echarts.graphic.clipRectByRect(
      { x: s[0], y: s[1] - h / 2, width: Math.max(2, e[0] - s[0]), height: h },
      { x: params.coordSys.x, y: params.coordSys.y, width: params.coordSys.width, height: params.coordSys.height });
    return shape && { type: "rect", transition: ["shape"], shape, style: api.style() };
  };
  const tip = (p) => {
    if (p.seriesName === "runs") {
      const a = p.data.attempt;
      return `<b>attempt ${a.attempt}</b> on ${esc(a.host)} (${esc(a.instance_type)}, ${esc(a.lifecycle)})<br>` +
        `${when(a.start)} → ${when(a.end)} (${dur(a.end - a.start)})<br>started: ${esc(a.mode)}` +
        (a.restored_from ? ` from ${esc(a.restored_from)}` : "") + `<br>outcome: <b>${esc(a.outcome)}</b>` +
        (a.exit_code != null ? ` (exit ${a.exit_code})` : "") + (a.fallback_reason ? `<br>fallback: ${esc(a.fallback_reason)}` : "") +
        (a.cost_usd != null ? `<br>cost ${money(a.cost_usd)}` : "");
    }
    const e = p.data.ev;
    let s = `<b>${esc(e.event)}</b> · ${when(e.time)}`;
    if (e.event === "checkpoint.committed") {
      const cp = cpsById[e.checkpoint_id] || {};
      s += `<br>${esc(e.checkpoint_id)} (${esc(e.trigger)})<br>size ${bytes(e.size)}, stored ${bytes(e.stored)}` +
        `<br>took ${dur(e.duration_s)}, frozen ${dur(e.frozen_s)}` + (cp.state ? `<br>in store: ${esc(cp.state)}` : "<br>no longer in the store");
    } else if (e.event === "checkpoint.failed") s += `<br>${esc(e.trigger)}: ${esc(e.reason)}`;
    else if (e.event === "spot.notice") s += `<br>${esc(e.action)} at ${when(e.notice_time)}`;
    else if (e.event === "restore.succeeded") s += `<br>from ${esc(e.checkpoint_id)} in ${dur(e.duration_s)}<br>kept ${dur(e.progress_s)} of run time`;
    else if (e.event === "restore.fallback") s += `<br>${esc(e.reason)}`;
    else if (e.event === "exit") s += `<br>exit code ${esc(e.exit_code)}`;
    return s;
  };
  const sc = (name, data, symbol, color, size) => ({
    name, type: "scatter", data, symbol, symbolSize: size || 12, itemStyle: { color }, z: 5,
  });
  if (c) c.setOption({
    grid: { left: 150, right: 30, top: 36, bottom: 56 },
    tooltip: { trigger: "item", formatter: tip, confine: true },
    legend: { top: 0, data: ["checkpoint", "checkpoint failed", "spot notice", "reclaim", "restore", "fallback", "exit"] },
    // weakFilter: a run that starts or ends outside the zoom window still shows (as in a Gantt chart)
    dataZoom: [{ type: "slider", xAxisIndex: 0, height: 18, bottom: 6, filterMode: "weakFilter" },
      { type: "inside", xAxisIndex: 0, filterMode: "weakFilter" }],
    xAxis: { type: "time", axisLabel: { hideOverlap: true } },
    yAxis: { type: "category", data: lanes, inverse: true, axisLabel: { width: 140, overflow: "truncate" } },
    series: [
      { name: "runs", type: "custom", renderItem: renderRun, encode: { x: [1, 2], y: 0 }, data: runs, z: 1 },
      sc("checkpoint", marks.checkpoint, "circle", "#2f6fdf", 10),
      sc("checkpoint failed", marks.failed, "path://M2,0L10,8L18,0L20,2L12,10L20,18L18,20L10,12L2,20L0,18L8,10L0,2Z", "#d64545", 12),
      sc("spot notice", marks.notice, "triangle", "#e08a00", 14),
      sc("reclaim", marks.reclaim, "pin", "#d64545", 22),
      sc("restore", marks.restore, "diamond", "#1f9d55", 16),
      sc("fallback", marks.fallback, "diamond", "#e08a00", 16),
      sc("exit", marks.exit, "rect", "#3d4757", 9),
    ].map((s) => s.type === "scatter" ? { ...s, encode: { x: 0, y: 1 } } : s),
  }, true);
  document.getElementById("lanes").replaceChildren(...attempts.map((a) => el("li", { "data-attempt": a.attempt },
    `Attempt ${a.attempt} on ${a.host || "?"} (${a.instance_type || "?"}, ${a.lifecycle || "?"}): ${a.mode === "restored" ? "restored from " + a.restored_from : a.mode === "fallback" ? "restore fell back (" + (a.fallback_reason || "?") + "), started fresh" : "started fresh"}` +
    ` · ${a.checkpoints} checkpoints` + (a.checkpoints_failed ? `, ${a.checkpoints_failed} failed` : "") +
    ` · ${a.outcome}` + (a.exit_code != null ? ` (exit ${a.exit_code})` : "") + ` · ${dur(a.end - a.start)}`)));
}

function checkpointChart(d) {
  const c = chart("chart-checkpoints");
  const evs = d.events.filter((e) => e.event === "checkpoint.committed" && typeof e.time === "number");
  if (!c) return;
  c.setOption({
    grid: { left: 70, right: 70, top: 30, bottom: 30 },
    legend: { top: 0 },
    tooltip: { trigger: "axis" },
    xAxis: { type: "time" },
    yAxis: [{ type: "value", name: "size", axisLabel: { formatter: bytes } },
      { type: "value", name: "seconds", axisLabel: { formatter: (v) => dur(v) } }],
    series: [
      { name: "size", type: "bar", barMaxWidth: 16, data: evs.map((e) => [e.time * 1000, e.size]), tooltip: { valueFormatter: bytes } },
      { name: "duration", type: "line", yAxisIndex: 1, data: evs.map((e) => [e.time * 1000, e.duration_s]), tooltip: { valueFormatter: dur } },
      { name: "frozen", type: "line", yAxisIndex: 1, data: evs.map((e) => [e.time * 1000, e.frozen_s]), tooltip: { valueFormatter: dur } },
    ],
  }, true);
}

function checkpointTable(d) {
  const rows = d.checkpoints.map((cp) => el("tr", { "data-checkpoint": cp.checkpoint_id },
    el("td", { class: "mono", text: cp.checkpoint_id }), el("td", {}, statusPill(cp.state)),
    el("td", { text: cp.trigger || "–" }), el("td", { text: cp.attempt == null ? "–" : cp.attempt }),
    el("td", { text: cp.host || "–" }), el("td", { class: "num", text: bytes(cp.size) }),
    el("td", { class: "num", text: bytes(cp.stored) }), el("td", { class: "num", text: dur(cp.duration_s) }),
    el("td", { class: "num", text: dur(cp.frozen_s) })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "9", text: "No checkpoints in the store." })));
  document.querySelector("#checkpoints tbody").replaceChildren(...rows);
}

const COMMON = new Set(["time", "event", "job_id", "attempt", "container_id", "host", "instance_id", "instance_type",
  "lifecycle", "queue", "compute_env", "vcpus"]);
const EV_CLASS = { "checkpoint.failed": "ev-bad", "restore.fallback": "ev-warn", "spot.notice": "ev-warn",
  "restore.succeeded": "ev-good", "checkpoint.committed": "ev-good" };

function eventTable(d) {
  const rows = d.events.map((e) => {
    const details = Object.entries(e).filter(([k]) => !COMMON.has(k)).map(([k, v]) => {
      if (k.endsWith("_s") && typeof v === "number") return `${k}=${dur(v)}`;
      if ((k === "size" || k === "stored") && typeof v === "number") return `${k}=${bytes(v)}`;
      if (k.endsWith("_time") && typeof v === "number") return `${k}=${when(v)}`;
      return `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`;
    }).join("  ");
    return el("tr", {}, el("td", { class: "mono", text: when(e.time) }), el("td", { text: e.attempt == null ? "–" : e.attempt }),
      el("td", { class: EV_CLASS[e.event] || "", text: e.event || "?" }), el("td", { text: e.host || "–" }),
      el("td", { class: "ev-details", text: details }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "5", text: "No events." })));
  document.querySelector("#events tbody").replaceChildren(...rows);
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  api("").then((r) => { const s = document.getElementById("store"); if (s) s.textContent = r.store; }).catch(() => {});
  const page = document.body.dataset.page;
  if (page === "overview") overviewPage();
  else if (page === "job") jobPage();
});
