import { esc, num, pct } from "./format.js";

// ---------------------------------------------------------------- charts (inline SVG)

export function niceTicks(min, max, count = 5) {
  if (!(max > min)) { max = min + 1; }
  const span = max - min;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}
export const timeLabel = (t) => {
  const d = new Date(t * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
};

export const dayLabel = (t) => {
  const d = new Date(t * 1000);
  return `${d.getMonth() + 1}/${d.getDate()} ${timeLabel(t)}`;
};

// series: [{name, points: [[x, y], ...]}]; lines: [{y, label}] (thresholds)
export function lineChart({ id, title, desc, series, yLabel = "", xFormat = timeLabel, yFormat = (v) => num(v, 2), lines = [] }) {
  const W = 720, H = 260, L = 56, R = 16, T = 16, B = 40;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (!all.length) return "";
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (x1 === x0) { x0 -= 30; x1 += 30; }
  const ys = all.map((p) => p[1]).concat(lines.map((l) => l.y).filter(Number.isFinite));
  const y0 = Math.min(0, ...ys);
  let y1 = Math.max(...ys);
  if (y1 <= y0) y1 = y0 + 1;
  const yt = niceTicks(y0, y1 * 1.05);
  const top = Math.max(yt[yt.length - 1], y1);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (top - y0)) * (H - T - B);
  const xt = niceTicks(x0, x1, 5).filter((x) => x >= x0 && x <= x1);
  if (xFormat === timeLabel && x1 - x0 > 86400) xFormat = dayLabel;
  let svg = `<svg id="${esc(id)}" class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-labelledby="${esc(id)}-title ${esc(id)}-desc" preserveAspectRatio="xMidYMid meet">`;
  svg += `<title id="${esc(id)}-title">${esc(title)}</title><desc id="${esc(id)}-desc">${esc(desc)}</desc>`;
  for (const y of yt) {
    svg += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y).toFixed(1)}" y2="${sy(y).toFixed(1)}"/>`;
    svg += `<text class="tick" x="${L - 6}" y="${(sy(y) + 4).toFixed(1)}" text-anchor="end">${esc(yFormat(y))}</text>`;
  }
  for (const x of xt) svg += `<text class="tick" x="${sx(x).toFixed(1)}" y="${H - B + 16}" text-anchor="middle">${esc(xFormat(x))}</text>`;
  svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/><line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`;
  if (yLabel) svg += `<text class="axis-label" x="12" y="${T + (H - T - B) / 2}" transform="rotate(-90 12 ${T + (H - T - B) / 2})" text-anchor="middle">${esc(yLabel)}</text>`;
  for (const l of lines) {
    if (!Number.isFinite(l.y)) continue;
    svg += `<line class="threshold" x1="${L}" x2="${W - R}" y1="${sy(l.y).toFixed(1)}" y2="${sy(l.y).toFixed(1)}"/><text class="tick threshold-label" x="${W - R}" y="${(sy(l.y) - 4).toFixed(1)}" text-anchor="end">${esc(l.label)}</text>`;
  }
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1])).sort((a, b) => a[0] - b[0]);
    if (!pts.length) return;
    const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    svg += `<path class="series s${i % 6}" d="${d}"><title>${esc(s.name)}</title></path>`;
    if (pts.length <= 60) for (const p of pts) svg += `<circle class="dot s${i % 6}" cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="2.5"><title>${esc(`${s.name}: ${yFormat(p[1])} at ${new Date(p[0] * 1000).toLocaleString()}`)}</title></circle>`;
  });
  svg += `</svg>`;
  const legend = series.length > 1 || lines.length
    ? `<ul class="legend">${series.map((s, i) => `<li><span class="swatch s${i % 6}" aria-hidden="true"></span>${esc(s.name)}</li>`).join("")}</ul>` : "";
  return `<figure class="chart-box">${svg}${legend}</figure>`;
}

// grouped bars: labels[i] with one value per series (reference vs live proportions)
export function barChart({ id, title, desc, labels, series, yFormat = pct }) {
  const W = 360, H = 180, L = 44, R = 8, T = 10, B = 28;
  const n = labels.length;
  if (!n) return "";
  const max = Math.max(1e-9, ...series.flatMap((s) => s.values.filter(Number.isFinite)));
  const yt = niceTicks(0, max, 3);
  const top = Math.max(yt[yt.length - 1], max);
  const band = (W - L - R) / n;
  const bw = Math.max(1, (band * 0.8) / series.length);
  const sy = (y) => T + (1 - y / top) * (H - T - B);
  let svg = `<svg id="${esc(id)}" class="chart bars" viewBox="0 0 ${W} ${H}" role="img" aria-labelledby="${esc(id)}-title ${esc(id)}-desc">`;
  svg += `<title id="${esc(id)}-title">${esc(title)}</title><desc id="${esc(id)}-desc">${esc(desc)}</desc>`;
  for (const y of yt) svg += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y).toFixed(1)}" y2="${sy(y).toFixed(1)}"/><text class="tick" x="${L - 4}" y="${(sy(y) + 4).toFixed(1)}" text-anchor="end">${esc(yFormat(y))}</text>`;
  labels.forEach((label, i) => {
    series.forEach((s, j) => {
      const v = s.values[i];
      if (!Number.isFinite(v)) return;
      const x = L + i * band + band * 0.1 + j * bw;
      svg += `<rect class="bar s${j % 6}" x="${x.toFixed(1)}" y="${sy(v).toFixed(1)}" width="${bw.toFixed(1)}" height="${(H - B - sy(v)).toFixed(1)}"><title>${esc(`${s.name} ${label}: ${yFormat(v)}`)}</title></rect>`;
    });
  });
  const every = Math.ceil(n / 8);
  labels.forEach((label, i) => {
    if (i % every === 0) svg += `<text class="tick" x="${(L + i * band + band / 2).toFixed(1)}" y="${H - B + 14}" text-anchor="middle">${esc(label)}</text>`;
  });
  svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/></svg>`;
  const legend = `<ul class="legend">${series.map((s, j) => `<li><span class="swatch s${j % 6}" aria-hidden="true"></span>${esc(s.name)}</li>`).join("")}</ul>`;
  return `<figure class="chart-box small">${svg}${legend}</figure>`;
}

