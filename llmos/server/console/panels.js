// The llmos console, part 2: engine charts (plain canvas), usage and budgets, eval reports.
// Loaded after console.js, whose helpers ($, el, api, sse, state) it uses.
"use strict";

// -- engine charts ------------------------------------------------------------------------
const MAX_POINTS = 240;
const CHARTS = {
  "#chart-throughput": [["tokens_per_second", "#2f6fde", "tok/s"]],
  "#chart-kv": [["kv_pct", "#b06000", "used"], ["kv_pinned_pct", "#8e44ad", "pinned"]],
  "#chart-queue": [["num_requests_running", "#1e8e3e", "running"], ["num_requests_waiting", "#c5221f", "waiting"]],
  "#chart-cache": [["hit_pct", "#2f6fde", "hit rate"]],
};

function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  const data = state.samples;
  let max = 1;
  for (const [key] of series) for (const s of data) max = Math.max(max, s[key] || 0);
  g.strokeStyle = "#d9d9de"; g.fillStyle = "#6e6e73"; g.font = "11px system-ui"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (h - pad.t - pad.b) * (1 - i / 4);
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
    const v = (max * i) / 4;
    g.fillText(v >= 100 ? v.toFixed(0) : v.toFixed(1), 4, y + 4);
  }
  const x = (i) => pad.l + ((w - pad.l - pad.r) * i) / Math.max(MAX_POINTS - 1, 1);
  const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - (v || 0) / max);
  let lx = pad.l;
  for (const [key, color, label] of series) {
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    const off = MAX_POINTS - data.length;
    data.forEach((s, i) => (i ? g.lineTo(x(off + i), y(s[key])) : g.moveTo(x(off + i), y(s[key]))));
    g.stroke();
    g.fillStyle = color; g.fillText(label, lx, h - 4); lx += g.measureText(label).width + 14;
  }
  canvas.dataset.points = String(data.length);
  const last = data[data.length - 1];
  if (last) canvas.dataset.last = series.map(([k]) => (last[k] || 0).toFixed(3)).join(",");
}

function drawCharts() {
  if ($("#tab-engine").hidden) return;
  for (const [sel, series] of Object.entries(CHARTS)) drawChart($(sel), series);
}

function readouts(s) {
  const items = [
    ["tok/s", s.tokens_per_second.toFixed(1)], ["running", s.num_requests_running],
    ["waiting", s.num_requests_waiting], ["KV", `${s.kv_blocks_used}/${s.kv_blocks_total}`],
    ["pinned", s.kv_blocks_pinned], ["cache hits", `${(100 * s.prefix_cache_hits / Math.max(s.prefix_cache_queries, 1)).toFixed(1)} %`],
    ["preemptions", s.num_preemptions], ["steps", fmtInt(s.num_steps)], ["tokens", fmtInt(s.generated_tokens)],
  ];
  $("#readouts").replaceChildren(...items.map(([k, v]) => el("div", { class: "readout", "data-key": k }, el("b", {}, v), k)));
}

async function followEngine() {
  for (;;) {
    try {
      await sse("/v1/engine/stats/events?interval=0.5", {
        onEvent: (s) => {
          s.kv_pct = 100 * s.kv_usage;
          s.kv_pinned_pct = s.kv_blocks_total ? (100 * s.kv_blocks_pinned) / s.kv_blocks_total : 0;
          s.hit_pct = 100 * s.prefix_cache_hit_rate;
          state.samples.push(s);
          if (state.samples.length > MAX_POINTS) state.samples.shift();
          readouts(s);
          drawCharts();
        },
      });
    } catch (e) { banner(`engine stats: ${e.message}`); }
    await new Promise((r) => setTimeout(r, 2000));  // the server restarted or the key changed
  }
}

// -- usage and evals ----------------------------------------------------------------------
function usageRow(first, r) {
  return cells(el("tr"), [...first, r.calls, fmtInt(r.prompt_tokens), fmtInt(r.cached_tokens), fmtInt(r.completion_tokens), (r.engine_seconds || 0).toFixed(2), fmtCost(r.cost)]);
}

function budgetBar(used, max, text) {
  if (max === null || max === undefined) return `${text} (no limit)`;
  const pct = max > 0 ? Math.min(100, (100 * used) / max) : 100;
  const bar = el("div", { class: "bar", title: text }, el("span", { class: used >= max ? "over" : "", style: `width: ${pct}%` }));
  return el("div", {}, bar, text);
}

async function refreshUsage() {
  if (!state.info || !state.info.kernel) return;
  let u;
  try { u = await api("/v1/usage"); } catch (e) { banner(`usage: ${e.message}`); return; }
  $("#usage-users tbody").replaceChildren(...u.by_user.map((r) => usageRow([r.user || "-", r.model], r)));
  $("#usage-programs tbody").replaceChildren(...u.by_program.map((r) => usageRow([r.program, r.user || "-"], r)));
  $("#usage-budgets tbody").replaceChildren(...u.budgets.map((b) => cells(el("tr"), [b.user,
    budgetBar(b.used_tokens, b.max_tokens, `${fmtInt(b.used_tokens)} of ${b.max_tokens === null ? "∞" : fmtInt(b.max_tokens)}`),
    budgetBar(b.used_cost, b.max_cost, `${fmtCost(b.used_cost)} of ${b.max_cost === null ? "∞" : fmtCost(b.max_cost)}`)])));
}

async function setBudget(ev) {
  ev.preventDefault();
  const body = { user: $("#budget-user").value.trim(), max_tokens: num("#budget-tokens") ?? null, max_cost: num("#budget-cost") ?? null };
  try { await api("/v1/usage/budgets", body); banner(""); refreshUsage(); } catch (e) { banner(`budget: ${e.message}`); }
}

async function refreshEvals() {
  let runs;
  try { runs = await api("/v1/console/evals"); } catch (e) { banner(`evals: ${e.message}`); return; }
  $("#eval-runs tbody").replaceChildren(...runs.data.map((r) => cells(
    el("tr", { onclick: () => openEval(r.run_id) }),
    [r.run_id, r.suite || "", r.started_at ? new Date(r.started_at * 1000).toLocaleString() : "", r.passed ? "passed" : "failed"])));
}

async function openEval(runId) {
  const r = await fetch(`/v1/console/evals/${encodeURIComponent(runId)}`, { headers: headers(false) });
  if (!r.ok) { banner(`eval ${runId}: ${r.status}`); return; }
  const frame = $("#eval-frame");
  frame.srcdoc = await r.text();
  frame.hidden = false;
}
