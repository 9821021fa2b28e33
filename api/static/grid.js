// The grid as the live feed describes it: a snapshot, then diffs (GET /events, api/live.py). Pure: no DOM.
//
// A snapshot carries `fields` (the names of a compact substation row), `substations` (rows), `seq` and the other
// parts (totals, balancer, queue, latest_assignments, events, decommissioned, mqtt_connected). A diff carries
// `seq` (the previous one + 1), `upsert` (changed rows), `remove` (ids of forgotten substations) and each other
// part only when it changed. A diff out of sequence cannot be applied: the caller reconnects for a snapshot.

/** Worst first: offline, stale, overloaded, draining, ok (api/state.py CONDITION_RANK). */
export const RANK = { offline: 0, stale: 1, overloaded: 2, draining: 3, ok: 4 };
export const CONDITIONS = Object.keys(RANK);
const PART_NAMES = ["mqtt_connected", "balancer", "totals", "decommissioned", "queue", "latest_assignments", "events",
  "schedules"];

/** Sort comparator: condition, then utilisation (fullest first, unknown last), then id. */
export function worstFirst(a, b) {
  return (RANK[a.condition] - RANK[b.condition])
    || ((b.utilisation ?? -1) - (a.utilisation ?? -1))
    || (a.substation_id < b.substation_id ? -1 : a.substation_id > b.substation_id ? 1 : 0);
}

export class GridModel {
  constructor() {
    this.fields = [];
    this.rows = new Map();  // substation_id -> row object (fields by name)
    this.parts = {};
    this.seq = null;
    this.ts = null;
    this.changed = new Set();  // ids upserted or removed since the caller last cleared it
  }

  _object(row) {
    const s = {};
    this.fields.forEach((name, i) => { s[name] = row[i]; });
    return s;
  }

  _parts(body) {
    for (const name of PART_NAMES) if (name in body) this.parts[name] = body[name];
    this.ts = body.ts;
  }

  /** Replace everything with a snapshot. */
  applySnapshot(body) {
    this.fields = body.fields;
    for (const sid of this.rows.keys()) this.changed.add(sid);
    this.rows = new Map();
    for (const row of body.substations) {
      const s = this._object(row);
      this.rows.set(s.substation_id, s);
      this.changed.add(s.substation_id);
    }
    this.parts = {};
    this._parts(body);
    this.seq = body.seq;
  }

  /** Apply a diff; false (and nothing applied) when it does not follow the state held. */
  applyDiff(body) {
    if (this.seq === null || body.seq !== this.seq + 1) return false;
    for (const row of body.upsert || []) {
      const s = this._object(row);
      this.rows.set(s.substation_id, s);
      this.changed.add(s.substation_id);
    }
    for (const sid of body.remove || []) {
      this.rows.delete(sid);
      this.changed.add(sid);
    }
    this._parts(body);
    this.seq = body.seq;
    return true;
  }

  /** The substations a filter lets through, worst first. */
  list(filter = {}) {
    return [...this.rows.values()].filter((s) => matches(s, filter)).sort(worstFirst);
  }

  regions() {
    return [...new Set([...this.rows.values()].map((s) => s.region))].sort();
  }
}

/**
 * filter.text: part of the id or region (case-insensitive); filter.condition: "", "problems" (anything but ok),
 * or one condition; filter.region: "" or one region.
 */
export function matches(s, filter) {
  const text = (filter.text || "").trim().toLowerCase();
  if (text && !s.substation_id.toLowerCase().includes(text) && !s.region.toLowerCase().includes(text)) return false;
  if (filter.region && s.region !== filter.region) return false;
  const c = filter.condition || "";
  if (c === "problems") return s.condition !== "ok";
  return !c || s.condition === c;
}

/** Worst-first substations grouped by region; the groups ordered by their worst member. */
export function byRegion(sorted) {
  const groups = new Map();
  for (const s of sorted) {
    if (!groups.has(s.region)) groups.set(s.region, { region: s.region, subs: [], counts: {} });
    const g = groups.get(s.region);
    g.subs.push(s);
    g.counts[s.condition] = (g.counts[s.condition] || 0) + 1;
  }
  return [...groups.values()];  // (insertion order follows the sorted input: worst member first)
}
