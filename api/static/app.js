// Live page: the grid from the live feed (GET /events: a snapshot, then diffs; api/live.py), for one substation or
// a thousand. No build step, no dependencies: ES modules. Falls back to polling /status where EventSource is
// missing. With API_PUBLIC_READS off, reads need a bearer token: the page asks for one, keeps it in sessionStorage
// and reads the feed with fetch() (EventSource cannot send an Authorization header).
//
// Modules: grid.js holds the grid (snapshot + diffs, worst-first order, the filter, regions), heatmap.js draws the
// overview (a cell per substation), details.js the detailed rows of what is selected (parts: bar, numbers, trend,
// operator actions; another module may register one more), trends.js the 15-minute trends. Here: the feed, the
// filter and selection, totals, queue, latest answers, the event log, sign-in and operator actions.

import { $, ago, clock, esc, fmt, pct } from "./format.js";
import { GridModel } from "./grid.js";
import { dropCells, renderHeatmap } from "./heatmap.js";
import { renderDetails } from "./details.js";
import "./schedule.js";  // (registers the detail part that shows a substation's DSO limit schedule)
import { appendTrends, loadTrends } from "./trends.js";

/** Substations shown in detail when none is selected: the worst that match the filter. */
const DETAIL_ROWS = 12;
const model = new GridModel();
const selected = new Set();
const filter = { text: "", condition: "", region: "" };

function setBadge(el, cls, text) {
  el.className = `badge ${cls}`;
  el.textContent = text;
}

// ------------------------------------------------------------------------------------------- rendering
function renderQueue(q, now) {
  $("queue-len").textContent = q.known ? `${q.length} waiting${q.truncated ? ` (first ${q.entries.length} shown)` : ""}` : "(no data yet)";
  const body = $("queue");
  if (!q.entries.length) {
    body.innerHTML = '<tr><td colspan="7" class="empty">Nobody waiting.</td></tr>';
    return;
  }
  body.innerHTML = q.entries.map((e) => `<tr>
      <td>${e.position}</td><td>${esc(e.ev_id)}</td><td class="num">${fmt(e.requested_kw)}</td>
      <td class="num">${fmt(e.min_kw)}</td><td class="num">${e.priority}</td>
      <td class="num">${ago(Math.max(0, now - e.waiting_since))}</td><td class="num">${e.eta_s === null || e.eta_s === undefined ? "–" : ago(e.eta_s)}</td>
    </tr>`).join("");
}

function renderAssignments(list) {
  const box = $("assignments");
  if (!list.length) {
    box.innerHTML = '<li class="empty">No answers seen yet.</li>';
    return;
  }
  box.innerHTML = list.map((a) => {
    const what = a.status === "queued" ? `position ${a.position ?? "?"}${a.reason ? ` · ${esc(a.reason)}` : ""}`
      : [a.substation_id ? esc(a.substation_id) : null, a.granted_kw !== null && a.granted_kw !== undefined ? `${fmt(a.granted_kw)} kW` : null,
         a.reason ? esc(a.reason) : null].filter(Boolean).join(" · ");
    return `<li><span>${clock(a.ts)}</span><span>${esc(a.ev_id)}</span><span class="st ${esc(a.status)}">${esc(a.status)}</span><span>${what}</span></li>`;
  }).join("");
}

function renderEvents(list) {
  const box = $("events");
  if (!list.length) {
    box.innerHTML = '<li class="empty">Nothing has happened yet.</li>';
    return;
  }
  box.innerHTML = list.map((e) => `<li data-kind="${esc(e.kind)}"><span>${clock(e.ts)}</span>` +
    `<span class="ek ${esc(e.kind)}">${esc(e.kind.replace("_", " "))}</span><span>${esc(e.text)}</span></li>`).join("");
}

function renderTotals(t, decommissioned) {
  $("t-load").textContent = fmt(t.load_kw);
  $("t-capacity").textContent = fmt(t.capacity_kw);
  $("t-headroom").textContent = fmt(t.headroom_kw);
  $("t-util").textContent = pct(t.utilisation);
  $("t-sessions").textContent = t.sessions;
  $("t-queue").textContent = t.queue_length;
  $("t-offline").textContent = t.offline;
  $("t-offline-kw").textContent = t.offline ? `${fmt(t.offline_capacity_kw)} kW` : "";
  $("t-offline-card").classList.toggle("none", !t.offline);
  const gone = $("decommissioned");
  gone.hidden = !decommissioned.length;
  gone.textContent = decommissioned.length ? `${decommissioned.length} decommissioned recently (not shown, in no total)` : "";
  gone.title = decommissioned.map((d) => `${d.substation_id}${d.capacity_kw ? ` (${fmt(d.capacity_kw, 0)} kW)` : ""} at ${clock(d.at)}`).join(", ");
}

function renderRegions() {
  const select = $("f-region");
  const regions = model.regions();
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.join("\n") === regions.join("\n")) return;
  const current = select.value;
  select.innerHTML = '<option value="">every region</option>' + regions.map((r) => `<option value="${esc(r)}">${esc(r)}</option>`).join("");
  select.value = regions.includes(current) ? current : "";
  $("region-count").textContent = `${regions.length} region${regions.length === 1 ? "" : "s"}`;
}

/** The substations shown in detail: the selected ones, else the worst that match the filter. */
function detailed(list) {
  if (selected.size) return [...model.rows.values()].filter((s) => selected.has(s.substation_id))
    .sort((a, b) => list.indexOf(a) - list.indexOf(b));
  return list.slice(0, DETAIL_ROWS);
}

let pending = false;
let renderMs = 0;

function render() {
  pending = false;
  const t0 = performance.now();
  const p = model.parts;
  const now = model.ts;
  if (p.totals) renderTotals(p.totals, p.decommissioned || []);
  if (p.balancer) setBadge($("balancer-badge"), p.balancer.state, `balancer: ${p.balancer.state}${p.balancer.version ? ` ${p.balancer.version}` : ""}`);
  if (p.mqtt_connected === false) setBadge($("feed-badge"), "offline", "feed: API lost the broker");
  else setBadge($("feed-badge"), "online", "feed: live");
  $("updated").textContent = clock(now);
  $("updated").dateTime = new Date(now * 1000).toISOString();
  renderRegions();
  const list = model.list(filter);
  const box = $("heatmap");
  $("shown-count").textContent = `${list.length} of ${model.rows.size} shown`;
  for (const sid of model.changed) if (!model.rows.has(sid)) { dropCells([sid]); selected.delete(sid); }
  model.changed.clear();
  if (!model.rows.size) box.innerHTML = '<p class="empty">Waiting for substation data…</p>';
  else { box.querySelector(".empty")?.remove(); renderHeatmap(box, list, selected); }
  const shown = detailed(list);
  $("details-what").textContent = selected.size ? `${selected.size} selected (click a cell to add or remove)`
    : `the ${Math.min(DETAIL_ROWS, list.length)} worst that match (click cells to pick others)`;
  $("clear-selection").hidden = !selected.size;
  const fresh = shown.map((s) => s.substation_id);
  loadTrends(fresh, authHeaders()).then((got) => { if (got) schedule(); });
  appendTrends(shown, now);
  renderDetails($("substations"), shown, { now, selected, schedules: p.schedules || {} });
  if (p.queue) renderQueue(p.queue, now);
  if (p.latest_assignments) renderAssignments(p.latest_assignments);
  renderEvents(p.events || []);
  renderMs += performance.now() - t0;
  if (model.rows.size && !document.body.dataset.firstRenderMs) {
    document.body.dataset.firstRenderMs = performance.now().toFixed(0);  // (since navigation start)
  }
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  document.body.dataset.seq = String(model.seq);
  document.body.dataset.renderMs = renderMs.toFixed(1);
}

/** Render at most once per frame, however many events arrived. */
function schedule() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(render);
}

function onSnapshot(body) {
  model.applySnapshot(body);
  schedule();
}

/** An event of the feed, as text: counted (the benchmark reads body.dataset), parsed and applied. */
function received(kind, text) {
  const data = document.body.dataset;
  data.events = String(Number(data.events || 0) + 1);
  data.feedChars = String(Number(data.feedChars || 0) + text.length);
  if (kind === "snapshot") {
    data.snapshots = String(Number(data.snapshots || 0) + 1);
    data.snapshotChars = String(text.length);
    onSnapshot(JSON.parse(text));
  } else if (kind === "diff") onDiff(JSON.parse(text));
}

function onDiff(body) {
  if (!model.applyDiff(body)) {  // out of sequence: start again from a snapshot
    console.warn(`diff ${body.seq} does not follow ${model.seq}: reconnecting`);
    openFeed();
    return;
  }
  schedule();
}

/** /status in the feed's shape (polling, and the first picture before the feed connects). */
function fromStatus(body) {
  return { ...body, seq: null };
}

// ------------------------------------------------------------------------------------------- reading
const TOKEN_KEY = "gridlb.token";
const OPERATOR_KEY = "gridlb.operator";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});
const noise = () => $("show-noise").checked;
const feedPath = () => `/events${noise() ? "?noise=true" : ""}`;
let feed = { close() {} };  // the current stream: an EventSource, or an AbortController for the fetch stream

function askForToken(message) {
  if (message) sessionStorage.removeItem(TOKEN_KEY);
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setBadge($("feed-badge"), "unknown", "feed: needs a token");
  $("token").focus();
}

const STATUS_QUERY = "compact=true&order=worst";

function poll() {
  fetch(`/status?${STATUS_QUERY}${noise() ? "&noise=true" : ""}`, { headers: authHeaders() }).then((r) => {
    if (r.status === 401 || r.status === 403) { askForToken("this token may not read the grid"); return null; }
    return r.json().then((body) => onSnapshot(fromStatus(body)));
  }).catch(() => setBadge($("feed-badge"), "offline", "feed: API unreachable"))
    .finally(() => { if ($("login").hidden) setTimeout(poll, 2000); });
}

function onEventBlock(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (data.length) received(name, data.join("\n"));
}

// The feed with a token: fetch() streaming, parsed as Server-Sent Events; reconnects like EventSource does.
async function streamWithToken() {
  const abort = new AbortController();
  feed = { close: () => abort.abort() };
  try {
    const resp = await fetch(feedPath(), { headers: { ...authHeaders(), Accept: "text/event-stream" }, cache: "no-store", signal: abort.signal });
    if (resp.status === 401 || resp.status === 403) { askForToken("this token may not read the grid"); return; }
    if (!resp.ok || !resp.body) throw new Error(`feed answered ${resp.status}`);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        try { onEventBlock(buffer.slice(0, cut)); } catch (err) { console.error("bad feed event", err); }
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (err) {
    if (abort.signal.aborted) return;  // replaced by a new stream (noise toggled)
    console.warn("feed interrupted", err);
  }
  if (abort.signal.aborted) return;
  setBadge($("feed-badge"), "offline", "feed: reconnecting…");
  setTimeout(streamWithToken, 2000);
}

function openFeed() {
  feed.close();
  if (token()) {
    if (window.ReadableStream && window.TextDecoderStream) streamWithToken(); else poll();
    return;
  }
  if (!("EventSource" in window)) { poll(); return; }
  const source = new EventSource(feedPath());
  for (const kind of ["snapshot", "diff"]) {
    source.addEventListener(kind, (ev) => {
      try { received(kind, ev.data); } catch (err) { console.error(`bad ${kind}`, err); }
    });
  }
  source.onerror = () => setBadge($("feed-badge"), "offline", "feed: reconnecting…");
  feed = source;
}

async function connect() {
  let probe;
  try {  // (may this page read the grid? the feed's first event is the whole picture)
    probe = await fetch(`/status?${STATUS_QUERY}&limit=1`, { headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    setBadge($("feed-badge"), "offline", "feed: API unreachable");
    setTimeout(connect, 2000);
    return;
  }
  if (probe.status === 401 || probe.status === 403) {
    askForToken(token() ? "this token may not read the grid" : "");
    return;
  }
  $("login").hidden = true;
  checkOperator();
  openFeed();
}

// ------------------------------------------------------------------------------------------- operator actions
const operatorToken = () => sessionStorage.getItem(OPERATOR_KEY) || token();

async function whoami(value) {
  const resp = await fetch("/whoami", { headers: value ? { Authorization: `Bearer ${value}` } : {}, cache: "no-store" });
  return resp.ok ? resp.json() : null;
}

async function checkOperator() {
  const value = operatorToken();
  const me = value ? await whoami(value).catch(() => null) : null;
  const ok = Boolean(me && me.may_operate);
  document.body.classList.toggle("operator", ok);
  const button = $("operator-button");
  if (ok) setBadge(button, "online", `operator: ${me.name} (sign out)`);
  else setBadge(button, "unknown", "operator: sign in");
  return ok;
}

function showResult(text, failed) {
  const box = $("action-result");
  box.hidden = false;
  box.className = `action-result${failed ? " failed" : ""}`;
  box.textContent = text;
}

async function operate(method, path, body) {
  const headers = { Authorization: `Bearer ${operatorToken()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const answer = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      showResult(`${method} ${path}: ${resp.status} ${answer.detail || answer.title || ""}`, true);
      if (resp.status === 401 || resp.status === 403) checkOperator();
      return;
    }
    showResult(`${answer.action || method} ${answer.substation_id || ""}: done${answer.detail ? ` (${answer.detail})` : ""}`, false);
  } catch (err) {
    showResult(`${method} ${path}: ${err}`, true);
  }
}

function onSubstationClick(ev) {
  const button = ev.target.closest("button[data-action]");
  if (!button) return;
  const row = button.closest(".sub");
  const sid = encodeURIComponent(row.dataset.substation);
  const action = button.dataset.action;
  if (action === "drain" || action === "undrain") operate("POST", `/substations/${sid}/${action}`);
  else if (action === "clear-capacity") operate("PUT", `/substations/${sid}/capacity`, { capacity_kw: null });
  else if (action === "set-capacity") {
    const kw = Number(row.querySelector(".cap-input").value);
    if (!(kw > 0)) { showResult("enter a limit in kW (> 0)", true); return; }
    operate("PUT", `/substations/${sid}/capacity`, { capacity_kw: kw });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    connect();
  });
  $("operator-button").addEventListener("click", () => {
    if (document.body.classList.contains("operator")) {
      sessionStorage.removeItem(OPERATOR_KEY);
      document.body.classList.remove("operator");
      setBadge($("operator-button"), "unknown", "operator: sign in");
      if (token()) checkOperator();  // (the reading token may itself be an operator's)
      return;
    }
    $("operator-login").hidden = false;
    $("operator-token").focus();
  });
  $("operator-cancel").addEventListener("click", () => { $("operator-login").hidden = true; });
  $("operator-login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = $("operator-token").value.trim();
    if (!value) return;
    const me = await whoami(value).catch(() => null);
    if (!me || !me.may_operate) {
      $("operator-error").textContent = me ? `${me.name} is a ${me.role} token: it may not act as operator` : "unknown token";
      return;
    }
    sessionStorage.setItem(OPERATOR_KEY, value);
    $("operator-token").value = "";
    $("operator-error").textContent = "";
    $("operator-login").hidden = true;
    checkOperator();
  });
  $("substations").addEventListener("click", onSubstationClick);
  $("heatmap").addEventListener("click", (ev) => {
    const cell = ev.target.closest(".cell[data-substation]");
    if (!cell) return;
    const sid = cell.dataset.substation;
    if (selected.has(sid)) selected.delete(sid); else selected.add(sid);
    schedule();
  });
  $("filters").addEventListener("submit", (ev) => ev.preventDefault());
  $("clear-selection").addEventListener("click", () => { selected.clear(); schedule(); });
  const onFilter = () => {
    filter.text = $("f-text").value;
    filter.condition = $("f-condition").value;
    filter.region = $("f-region").value;
    schedule();
  };
  for (const id of ["f-text", "f-condition", "f-region"]) {
    $(id).addEventListener("input", onFilter);
    $(id).addEventListener("change", onFilter);
  }
  $("show-noise").addEventListener("change", openFeed);
  connect();
});
