// 15-minute trends (load, EV load, limit) of the substations shown in detail: GET /trends for a substation when
// it is first shown, then a point per update at most every step_s from the feed's current values.

export const TREND_W = 240, TREND_H = 46;
// series: sid -> {t, load, ev, lim}; fetched: sids whose history was asked for
const trend = { step: 10, window: 900, series: new Map(), loading: new Set(), fetched: new Set() };

function trendOf(sid) {
  let tr = trend.series.get(sid);
  if (!tr) { tr = { t: [], load: [], ev: [], lim: [] }; trend.series.set(sid, tr); }
  return tr;
}

/** Fetch the history of shown substations not fetched yet (one request for all of them). */
export async function loadTrends(sids, headers) {
  const wanted = sids.filter((sid) => !trend.fetched.has(sid));
  if (!wanted.length) return false;
  wanted.forEach((sid) => { trend.loading.add(sid); trend.fetched.add(sid); });
  try {
    const query = wanted.map((sid) => `substation_id=${encodeURIComponent(sid)}`).join("&");
    const resp = await fetch(`/trends?${query}`, { headers, cache: "no-store" });
    if (!resp.ok) return false;
    const body = await resp.json();
    trend.step = body.step_s;
    trend.window = body.window_s;
    for (const [sid, s] of Object.entries(body.substations)) {
      const tr = trendOf(sid);
      // (points the feed appended while the request ran are newer: keep them after the history)
      const since = tr.t.length ? tr.t[0] : Infinity;
      const keep = s.t.map((t, i) => i).filter((i) => s.t[i] < since);
      tr.t.unshift(...keep.map((i) => s.t[i]));
      tr.load.unshift(...keep.map((i) => s.load_kw[i]));
      tr.ev.unshift(...keep.map((i) => s.ev_load_kw[i]));
      tr.lim.unshift(...keep.map((i) => s.limit_kw[i]));
    }
    wanted.forEach((sid) => trendOf(sid));
    return true;
  } catch (err) {
    console.warn("trends unavailable", err);
    return false;
  } finally {
    wanted.forEach((sid) => trend.loading.delete(sid));
  }
}

/** A point for each shown substation when step_s has passed (fresh ones only); forget those not shown. */
export function appendTrends(shown, ts) {
  const live = new Set();
  for (const s of shown) {
    live.add(s.substation_id);
    const tr = trendOf(s.substation_id);
    const last = tr.t.length ? tr.t[tr.t.length - 1] : -Infinity;
    if (ts - last >= trend.step && s.condition !== "offline" && s.condition !== "stale") {
      const load = s.load_kw ?? null;
      tr.t.push(ts); tr.load.push(load);
      tr.ev.push(load !== null && s.base_load_kw !== null && s.base_load_kw !== undefined ? Math.max(0, load - s.base_load_kw) : null);
      tr.lim.push(s.limit_kw ?? null);
    }
    while (tr.t.length && ts - tr.t[0] > trend.window) { tr.t.shift(); tr.load.shift(); tr.ev.shift(); tr.lim.shift(); }
  }
  for (const sid of [...trend.series.keys()]) {
    if (!live.has(sid) && !trend.loading.has(sid)) { trend.series.delete(sid); trend.fetched.delete(sid); }
  }
}

export function drawTrend(svg, s, now) {
  const tr = trend.series.get(s.substation_id);
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
