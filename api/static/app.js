// Live page: renders the /status snapshot the API pushes over Server-Sent Events (GET /events).
// No build step, no dependencies. Falls back to polling /status where EventSource is missing.
// With API_PUBLIC_READS off, reads need a bearer token: the page asks for one, keeps it in sessionStorage and
// reads the feed with fetch() (EventSource cannot send an Authorization header).
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

function subRow(s) {
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
      <div class="nums"></div>`;
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
    ? ` · operator limit <b>${fmt(s.capacity_limit_kw)}</b>` : "";
  row.querySelector(".nums").innerHTML =
    `<span class="load" id="load-${esc(s.substation_id)}"><b>${fmt(load)}</b> / <b>${fmt(cap)}</b> kW</span>` +
    ` · headroom <b>${fmt(s.headroom_kw)}</b> kW<br>` +
    `EV <b>${fmt(s.granted_kw)}</b> kW in <b>${s.sessions_total}</b> session${s.sessions_total === 1 ? "" : "s"}` +
    limited + ` · telemetry ${ago(s.telemetry_age_s)} ago`;
  return row;
}

function renderSubstations(subs) {
  const box = $("substations");
  if (!subs.length) {
    box.innerHTML = '<p class="empty">Waiting for substation data…</p>';
    return;
  }
  const rows = subs.map(subRow);
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

function render(snap) {
  const t = snap.totals;
  $("t-load").textContent = fmt(t.load_kw);
  $("t-capacity").textContent = fmt(t.capacity_kw);
  $("t-headroom").textContent = fmt(t.headroom_kw);
  $("t-util").textContent = pct(t.utilisation);
  $("t-sessions").textContent = t.sessions;
  $("t-queue").textContent = t.queue_length;
  const b = snap.balancer;
  setBadge($("balancer-badge"), b.state, `balancer: ${b.state}${b.version ? ` ${b.version}` : ""}`);
  if (!snap.mqtt_connected) setBadge($("feed-badge"), "offline", "feed: API lost the broker");
  else setBadge($("feed-badge"), "online", "feed: live");
  $("updated").textContent = clock(snap.ts);
  $("updated").dateTime = new Date(snap.ts * 1000).toISOString();
  renderSubstations(snap.substations);
  renderQueue(snap.queue, snap.ts);
  renderAssignments(snap.latest_assignments);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

const TOKEN_KEY = "gridlb.token";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

function askForToken(message) {
  if (message) sessionStorage.removeItem(TOKEN_KEY);
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setBadge($("feed-badge"), "unknown", "feed: needs a token");
  $("token").focus();
}

function poll() {
  fetch("/status", { headers: authHeaders() }).then((r) => {
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
  try {
    const resp = await fetch("/events", { headers: { ...authHeaders(), Accept: "text/event-stream" }, cache: "no-store" });
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
    console.warn("feed interrupted", err);
  }
  setBadge($("feed-badge"), "offline", "feed: reconnecting…");
  setTimeout(streamWithToken, 2000);
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
  if (probe.ok) render(await probe.json());
  if (token()) {
    if (window.ReadableStream && window.TextDecoderStream) streamWithToken(); else poll();
    return;
  }
  if (!("EventSource" in window)) { poll(); return; }
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (ev) => {
    try { render(JSON.parse(ev.data)); } catch (err) { console.error("bad snapshot", err); }
  });
  source.onerror = () => setBadge($("feed-badge"), "offline", "feed: reconnecting…");
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
  connect();
});
