// The overview: one small cell per substation, coloured by utilisation (green → red) or its condition (offline
// grey, stale amber, overloaded red and marked), grouped by region, worst first in each. A render touches only the
// cells whose values changed, and moves only the cells that are out of place.

import { esc, pct } from "./format.js";
import { byRegion } from "./grid.js";

const cells = new Map();  // substation_id -> { el, sig }
const groups = new Map();  // region -> { el, head, box }

/** A utilisation's colour: green when empty, yellow about half full, red at capacity. */
export function utilColour(u) {
  const x = Math.max(0, Math.min(1, u ?? 0));
  return `hsl(${Math.round(120 * (1 - x * x))}, 70%, ${Math.round(38 + 8 * x)}%)`;
}

function cellFor(s) {
  let c = cells.get(s.substation_id);
  if (!c) {
    const el = document.createElement("div");
    el.className = "cell";
    el.dataset.substation = s.substation_id;
    c = { el, sig: "" };
    cells.set(s.substation_id, c);
  }
  const sig = `${s.condition}|${s.utilisation}|${s.region}`;
  if (c.sig !== sig) {
    c.sig = sig;
    const el = c.el;
    el.className = `cell ${s.condition}`;
    el.style.background = s.condition === "ok" || s.condition === "draining" ? utilColour(s.utilisation) : "";
    el.dataset.util = s.utilisation === null || s.utilisation === undefined ? "" : String(s.utilisation);
    el.title = `${s.substation_id} (${s.region}): ${s.condition}, ${pct(s.utilisation)} %`;
  }
  return c.el;
}

function groupFor(region) {
  let g = groups.get(region);
  if (!g) {
    const el = document.createElement("section");
    el.className = "region";
    el.dataset.region = region;
    el.innerHTML = '<h3></h3><div class="cells"></div>';
    g = { el, head: el.querySelector("h3"), box: el.querySelector(".cells"), sig: "" };
    groups.set(region, g);
  }
  return g;
}

function placeChildren(box, wanted) {
  wanted.forEach((el, i) => { if (box.children[i] !== el) box.insertBefore(el, box.children[i] || null); });
  while (box.children.length > wanted.length) box.lastElementChild.remove();
}

/** Draw the worst-first list (already filtered) into box; selected: ids to outline. */
export function renderHeatmap(box, sorted, selected) {
  const wantedGroups = byRegion(sorted).map((g) => {
    const group = groupFor(g.region);
    const counts = ["offline", "stale", "overloaded", "draining"].filter((c) => g.counts[c])
      .map((c) => `<span class="n ${c}">${g.counts[c]} ${c}</span>`).join(" ");
    const sig = `${g.subs.length}|${counts}`;
    if (group.sig !== sig) {
      group.sig = sig;
      group.head.innerHTML = `${esc(g.region)} <small>${g.subs.length} substation${g.subs.length === 1 ? "" : "s"}</small> ${counts}`;
    }
    const els = g.subs.map((s) => {
      const el = cellFor(s);
      el.classList.toggle("selected", selected.has(s.substation_id));
      return el;
    });
    placeChildren(group.box, els);
    return group.el;
  });
  placeChildren(box, wantedGroups);
}

/** Forget cells of substations that are gone (forgotten ones). */
export function dropCells(ids) {
  for (const sid of ids) {
    const c = cells.get(sid);
    if (c) { c.el.remove(); cells.delete(sid); }
  }
}
