// A substation's DSO limit schedule in its detailed row (the feed's "schedules" part, api/live.py): which limit
// sets the capacity the balancer plans with, and the next intervals of the composite (lowest limit wins), the one
// in force marked. Nothing when the substation has no schedule.

import { clock, esc, fmt } from "./format.js";
import { registerDetailPart } from "./details.js";

registerDetailPart({
  name: "schedule",
  html: '<div class="schedule" hidden></div>',
  update(row, s, ctx) {
    const box = row.querySelector(".schedule");
    const sched = (ctx.schedules || {})[s.substation_id];
    box.hidden = !sched || !sched.composite.length;
    if (box.hidden) return;
    const binds = sched.limit_source ? `limit set by <b class="limit-source">${esc(sched.limit_source)}</b> · ` : "";
    box.innerHTML = binds + "schedule: " + sched.composite.map((c) => {
      const now = c.start <= ctx.now && ctx.now < c.end;
      return `<span class="slot${now ? " now" : ""}">${clock(c.start)}–${clock(c.end)} <b>${fmt(c.limit_kw)}</b> kW ` +
        `${esc(c.source)}</span>`;
    }).join(", ");
  },
});
