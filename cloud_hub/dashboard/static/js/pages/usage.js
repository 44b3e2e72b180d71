import { PRICE_KEY, page, state } from "../state.js";
import { enc, esc, num, pct } from "../format.js";
import { api } from "../api.js";
import { barChart } from "../svg.js";

// ---------------------------------------------------------------- usage

export async function renderUsage(ctx) {
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Cloud fallback usage</h1><p>Loading…</p>`;
  const rows = await api("/v1/usage");
  if (ctx.stale()) return;
  const price = Number(localStorage.getItem(PRICE_KEY) ?? "0") || 0;
  const byDevice = new Map();
  const byModel = new Map();
  for (const r of rows) {
    const d = byDevice.get(r.device_id) || { device_id: r.device_id, calls: 0, models: [] };
    d.calls += Number(r.calls || 0);
    d.models.push(r);
    byDevice.set(r.device_id, d);
    byModel.set(r.model, (byModel.get(r.model) || 0) + Number(r.calls || 0));
  }
  const devices = [...byDevice.values()].sort((a, b) => b.calls - a.calls);
  const total = devices.reduce((a, d) => a + d.calls, 0);
  const top = devices.slice(0, 20);
  page.innerHTML = `<h1 tabindex="-1">Cloud fallback usage</h1>
    <p>Calls the hub's inference server answered for devices (their cloud fallback), per device and model, since the hub's registry began.</p>
    <form id="usage-form" class="toolbar" novalidate><label for="usage-price">Cost per 1,000 cloud calls</label>
    <input id="usage-price" type="number" min="0" step="any" inputmode="decimal" value="${esc(price)}"> <span class="muted">(kept in this browser only)</span></form>
    <p class="totals"><strong>${num(total)}</strong> cloud calls from ${num(devices.length)} devices; estimated cost <strong id="usage-total-cost">${esc(num((total / 1000) * price, 2))}</strong>.</p>
    ${top.length ? `<h2>Most cloud calls</h2>${barChart({ id: "usage-chart", title: "Cloud calls per device", desc: `The ${top.length} devices with the most cloud calls.`, labels: top.map((d) => d.device_id), series: [{ name: "cloud calls", values: top.map((d) => d.calls) }], yFormat: (v) => num(v) })}` : ""}
    <h2>By model</h2><ul class="inline">${[...byModel.entries()].sort((a, b) => b[1] - a[1]).map(([m, c]) => `<li><span class="chip">${esc(m)}: ${num(c)}</span></li>`).join("") || `<li class="muted">none</li>`}</ul>
    <h2>By device</h2><div class="table-wrap"><table id="usage-table"><caption class="sr-only">Cloud calls and estimated cost per device</caption><thead><tr><th scope="col">Device</th><th scope="col">Cloud calls</th><th scope="col">Share</th><th scope="col">By model</th><th scope="col">Estimated cost</th></tr></thead><tbody>`
    + (devices.length ? devices.map((d) => `<tr data-device-id="${esc(d.device_id)}" data-calls="${esc(d.calls)}"><th scope="row"><a class="device-link" href="#/device/${esc(enc(d.device_id))}">${esc(d.device_id)}</a></th><td>${num(d.calls)}</td><td>${pct(total ? d.calls / total : NaN)}</td><td>${d.models.map((m) => `<span class="chip">${esc(m.model)}: ${num(m.calls)}</span>`).join(" ")}</td><td class="cost">${esc(num((d.calls / 1000) * price, 2))}</td></tr>`).join("")
      : `<tr><td colspan="5" class="muted">No cloud call recorded yet.</td></tr>`)
    + `</tbody></table></div>`;
  const input = document.getElementById("usage-price");
  document.getElementById("usage-form").addEventListener("submit", (e) => e.preventDefault());
  input.addEventListener("input", () => {
    const p = Math.max(0, Number(input.value) || 0);
    localStorage.setItem(PRICE_KEY, String(p));
    document.getElementById("usage-total-cost").textContent = num((total / 1000) * p, 2);
    for (const tr of page.querySelectorAll("#usage-table tr[data-calls]")) tr.querySelector("td.cost").textContent = num((Number(tr.dataset.calls) / 1000) * p, 2);
  });
  state.view = { name: "usage" };
  ctx.loaded();
}

