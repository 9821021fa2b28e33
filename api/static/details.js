// The detailed rows of the substations selected (or the worst ones that match the filter): one row per substation
// made of parts. A part is { name, html (its markup inside the row), update(row, s, ctx) }; parts are drawn in
// the order they were registered. Another view of a substation (e.g. its DSO limit schedule) is one more part:
// registerDetailPart({...}) from its own module, nothing else here changes.

import { ago, esc, fmt, pct } from "./format.js";
import { TREND_H, TREND_W, drawTrend } from "./trends.js";

const parts = [];

export function registerDetailPart(part) {
  parts.push(part);
}

// ------------------------------------------------------------------------------------ the built-in parts
registerDetailPart({
  name: "name",
  html: '<div class="name"><span class="sid"></span><span class="chip"></span><span class="region"></span></div>',
  update(row, s) {
    row.querySelector(".sid").textContent = s.substation_id;
    const chip = row.querySelector(".name .chip");
    chip.className = `chip ${s.condition}`;
    chip.textContent = s.condition;
    row.querySelector(".name .region").textContent = s.region;
  },
});

registerDetailPart({
  name: "bar",
  html: `<div class="track" role="img">
      <div class="seg base"></div><div class="seg ev"></div><div class="seg reserved"></div>
      <div class="mark lim" title="limit"></div><div class="mark cap" title="capacity"></div>
      <span class="pct"></span>
    </div>`,
  update(row, s) {
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
    const track = row.querySelector(".track");
    track.id = `bar-${s.substation_id}`;
    track.dataset.loadKw = fmt(load);
    track.dataset.capacityKw = fmt(cap);
    track.setAttribute("aria-label", `${s.substation_id}: ${fmt(load)} of ${fmt(cap)} kW`);
    row.querySelector(".pct").textContent = `${pct(s.utilisation)} %`;
  },
});

registerDetailPart({
  name: "numbers",
  html: '<div class="nums"></div>',
  update(row, s, ctx) {
    const load = s.load_kw ?? 0;
    const limited = s.capacity_limit_kw !== null && s.capacity_limit_kw !== undefined
      ? ` · operator limit <b class="op-limit">${fmt(s.capacity_limit_kw)}</b>` : "";
    const heard = s.heard_at === null || s.heard_at === undefined ? "telemetry fresh"
      : `telemetry ${ago(Math.max(0, ctx.now - s.heard_at))} ago`;
    row.querySelector(".nums").innerHTML =
      `<span class="load" id="load-${esc(s.substation_id)}"><b>${fmt(load)}</b> / <b>${fmt(s.capacity_kw || 0)}</b> kW</span>` +
      ` · headroom <b>${fmt(s.headroom_kw)}</b> kW<br>` +
      `EV <b>${fmt(s.granted_kw)}</b> kW in <b>${s.sessions_total}</b> session${s.sessions_total === 1 ? "" : "s"}` +
      limited + ` · ${heard}`;
  },
});

registerDetailPart({
  name: "trend",
  html: `<svg class="trend" viewBox="0 0 ${TREND_W} ${TREND_H}" preserveAspectRatio="none" role="img">
      <polyline class="lim"></polyline><polyline class="load"></polyline><polyline class="ev"></polyline>
    </svg>`,
  update(row, s, ctx) {
    drawTrend(row.querySelector(".trend"), s, ctx.now);
  },
});

registerDetailPart({
  name: "ops",
  html: `<div class="ops">
      <button type="button" class="drain" data-action="drain"></button>
      <label>operator limit <input type="number" class="cap-input" min="1" step="1" placeholder="kW"></label>
      <button type="button" data-action="set-capacity">set limit</button>
      <button type="button" data-action="clear-capacity">remove limit</button>
    </div>`,
  update(row, s) {
    const drain = row.querySelector("button.drain");
    drain.dataset.action = s.draining ? "undrain" : "drain";
    drain.textContent = s.draining ? "undrain" : "drain";
  },
});

// ------------------------------------------------------------------------------------ rows
const rows = new Map();  // substation_id -> row element

function rowFor(sid) {
  let row = rows.get(sid);
  if (!row) {
    row = document.createElement("div");
    row.className = "sub";
    row.dataset.substation = sid;
    row.innerHTML = parts.map((p) => p.html).join("");
    rows.set(sid, row);
  }
  return row;
}

/**
 * Show these substations (in this order) in box, every part redrawn (they are few: the trends move with time);
 * ctx.now is the feed's time, ctx.selected the ids the operator picked.
 */
export function renderDetails(box, shown, ctx) {
  const keep = new Set();
  const list = shown.map((s) => {
    const row = rowFor(s.substation_id);
    keep.add(row);
    row.className = `sub ${s.condition}${ctx.selected.has(s.substation_id) ? " selected" : ""}`;
    for (const p of parts) p.update(row, s, ctx);
    return row;
  });
  for (const [sid, row] of rows) if (!keep.has(row)) { row.remove(); rows.delete(sid); }
  list.forEach((row, i) => { if (box.children[i] !== row) box.insertBefore(row, box.children[i] || null); });
}
