// The llmos console: plain JS, no libraries, nothing fetched but this server's own routes.
// Every text that comes from the server is set with textContent (never parsed as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { info: null, selected: null, follow: null, chat: [], chatAbort: null, samples: [] };

// -- helpers ------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function banner(message) {
  const b = $("#banner");
  b.textContent = message || "";
  b.hidden = !message;
}

async function api(path, body) {
  const opts = { headers: headers(body !== undefined) };
  if (body !== undefined) { opts.method = "POST"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return data;
}

// Server-sent events over fetch (EventSource cannot send an API key): calls onEvent with each
// parsed `data:` payload until [DONE], the end of the body, or `signal` aborts.
async function sse(path, { body, signal, onEvent }) {
  const opts = { headers: headers(body !== undefined), signal };
  if (body !== undefined) { opts.method = "POST"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || `${r.status} ${r.statusText}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new Error(parsed.error.message);
      onEvent(parsed);
    }
  }
}

const fmtInt = (n) => (n || 0).toLocaleString("en-US");
const fmtCost = (c) => `$${(c || 0).toFixed(6)}`;
const fmtAge = (t) => { const s = Math.max(0, Date.now() / 1000 - t); return s < 90 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(0)} min`; };
function cells(row, values) { for (const v of values) row.append(v instanceof Node ? el("td", {}, v) : el("td", {}, v)); return row; }

// -- tabs ---------------------------------------------------------------------------------
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `tab-${name}`;
  if (name === "usage") refreshUsage();
  if (name === "evals") refreshEvals();
  if (name === "engine") drawCharts();
}

// -- chat ---------------------------------------------------------------------------------
function num(id) { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); }

function chatRequest() {
  const req = {
    model: state.info ? state.info.model : undefined,
    messages: [{ role: "system", content: $("#s-system").value }, ...state.chat],
    stream: true,
    stream_options: { include_usage: true },
    temperature: num("#s-temperature"),
    top_p: num("#s-top_p"),
    max_tokens: num("#s-max_tokens"),
    seed: num("#s-seed"),
  };
  const topK = num("#s-top_k");
  if (topK !== undefined && topK !== -1) req.top_k = topK;
  const stop = $("#s-stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) req.stop = stop;
  if (!$("#s-system").value.trim()) req.messages.shift();
  const schema = $("#s-schema").value.trim();
  if (schema) req.response_format = { type: "json_schema", json_schema: { name: "console", schema: JSON.parse(schema) } };
  const tools = $("#s-tools").value.trim();
  if (tools) { req.tools = JSON.parse(tools); req.tool_choice = $("#s-tool_choice").value; }
  return req;
}

function addMessage(role, text) {
  const body = el("span", { class: "content" }, text);
  const node = el("div", { class: `msg ${role}` }, el("span", { class: "role" }, role), body);
  $("#chat-log").append(node);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return body;
}

async function sendChat(ev) {
  ev.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text || state.chatAbort) return;
  let req;
  try { req = chatRequest(); } catch (e) { banner(`settings: ${e.message}`); return; }
  banner("");
  $("#chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  req.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const calls = [];
  let answer = "", first = null, tokens = 0;
  const started = performance.now();
  state.chatAbort = new AbortController();
  $("#chat-send").disabled = true; $("#chat-stop").disabled = false;
  try {
    await sse("/v1/chat/completions", {
      body: req, signal: state.chatAbort.signal,
      onEvent: (chunk) => {
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const delta = choice.delta || {};
        if (delta.content) { first = first || performance.now(); answer += delta.content; }
        for (const c of delta.tool_calls || []) {
          calls[c.index] = calls[c.index] || { name: "", arguments: "" };
          if (c.function && c.function.name) calls[c.index].name += c.function.name;
          if (c.function && c.function.arguments) calls[c.index].arguments += c.function.arguments;
        }
        out.textContent = answer + calls.map((c) => `\n→ ${c.name}(${c.arguments})`).join("");
      },
    });
    const secs = (performance.now() - started) / 1000;
    const ttft = first ? ((first - started) / 1000).toFixed(2) : "-";
    $("#chat-stats").textContent = `${tokens} tokens in ${secs.toFixed(2)} s, first token after ${ttft} s`;
    state.chat.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name !== "AbortError") { out.parentElement.classList.add("error"); out.textContent = `error: ${e.message}`; }
    else state.chat.push({ role: "assistant", content: answer });
  } finally {
    out.parentElement.classList.remove("streaming");
    out.parentElement.classList.add("done");
    state.chatAbort = null;
    $("#chat-send").disabled = false; $("#chat-stop").disabled = true;
  }
}

// -- processes ----------------------------------------------------------------------------
async function refreshProcesses() {
  if (!state.info || !state.info.kernel) return;
  let list;
  try { list = await api("/v1/processes?limit=200"); } catch (e) { banner(`processes: ${e.message}`); return; }
  const body = $("#proc-table tbody");
  body.replaceChildren();
  for (const p of list.data) {
    const kill = el("button", { class: "kill", onclick: (e) => { e.stopPropagation(); killProcess(p.pid); } }, "kill");
    if (["done", "failed", "killed"].includes(p.status)) kill.disabled = true;
    const row = cells(el("tr", { "data-pid": p.pid, "data-status": p.status, onclick: () => openProcess(p.pid) }), [
      p.pid, `${p.program} v${p.program_version}`, p.owner || "-",
      el("span", { class: `status ${p.status}` }, p.status), p.steps,
      fmtInt(p.usage.total_tokens), fmtCost(p.usage.cost), fmtAge(p.created_at), kill,
    ]);
    body.append(row);
  }
}

async function spawnProcess(ev) {
  ev.preventDefault();
  const spec = $("#spawn-spec").value.trim();
  const req = { input: $("#spawn-input").value };
  try { req.program = spec ? JSON.parse(spec) : $("#spawn-program").value; } catch (e) { banner(`inline spec: ${e.message}`); return; }
  const ws = $("#spawn-workspace").value.trim();
  if (ws) req.workspace = ws;
  try {
    const p = await api("/v1/processes", req);
    banner("");
    await refreshProcesses();
    openProcess(p.pid);
  } catch (e) { banner(`spawn: ${e.message}`); }
}

async function killProcess(pid) {
  try { await api(`/v1/processes/${pid}/kill`, {}); } catch (e) { banner(`kill: ${e.message}`); }
  refreshProcesses();
}

async function decide(pid, callId, allow) {
  try { await api(`/v1/processes/${pid}/approve`, { call_id: callId, allow }); banner(""); } catch (e) { banner(`approve: ${e.message}`); }
}

function renderStep(step) {
  const kind = step.kind;
  let cls = `step ${kind}`;
  const parts = [];
  if (kind === "model_turn") {
    parts.push(el("div", { class: "head" }, `#${step.seq} model · ${step.prompt_tokens} prompt (${step.cached_tokens} cached) + ${step.completion_tokens} completion tokens · ${step.engine_seconds.toFixed(2)} s`));
    if (step.content) parts.push(el("div", {}, step.content));
    for (const c of step.tool_calls || []) parts.push(el("div", { class: "call" }, "→ ", el("code", {}, `${c.name}(${c.arguments})`)));
    if (step.malformed) parts.push(el("div", { class: "muted" }, `malformed: ${step.malformed}`));
  } else if (kind === "tool_call") {
    parts.push(el("div", { class: "head" }, `#${step.seq} tool call ${step.call_id}`), el("code", {}, `${step.name}(${step.arguments})`));
  } else if (kind === "tool_result") {
    cls += step.ok ? " ok" : " bad";
    parts.push(el("div", { class: "head" }, `#${step.seq} ${step.name} → ${step.ok ? "ok" : "error"}`), el("pre", {}, step.ok ? step.output : step.error));
  } else if (kind === "approval") {
    parts.push(el("div", { class: "head" }, `#${step.seq} approval of ${step.call_id}: ${step.allow ? "allowed" : "denied"}`));
  } else if (kind === "error") {
    parts.push(el("div", { class: "head" }, `#${step.seq} error (${step.what})`), el("div", {}, step.message));
  } else if (kind === "final_answer") {
    parts.push(el("div", { class: "head" }, `#${step.seq} answer`), el("div", {}, step.text));
  } else {
    parts.push(el("pre", {}, JSON.stringify(step)));
  }
  return el("div", { class: cls, "data-seq": step.seq }, ...parts);
}

function renderApprovals(pid, pending) {
  const box = $("#detail-approvals");
  box.replaceChildren();
  for (const a of pending || []) {
    box.append(el("div", { class: "approval", "data-call-id": a.call_id },
      el("span", {}, "approve?"), el("code", {}, `${a.name}(${a.arguments})`),
      el("button", { class: "approve primary", onclick: () => decide(pid, a.call_id, true) }, "Approve"),
      el("button", { class: "deny", onclick: () => decide(pid, a.call_id, false) }, "Deny")));
  }
}

function setStatus(status) {
  const s = $("#detail-status");
  s.textContent = status;
  s.className = `status ${status}`;
}

async function openProcess(pid) {
  if (state.follow) state.follow.abort();
  state.selected = pid;
  const follow = state.follow = new AbortController();
  $("#proc-detail").hidden = false;
  $("#detail-pid").textContent = pid;
  $("#detail-steps").replaceChildren();
  $("#detail-approvals").replaceChildren();
  $("#detail-answer").hidden = true;
  setStatus("");
  try {
    await sse(`/v1/processes/${pid}/events`, {
      signal: follow.signal,
      onEvent: (ev) => {
        if (ev.type === "process.step") $("#detail-steps").append(renderStep(ev.step));
        else if (ev.type === "process.status") { setStatus(ev.status); renderApprovals(pid, ev.pending_approvals); refreshProcesses(); }
        else if (ev.type === "process.done") {
          setStatus(ev.process.status);
          renderApprovals(pid, []);
          const a = $("#detail-answer");
          a.textContent = ev.process.answer || ev.process.reason || "";
          a.hidden = !a.textContent;
          refreshProcesses();
        }
      },
    });
  } catch (e) { if (e.name !== "AbortError") banner(`process ${pid}: ${e.message}`); }
}

// -- start --------------------------------------------------------------------------------
async function start() {
  $("#api-key").value = localStorage.getItem("llmos-api-key") || "";
  $("#api-key").addEventListener("change", () => { localStorage.setItem("llmos-api-key", $("#api-key").value.trim()); location.reload(); });
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) sendChat(e); });
  $("#chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
  $("#chat-clear").addEventListener("click", () => { state.chat = []; $("#chat-log").replaceChildren(); });
  $("#spawn-form").addEventListener("submit", spawnProcess);
  $("#budget-form").addEventListener("submit", setBudget);
  window.addEventListener("resize", drawCharts);
  try { state.info = await api("/v1/console/info"); } catch (e) { banner(`${e.message} (set the API key above)`); return; }
  $("#whoami").textContent = state.info.user ? `${state.info.user}${state.info.admin ? " (admin)" : ""}` : (state.info.admin ? "admin" : "");
  for (const n of document.querySelectorAll(".admin-only")) n.hidden = !state.info.admin;
  $("#spawn-program").replaceChildren(...state.info.programs.map((p) => el("option", { value: p }, p)));
  if (!state.info.kernel) $("#tab-processes").prepend(el("p", { class: "muted" }, "This server hosts no kernel."));
  document.body.dataset.ready = "1";
  followEngine();
  refreshProcesses();
  setInterval(() => { if (!$("#tab-processes").hidden) refreshProcesses(); }, 1000);
  setInterval(() => { if (!$("#tab-usage").hidden) refreshUsage(); }, 3000);
}

document.addEventListener("DOMContentLoaded", start);  // after panels.js, which it calls
