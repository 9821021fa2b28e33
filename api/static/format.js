// Small formatting helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);
export const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(digits);
export const pct = (v) => (v === null || v === undefined) ? "–" : Math.round(v * 100).toString();
export const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
export const clock = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString([], { hour12: false }) : "–";
export const ago = (s) => {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);  // round once, then split: 7199.5 s is "2 h 0 min", never "1 h 60 min"
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  const m = Math.round(s / 60);
  return `${Math.floor(m / 60)} h ${m % 60} min`;
};
