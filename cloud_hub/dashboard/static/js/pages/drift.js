import { page, state } from "../state.js";
import { ago, cls, enc, esc, num, when } from "../format.js";
import { api } from "../api.js";
import { barChart, lineChart } from "../svg.js";
import { tagPairs } from "./fleet.js";

// ---------------------------------------------------------------- drift

export function binLabels(edges, n) {
  const f = (x) => num(x, 3);
  if (edges.length === n + 1) return Array.from({ length: n }, (_, i) => `${f(edges[i])}–${f(edges[i + 1])}`);
  if (edges.length === n - 1) return Array.from({ length: n }, (_, i) => (i === 0 ? `≤${f(edges[0])}` : i === n - 1 ? `>${f(edges[n - 2])}` : `${f(edges[i - 1])}–${f(edges[i])}`));
  return Array.from({ length: n }, (_, i) => String(i + 1));
}

export function share(counts) {
  const total = (counts || []).reduce((a, b) => a + Number(b || 0), 0);
  return (counts || []).map((c) => (total ? Number(c || 0) / total : NaN));
}

export async function renderDrift(ctx) {
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Drift</h1><p>Loading…</p>`;
  const [artifacts, devices] = await Promise.all([api("/v1/models"), api("/v1/devices").catch(() => [])]);
  if (ctx.stale()) return;
  const names = [...new Set(artifacts.map((a) => a.name))].sort();
  const q = ctx.query;
  const model = q.get("model") || names[0] || "";
  const versions = [...new Map(artifacts.filter((a) => a.name === model).map((a) => [a.version, a.release])).entries()].sort((a, b) => b[1] - a[1]).map(([v]) => v);
  const version = q.get("version") || "";
  const operations = q.get("operations") === "1";
  const scopeBase = q.get("scope") || "all";
  const since = q.get("since") || "0";
  const groups = [...new Set(devices.flatMap((d) => d.groups || []))].sort();
  const tags = [...new Set(devices.flatMap(tagPairs))].sort();
  const option = (value, label, selected) => `<option value="${esc(value)}"${selected ? " selected" : ""}>${esc(label)}</option>`;
  const form = `<form id="drift-form" class="toolbar">
    <label for="drift-model">Model</label><select id="drift-model" name="model">${names.map((n) => option(n, n, n === model)).join("")}</select>
    <label for="drift-version">Version</label><select id="drift-version" name="version">${option("", "last scored", !version)}${versions.map((v) => option(v, v, v === version)).join("")}</select>
    <label for="drift-scope">Devices</label><select id="drift-scope" name="scope">${option("all", "all", scopeBase === "all")}${groups.map((g) => option(`group:${g}`, `group ${g}`, scopeBase === `group:${g}`)).join("")}${tags.map((t) => option(`tag:${t}`, `tag ${t}`, scopeBase === `tag:${t}`)).join("")}</select>
    <label for="drift-since">Live counts since</label><select id="drift-since" name="since">${[["0", "the start"], ["3600", "1 hour ago"], ["86400", "1 day ago"], ["604800", "7 days ago"]].map(([v, l]) => option(v, l, v === since)).join("")}</select>
    <label class="check"><input type="checkbox" id="drift-operations" name="operations" value="1"${operations ? " checked" : ""}> operations (errors, routes, latency)</label>
    <button type="submit">Show</button></form>`;
  if (!model) {
    page.innerHTML = `<h1 tabindex="-1">Drift</h1><p class="muted">No model registered yet.</p>`;
    state.view = { name: "drift" };
    return ctx.loaded();
  }
  const scope = operations ? `operations/${scopeBase}` : scopeBase;
  const params = new URLSearchParams({ scope });
  if (version) params.set("version", version);
  if (since !== "0") params.set("since", String(Math.floor(Date.now() / 1000) - Number(since)));
  const [report, alerts] = await Promise.all([api(`/v1/drift/${enc(model)}?${params}`), api("/v1/alerts?state=active").catch(() => [])]);
  if (ctx.stale()) return;
  const open = alerts.filter((a) => a.model === model && (!report.version || a.version === report.version));
  let html = `<h1 tabindex="-1">Drift</h1>${form}<h2>${esc(model)}@${esc(report.version ?? "?")} <span class="muted">(${esc(report.scope)})</span></h2>`;
  html += `<h3>Open alerts</h3>` + (open.length
    ? `<div class="table-wrap"><table id="drift-alerts"><caption class="sr-only">Open or acknowledged alerts of this model version</caption><thead><tr><th scope="col">Alert</th><th scope="col">State</th><th scope="col">Severity</th><th scope="col">Scope</th><th scope="col">Summary</th><th scope="col">Times</th><th scope="col">Last seen</th></tr></thead><tbody>${open.map((a) => `<tr><th scope="row">${esc(a.id)}</th><td>${esc(a.state)}</td><td class="severity-${cls(a.severity)}">${esc(a.severity)}</td><td>${esc(a.scope)}</td><td>${esc(a.summary)}</td><td>${num(a.count)}</td><td>${when(a.last_seen)}</td></tr>`).join("")}</tbody></table></div>`
    : `<p class="muted">No open alert for this model version.</p>`);
  const windows = report.windows || [];
  if (!report.version || !windows.length) {
    html += `<p class="muted">No drift window scored yet for this model version and scope.</p>`;
  } else {
    const last = windows[windows.length - 1];
    html += `<h3>Score over time</h3>` + lineChart({
      id: "drift-score-chart",
      title: `Combined drift score of ${model}@${report.version}`,
      desc: `${windows.length} windows; the latest scored ${num(last.combined, 3)} against the alarm threshold ${num(last.threshold, 3)}.`,
      series: [{ name: "combined score", points: windows.map((w) => [Number(w.at), Number(w.combined)]) }],
      lines: [{ y: Number(last.threshold), label: "alarm threshold" }],
      yFormat: (v) => num(v, 2),
    });
    const alarms = windows.filter((w) => w.alarm).length;
    html += `<p>${num(windows.length)} windows, ${num(alarms)} alarmed; latest: ${num(last.samples)} samples ${when(last.at)}.</p>`;
  }
  const features = report.features || [];
  if (features.length) {
    html += `<h3>Features</h3><div class="table-wrap"><table id="drift-features"><caption class="sr-only">Features by drift score (1 or more alarms)</caption><thead><tr><th scope="col">Feature</th><th scope="col">Score</th><th scope="col">PSI</th><th scope="col">Jensen–Shannon</th><th scope="col">G-test p</th></tr></thead><tbody>`
      + features.map((f) => `<tr><th scope="row">${esc(f.name)}</th><td class="${Number(f.score) >= 1 ? "bad" : ""}">${num(f.score, 3)}</td><td>${num(f.psi, 4)}</td><td>${num(f.js, 4)}</td><td>${f.p_value === undefined ? "–" : esc(Number(f.p_value).toPrecision(3))}</td></tr>`).join("")
      + `</tbody></table></div><h3>Reference vs live</h3><p class="muted">Share of values per bin; the ${Math.min(features.length, 12)} highest-scoring features.</p><div class="histograms">`;
    features.slice(0, 12).forEach((f, i) => {
      const ref = share(f.reference);
      const live = f.live ? share(f.live) : [];
      html += barChart({
        id: `drift-hist-${i}`,
        title: `${f.name}: reference vs live`,
        desc: `Share of values per bin of ${f.name}; score ${num(f.score, 3)}.`,
        labels: binLabels(f.edges || [], ref.length),
        series: [{ name: "reference", values: ref }, { name: "live", values: live.length ? live : ref.map(() => NaN) }],
      }).replace(`<figure class="chart-box small">`, `<figure class="chart-box small"><figcaption>${esc(f.name)} <span class="muted">score ${esc(num(f.score, 3))}</span></figcaption>`);
    });
    html += `</div>`;
  }
  page.innerHTML = html;
  document.getElementById("drift-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(event.target);
    const next = new URLSearchParams();
    next.set("model", data.get("model"));
    if (data.get("version") && data.get("model") === model) next.set("version", data.get("version"));
    next.set("scope", data.get("scope"));
    next.set("since", data.get("since"));
    if (data.get("operations")) next.set("operations", "1");
    location.hash = `#/drift?${next}`;
  });
  state.view = { name: "drift" };
  ctx.loaded();
}

