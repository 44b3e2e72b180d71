import { LATENCY_EDGES_MS, page, state } from "../state.js";
import { cls, debounce, enc, esc, ms, num, pct, pool, quantileMs, when } from "../format.js";
import { api } from "../api.js";
import { route } from "../router.js";
import { lineChart } from "../svg.js";
import { tagPairs } from "./fleet.js";

// ---------------------------------------------------------------- one device

export function telemetrySummary(batches) {
  const windows = [];
  let dropped = 0;
  for (const b of batches) {
    dropped += Number(b.dropped || 0);
    for (const w of b.windows || []) windows.push(w);
  }
  windows.sort((a, b) => (a.end ?? 0) - (b.end ?? 0));
  const recent = windows.slice(-2000);
  const groups = new Map();
  for (const w of recent) {
    const key = `${w.model}@${w.version}\u0000${w.route}`;
    let g = groups.get(key);
    if (!g) {
      g = { model: w.model, version: w.version, route: w.route, calls: 0, errors: 0, breaches: 0, sum: 0, hist: new Array(LATENCY_EDGES_MS.length + 1).fill(0), first: w.start, last: w.end };
      groups.set(key, g);
    }
    g.calls += Number(w.count || 0);
    g.errors += Number(w.errors || 0);
    g.breaches += Number(w.budget_breaches || 0);
    g.sum += Number(w.latency_ms_sum || 0);
    (w.latency_hist || []).forEach((c, i) => { if (i < g.hist.length) g.hist[i] += Number(c || 0); });
    g.first = Math.min(g.first, w.start);
    g.last = Math.max(g.last, w.end);
  }
  return { windows: recent, groups: [...groups.values()], dropped, batches: batches.length };
}

export async function renderDevice(ctx) {
  const id = ctx.params[0];
  if (!ctx.soft) page.innerHTML = `<section id="device-page" aria-labelledby="device-title"><h1 id="device-title" tabindex="-1">Device ${esc(id)}</h1><p>Loading…</p></section>`;
  const [device, deployments, telemetry] = await Promise.all([
    api(`/v1/devices/${enc(id)}`),
    api("/v1/deployments"),
    api(`/v1/telemetry?device=${enc(id)}`),
  ]);
  if (ctx.stale()) return;
  const history = deployments.filter((d) => (d.devices || []).includes(id));
  const detailed = await pool(history.slice(0, 20), 6, (d) => api(`/v1/deployments/${enc(d.deployment_id)}`));
  if (ctx.stale()) return;
  const section = document.getElementById("device-page");
  const r = device.reported || {};
  const status = device.status ?? "unknown";
  const tele = telemetrySummary(telemetry || []);
  const models = Array.isArray(r.models) ? r.models : [];

  const facts = [
    ["Status", `<span class="status status-${cls(status)}" id="device-status">${esc(status)}</span>`],
    ["Last seen", `<span id="device-last-seen">${when(device.last_seen)}</span>`],
    ["Profile", esc(device.profile ?? r.profile ?? "")],
    ["Groups", (device.groups || []).map((g) => `<span class="chip">${esc(g)}</span>`).join(" ") || `<span class="muted">none</span>`],
    ["Tags", tagPairs(device).map((t) => `<span class="chip">${esc(t)}</span>`).join(" ") || `<span class="muted">none</span>`],
    ["Enrolled", when(device.enrolled)],
    ["Agent version", esc(r.agent_version ?? "")],
    ["Report updated", esc(r.updated_at ?? "")],
    ["Report received", when(r.received_at)],
    ["Desired-state counter", esc(r.desired_counter ?? "")],
    ["Key set version", esc(r.keyset_version ?? "")],
  ];
  let html = `<h1 id="device-title" tabindex="-1">Device ${esc(id)}</h1>
    <p><a href="#/fleet">← Fleet</a></p>
    <h2>Reported state</h2><dl class="facts">${facts.map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${v}</dd></div>`).join("")}</dl>`;
  if (r.error) html += `<p class="error">Device error: ${esc(r.error)}</p>`;
  html += `<div class="table-wrap"><table id="device-models"><caption>Models on the device</caption><thead><tr><th scope="col">Model</th><th scope="col">Version</th><th scope="col">State</th><th scope="col">Origin</th><th scope="col">A/B</th><th scope="col">Error</th></tr></thead><tbody>`
    + (models.length ? models.map((m) => `<tr><th scope="row"><a href="#/model/${esc(enc(m.name))}">${esc(m.name)}</a></th><td>${esc(m.version ?? "")}</td><td class="state state-${cls(m.state)}">${esc(m.state)}</td><td>${esc(m.origin || "hub")}</td><td>${m.ab ? esc(`${m.ab.version} · ${m.ab.split}% · ${m.ab.state}`) : ""}</td><td>${esc(m.error ?? "")}</td></tr>`).join("")
      : `<tr><td colspan="6" class="muted">No model reported.</td></tr>`)
    + `</tbody></table></div>`;

  html += `<h2>Deployment history</h2><div class="table-wrap"><table id="device-deployments"><caption class="sr-only">Deployments that targeted this device, newest first</caption><thead><tr><th scope="col">Deployment</th><th scope="col">Model</th><th scope="col">Target</th><th scope="col">Created</th><th scope="col">State here</th></tr></thead><tbody>`
    + (history.length ? history.map((d, i) => {
      const det = detailed[i];
      const s = det && !(det instanceof Error) && det.states ? det.states[id] : null;
      const stateText = s ? s.state : (i < 20 ? "unknown" : "–");
      return `<tr data-deployment-id="${esc(d.deployment_id)}"><th scope="row"><a href="#/deployment/${esc(enc(d.deployment_id))}">${esc(d.deployment_id)}</a></th><td>${esc(`${d.name}@${d.version}`)}</td><td>${esc(d.target)}</td><td>${when(d.created)}</td><td class="state state-${cls(stateText)}"${s && s.error ? ` title="${esc(s.error)}"` : ""}>${esc(stateText)}${s && s.error ? `: ${esc(s.error)}` : ""}</td></tr>`;
    }).join("") : `<tr><td colspan="5" class="muted">No deployment targeted this device.</td></tr>`)
    + `</tbody></table></div>`;

  html += `<h2>Recent telemetry</h2>`;
  if (!tele.windows.length) {
    html += `<p class="muted" id="telemetry-empty">No telemetry stored for this device yet.</p>`;
  } else {
    html += `<p>${num(tele.batches)} batches, ${num(tele.windows.length)} windows shown (the newest 2,000)${tele.dropped ? `, <strong>${num(tele.dropped)}</strong> calls dropped by the device's spool` : ""}.</p>`;
    html += `<div class="table-wrap"><table id="telemetry-table"><caption class="sr-only">Calls by model version and route</caption><thead><tr><th scope="col">Model</th><th scope="col">Route</th><th scope="col">Calls</th><th scope="col">Errors</th><th scope="col">Budget breaches</th><th scope="col">Mean</th><th scope="col">p50</th><th scope="col">p95</th><th scope="col">p99</th><th scope="col">Period</th></tr></thead><tbody>`
      + tele.groups.map((g) => {
        const hasHist = g.hist.some((c) => c > 0);
        const q = (p) => (hasHist ? ms(quantileMs(g.hist, p)) : "–");
        return `<tr><th scope="row">${esc(`${g.model}@${g.version}`)}</th><td>${esc(g.route)}</td><td>${num(g.calls)}</td><td>${num(g.errors)}${g.calls ? ` <span class="muted">(${pct(g.errors / g.calls)})</span>` : ""}</td><td>${num(g.breaches)}</td><td>${g.calls ? ms(g.sum / g.calls) : "–"}</td><td>${q(0.5)}</td><td>${q(0.95)}</td><td>${q(0.99)}</td><td>${when(g.first)} – ${when(g.last)}</td></tr>`;
      }).join("") + `</tbody></table></div>`;
    const bySeries = new Map();
    for (const w of tele.windows) {
      if (!w.count) continue;
      const key = `${w.model}@${w.version} ${w.route}`;
      if (!bySeries.has(key)) bySeries.set(key, []);
      bySeries.get(key).push([Number(w.end), Number(w.latency_ms_sum) / Number(w.count)]);
    }
    const series = [...bySeries.entries()].slice(0, 6).map(([name, points]) => ({ name, points }));
    html += lineChart({
      id: "latency-chart",
      title: `Mean latency per telemetry window, device ${id}`,
      desc: `Mean call latency in milliseconds over time for ${series.map((s) => s.name).join(", ")}.`,
      series,
      yLabel: "ms",
      yFormat: (v) => num(v, 2),
    });
  }
  section.innerHTML = html;
  const view = { name: "device", id, deployments: new Set(history.map((d) => d.deployment_id)) };
  view.refresh = debounce(() => { if (state.view === view) route({ soft: true }); }, 1500);
  state.view = view;
  ctx.loaded();
}

export function deviceLive(ev) {
  const s = document.getElementById("device-status");
  if (s && ev.status !== undefined) { s.textContent = ev.status ?? "unknown"; s.className = `status status-${cls(ev.status)}`; }
  const l = document.getElementById("device-last-seen");
  if (l && ev.last_seen !== undefined) l.innerHTML = when(ev.last_seen);
}

