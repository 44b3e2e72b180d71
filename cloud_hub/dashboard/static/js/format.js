import { LATENCY_EDGES_MS, page } from "./state.js";

// ---------------------------------------------------------------- helpers

export const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export function esc(value) {
  if (value === null || value === undefined) return "";
  return String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}
export const enc = encodeURIComponent;
export const cls = (text) => String(text ?? "unknown").toLowerCase().replace(/[^a-z0-9-]+/g, "-");
export const NUMBER_FORMATS = new Map(); // one Intl formatter per precision: formatting 1,000 rows stays cheap
export function num(n, digits = 0) {
  if (n === null || n === undefined || n === "" || Number.isNaN(Number(n))) return "–";
  let f = NUMBER_FORMATS.get(digits);
  if (!f) { f = new Intl.NumberFormat(undefined, { maximumFractionDigits: digits }); NUMBER_FORMATS.set(digits, f); }
  return f.format(Number(n));
}
export const DATE_FORMAT = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
export const pct = (x) => (x === null || x === undefined || Number.isNaN(Number(x)) ? "–" : `${(100 * x).toFixed(1)} %`);
export const ms = (x) => (x === null || x === undefined || Number.isNaN(Number(x)) ? "–" : `${Number(x) < 10 ? Number(x).toFixed(2) : Number(x).toFixed(1)} ms`);
export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n), i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - Number(ts));
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}
// a Unix time as <time>, its relative text kept fresh by tickTimes()
export function when(ts) {
  if (!ts) return `<span class="muted">never</span>`;
  const d = new Date(Number(ts) * 1000);
  if (Number.isNaN(d.getTime())) return esc(ts);
  return `<time datetime="${esc(d.toISOString())}" data-ts="${esc(ts)}" title="${esc(DATE_FORMAT.format(d))}">${esc(ago(ts))}</time>`;
}
export function tickTimes() {
  for (const t of page.querySelectorAll("time[data-ts]")) t.textContent = ago(t.dataset.ts);
}
setInterval(tickTimes, 15000);

export function quantileMs(hist, q) {
  const total = hist.reduce((a, b) => a + b, 0);
  if (total <= 0) return NaN;
  const rank = q * total;
  let seen = 0;
  for (let i = 0; i < hist.length; i += 1) {
    const count = hist[i];
    if (count && seen + count >= rank) {
      if (i >= LATENCY_EDGES_MS.length) return LATENCY_EDGES_MS[LATENCY_EDGES_MS.length - 1];
      const low = i ? LATENCY_EDGES_MS[i - 1] : 0;
      return low + ((LATENCY_EDGES_MS[i] - low) * Math.max(rank - seen, 0)) / count;
    }
    seen += count;
  }
  return LATENCY_EDGES_MS[LATENCY_EDGES_MS.length - 1];
}

// run fn over items, at most `limit` at once
export async function pool(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      try { results[i] = await fn(items[i], i); } catch (err) { results[i] = err; }
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

export function debounce(fn, waitMs) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), waitMs); };
}

