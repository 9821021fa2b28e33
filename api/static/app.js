// Live page: renders the /status snapshot the API pushes over Server-Sent Events (GET /events).
// No build step, no dependencies. Falls back to polling /status where EventSource is missing.
// With API_PUBLIC_READS off, reads need a bearer token: the page asks for one, keeps it in sessionStorage and
// reads the feed with fetch() (EventSource cannot send an Authorization header).
// Per substation: a 15-minute trend (load, EV load, limit: GET /trends once, then a point per snapshot at most every
// step_s), and, for an operator, drain/undrain and the capacity limit. An event log; probe noise hidden unless asked.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(digits);
const pct = (v) => (v === null || v === undefined) ? "–" : Math.round(v * 100).toString();
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const clock = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString([], { hour12: false }) : "–";
const ago = (s) => {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);  // round once, then split: 7199.5 s is "2 h 0 min", never "1 h 60 min"
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  const m = Math.round(s / 60);
  return `${Math.floor(m / 60)} h ${m % 60} min`;
};

function setBadge(el, cls, text) {
  el.className = `badge ${cls}`;
  el.textContent = text;
}

// ------------------------------------------------------------------------------------------- trends
const TREND_W = 240, TREND_H = 46;
const trend = { step: 10, window: 900, series: new Map() };  // sid -> {t, load, ev, lim}

function trendOf(sid) {
  let tr = trend.series.get(sid);
  if (!tr) { tr = { t: [], load: [], ev: [], lim: [] }; trend.series.set(sid, tr); }
  return tr;
}

async function loadTrends() {
  try {
    const resp = await fetch("/trends", { headers: authHeaders(), cache: "no-store" });
    if (!resp.ok) return;
    const body = await resp.json();
    trend.step = body.step_s;
    trend.window = body.window_s;
    for (const [sid, s] of Object.entries(body.substations)) {
      trend.series.set(sid, { t: s.t.slice(), load: s.load_kw.slice(), ev: s.ev_load_kw.slice(), lim: s.limit_kw.slice() });
    }
  } catch (err) {
    console.warn("trends unavailable", err);
  }
}

function appendTrends(snap) {
  const live = new Set();
  for (const s of snap.substations) {
    live.add(s.substation_id);
    const tr = trendOf(s.substation_id);
    const last = tr.t.length ? tr.t[tr.t.length - 1] : -Infinity;
    if (snap.ts - last >= trend.step && s.online && !s.stale) {
      const load = s.load_kw ?? null;
      tr.t.push(snap.ts); tr.load.push(load);
      tr.ev.push(load !== null && s.base_load_kw !== null && s.base_load_kw !== undefined ? Math.max(0, load - s.base_load_kw) : null);
      tr.lim.push(s.limit_kw ?? null);
    }
    while (tr.t.length && snap.ts - tr.t[0] > trend.window) { tr.t.shift(); tr.load.shift(); tr.ev.shift(); tr.lim.shift(); }
  }
  for (const sid of [...trend.series.keys()]) if (!live.has(sid)) trend.series.delete(sid);
}

function drawTrend(row, s, now) {
  const tr = trend.series.get(s.substation_id);
  const svg = row.querySelector(".trend");
  const values = tr ? [...tr.load, ...tr.lim].filter((v) => v !== null) : [];
  const top = Math.max(s.capacity_kw || 0, ...values, 1) * 1.05;
  const x = (t) => (((t - (now - trend.window)) / trend.window) * TREND_W).toFixed(1);
  const y = (v) => (TREND_H - 1 - (v / top) * (TREND_H - 2)).toFixed(1);
  for (const key of ["load", "ev", "lim"]) {
    const pts = tr ? tr.t.map((t, i) => tr[key][i] === null ? null : `${x(t)},${y(tr[key][i])}`).filter(Boolean) : [];
    svg.querySelector(`polyline.${key}`).setAttribute("points", pts.join(" "));
  }
  svg.dataset.points = tr ? String(tr.t.length) : "0";
  svg.setAttribute("aria-label", `${s.substation_id}: last ${Math.round(trend.window / 60)} minutes, ${tr ? tr.t.length : 0} samples`);
}

// ------------------------------------------------------------------------------------------- substations
let schedules = {};  // substation id -> its limit schedule (what binds now, the next intervals), from the snapshot

function scheduleLine(s, now) {
  const sched = schedules[s.substation_id];
  const binds = s.limit_source && s.limit_source !== "capacity"
    ? ` · limit set by <b class="limit-source">${esc(s.limit_source)}</b>` : "";
  if (!sched || !sched.composite.length) return binds;
  const slots = sched.composite.map((c) => {
    const on = c.start <= now && now < c.end;
    return `<span class="slot${on ? " now" : ""}">${clock(c.start)}–${clock(c.end)} ` +
      `<b>${fmt(c.limit_kw)}</b> kW ${esc(c.source)}</span>`;
  }).join(", ");
  return `${binds}<br><span class="schedule">schedule: ${slots}</span>`;
}

function subRow(s, now) {
  let row = document.querySelector(`.sub[data-substation="${CSS.escape(s.substation_id)}"]`);
  if (!row) {
    row = document.createElement("div");
    row.className = "sub";
    row.dataset.substation = s.substation_id;
    row.innerHTML = `
      <div class="name"><span class="sid"></span><span class="chip"></span></div>
      <div class="track" role="img">
        <div class="seg base"></div><div class="seg ev"></div><div class="seg reserved"></div>
        <div class="mark lim" title="limit"></div><div class="mark cap" title="capacity"></div>
        <span class="pct"></span>
      </div>
      <div class="nums"></div>
      <svg class="trend" viewBox="0 0 ${TREND_W} ${TREND_H}" preserveAspectRatio="none" role="img">
        <polyline class="lim"></polyline><polyline class="load"></polyline><polyline class="ev"></polyline>
      </svg>
      <div class="ops">
        <button type="button" class="drain" data-action="drain"></button>
        <label>operator limit <input type="number" class="cap-input" min="1" step="1" placeholder="kW"></label>
        <button type="button" data-action="set-capacity">set limit</button>
        <button type="button" data-action="clear-capacity">remove limit</button>
      </div>`;
    row.querySelector(".sid").textContent = s.substation_id;
    row.querySelector(".track").id = `bar-${s.substation_id}`;
  }
  const cap = s.capacity_kw || 0;
  const load = s.load_kw ?? 0;
  const base = Math.min(s.base_load_kw ?? load, load);
  const reserved = s.reserved_kw ?? 0;
  const scale = Math.max(cap * 1.15, load + reserved, 1);
  const at = (kw) => `${Math.max(0, Math.min(100, (kw / scale) * 100)).toFixed(2)}%`;
  const seg = (cls, from, to) => {
    const el = row.querySelector(`.seg.${cls}`);
    el.style.left = at(from);
    el.style.width = at(Math.max(0, to - from));
  };
  seg("base", 0, base);
  seg("ev", base, load);
  seg("reserved", load, load + reserved);
  const capMark = row.querySelector(".mark.cap");
  capMark.style.left = at(cap);
  capMark.style.display = cap ? "" : "none";
  const limMark = row.querySelector(".mark.lim");
  limMark.style.left = at(s.limit_kw ?? 0);
  limMark.style.display = s.limit_kw ? "" : "none";

  row.className = `sub ${s.condition}`;
  const chip = row.querySelector(".name .chip");
  chip.className = `chip ${s.condition}`;
  chip.textContent = s.condition;
  const track = row.querySelector(".track");
  track.dataset.loadKw = fmt(load);
  track.dataset.capacityKw = fmt(cap);
  track.setAttribute("aria-label", `${s.substation_id}: ${fmt(load)} of ${fmt(cap)} kW`);
  row.querySelector(".pct").textContent = `${pct(s.utilisation)} %`;
  const limited = s.capacity_limit_kw !== null && s.capacity_limit_kw !== undefined
    ? ` · operator limit <b class="op-limit">${fmt(s.capacity_limit_kw)}</b>` : "";
  row.querySelector(".nums").innerHTML =
    `<span class="load" id="load-${esc(s.substation_id)}"><b>${fmt(load)}</b> / <b>${fmt(cap)}</b> kW</span>` +
    ` · headroom <b>${fmt(s.headroom_kw)}</b> kW<br>` +
    `EV <b>${fmt(s.granted_kw)}</b> kW in <b>${s.sessions_total}</b> session${s.sessions_total === 1 ? "" : "s"}` +
    limited + ` · telemetry ${ago(s.telemetry_age_s)} ago` + scheduleLine(s, now);
  const drain = row.querySelector("button.drain");
  drain.dataset.action = s.draining ? "undrain" : "drain";
  drain.textContent = s.draining ? "undrain" : "drain";
  drawTrend(row, s, now);
  return row;
}

function renderSubstations(subs, now) {
  const box = $("substations");
  if (!subs.length) {
    box.innerHTML = '<p class="empty">Waiting for substation data…</p>';
    return;
  }
  box.querySelector(".empty")?.remove();
  const rows = subs.map((s) => subRow(s, now));
  const keep = new Set(rows);
  for (const child of [...box.children]) if (!keep.has(child)) child.remove();
  rows.forEach((row, i) => { if (box.children[i] !== row) box.insertBefore(row, box.children[i] || null); });
}

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
  gone.textContent = decommissioned.length ? "Decommissioned (in no total): " + decommissioned.map(
    (d) => `${d.substation_id}${d.capacity_kw ? ` (${fmt(d.capacity_kw, 0)} kW)` : ""} at ${clock(d.at)}`).join(", ") : "";
}

function render(snap) {
  schedules = snap.schedules || {};
  renderTotals(snap.totals, snap.decommissioned || []);
  const b = snap.balancer;
  setBadge($("balancer-badge"), b.state, `balancer: ${b.state}${b.version ? ` ${b.version}` : ""}`);
  if (!snap.mqtt_connected) setBadge($("feed-badge"), "offline", "feed: API lost the broker");
  else setBadge($("feed-badge"), "online", "feed: live");
  $("updated").textContent = clock(snap.ts);
  $("updated").dateTime = new Date(snap.ts * 1000).toISOString();
  appendTrends(snap);
  renderSubstations(snap.substations, snap.ts);
  renderQueue(snap.queue, snap.ts);
  renderAssignments(snap.latest_assignments);
  renderEvents(snap.events || []);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
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

function poll() {
  fetch(`/status${noise() ? "?noise=true" : ""}`, { headers: authHeaders() }).then((r) => {
    if (r.status === 401 || r.status === 403) { askForToken("this token may not read the grid"); return null; }
    return r.json().then(render);
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
  if (name === "snapshot" && data.length) render(JSON.parse(data.join("\n")));
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
        try { onEventBlock(buffer.slice(0, cut)); } catch (err) { console.error("bad snapshot", err); }
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
  source.addEventListener("snapshot", (ev) => {
    try { render(JSON.parse(ev.data)); } catch (err) { console.error("bad snapshot", err); }
  });
  source.onerror = () => setBadge($("feed-badge"), "offline", "feed: reconnecting…");
  feed = source;
}

async function connect() {
  let probe;
  try {
    probe = await fetch("/status", { headers: authHeaders(), cache: "no-store" });
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
  await loadTrends();
  if (probe.ok) render(await probe.json());
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
  $("show-noise").addEventListener("change", openFeed);
  connect();
});
