import { page, state } from "../state.js";
import { cls, debounce, enc, esc, pool, when } from "../format.js";
import { api } from "../api.js";

// ---------------------------------------------------------------- deployments

export function countStates(states) {
  const counts = {};
  for (const s of Object.values(states || {})) counts[s.state] = (counts[s.state] || 0) + 1;
  return counts;
}

export function progressState(counts, total) {
  const active = counts.active || 0;
  const failed = counts.failed || 0;
  const busy = (counts.pending || 0) + (counts.downloading || 0) + (counts.installing || 0);
  if (busy > 0) return "in progress";
  if (failed > 0) return "failed";
  if (total > 0 && active >= total) return "complete";
  return active > 0 ? "partial" : "done";
}

export function countsText(counts) {
  return Object.entries(counts).filter(([k, v]) => k !== "total" && v).map(([k, v]) => `${v} ${k}`).join(", ");
}

export function setProgress(tr, counts, total) {
  const active = counts.active || 0;
  const cell = tr.querySelector("td.progress");
  cell.innerHTML = `<span class="progress-text">${esc(`${active}/${total} active`)}</span><meter min="0" max="${esc(Math.max(total, 1))}" value="${esc(active)}" aria-hidden="true"></meter>`;
  const st = progressState(counts, total);
  const sc = tr.querySelector("td.state");
  sc.textContent = st;
  sc.className = `state state-${cls(st)}`;
  const det = tr.querySelector("td.counts");
  if (det) det.textContent = countsText(counts);
}

export function deploymentRow(d) {
  const total = (d.devices || []).length;
  return `<tr data-deployment-id="${esc(d.deployment_id)}" data-total="${esc(total)}"><th scope="row"><a class="deployment-link" href="#/deployment/${esc(enc(d.deployment_id))}">${esc(d.deployment_id)}</a></th>`
    + `<td><a href="#/model/${esc(enc(d.name))}">${esc(d.name)}</a>@${esc(d.version)}</td><td>${esc(d.target ?? "")}</td><td>${when(d.created)}</td>`
    + `<td class="progress"><span class="progress-text muted">…/${esc(total)} active</span></td><td class="state">loading</td><td class="counts"></td></tr>`;
}

export async function renderDeployments(ctx) {
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Deployments</h1><p>Loading…</p>`;
  const deployments = await api("/v1/deployments");
  if (ctx.stale()) return;
  page.innerHTML = `<h1 tabindex="-1">Deployments</h1><p class="muted">Newest first; progress updates live. Details of the newest 100 are loaded.</p>
    <div class="table-wrap"><table id="deployments-table"><caption class="sr-only">Deployments</caption><thead><tr><th scope="col">Deployment</th><th scope="col">Model</th><th scope="col">Target</th><th scope="col">Created</th><th scope="col">Progress</th><th scope="col">State</th><th scope="col">Devices by state</th></tr></thead>
    <tbody>${deployments.map(deploymentRow).join("")}</tbody></table></div>`;
  const tbody = page.querySelector("#deployments-table tbody");
  if (!deployments.length) tbody.innerHTML = `<tr class="empty"><td colspan="7" class="muted">No deployments yet: 'cloud-hub deploy NAME@VERSION --to TARGET'.</td></tr>`;
  const rows = new Map();
  for (const tr of tbody.rows) if (tr.dataset.deploymentId) rows.set(tr.dataset.deploymentId, tr);
  const view = { name: "deployments", rows, tbody, live: new Set() };
  view.poll = async () => {
    const list = await api("/v1/deployments");
    if (state.view !== view) return;
    const open = list.slice(0, 100).filter((dep) => {
      const tr = rows.get(dep.deployment_id);
      return !tr || !["complete", "failed", "done"].includes(tr.querySelector("td.state").textContent);
    }).slice(0, 20);
    await pool(open, 6, async (dep) => {
      const det = await api(`/v1/deployments/${enc(dep.deployment_id)}`);
      if (state.view !== view) return;
      const counts = countStates(det.states);
      view.live.delete(dep.deployment_id);
      deploymentsLive({ deployment_id: dep.deployment_id, name: dep.name, version: dep.version, counts: { ...counts, total: (dep.devices || []).length } });
    });
  };
  state.view = view;
  await pool(deployments.slice(0, 100), 8, async (d) => {
    const det = await api(`/v1/deployments/${enc(d.deployment_id)}`);
    const tr = rows.get(d.deployment_id);
    if (tr && state.view === view && !view.live.has(d.deployment_id)) setProgress(tr, countStates(det.states), Number(tr.dataset.total));
  });
  if (ctx.stale()) return;
  for (const tr of rows.values()) if (tr.querySelector("td.state").textContent === "loading") tr.querySelector("td.state").textContent = "–";
  ctx.loaded();
}

export function deploymentsLive(ev) {
  const view = state.view;
  const counts = ev.counts || {};
  let tr = view.rows.get(ev.deployment_id);
  if (!tr) {
    const sum = Object.entries(counts).filter(([k]) => k !== "total").reduce((a, [, v]) => a + Number(v || 0), 0);
    const total = Number.isFinite(counts.total) ? counts.total : sum;
    const holder = document.createElement("tbody");
    holder.innerHTML = deploymentRow({ deployment_id: ev.deployment_id, name: ev.name, version: ev.version, target: "", created: Date.now() / 1000, devices: new Array(total) });
    tr = holder.firstElementChild;
    view.tbody.querySelector("tr.empty")?.remove();
    view.tbody.prepend(tr);
    view.rows.set(ev.deployment_id, tr);
    // fill in the target and creation time
    api(`/v1/deployments/${enc(ev.deployment_id)}`).then((d) => {
      if (state.view !== view) return;
      tr.dataset.total = String((d.devices || []).length);
      tr.cells[2].textContent = d.target ?? "";
      tr.cells[3].innerHTML = when(d.created);
      if (!view.live.has(ev.deployment_id)) setProgress(tr, countStates(d.states), Number(tr.dataset.total));
    }).catch(() => {});
  }
  view.live.add(ev.deployment_id);
  const total = Number(tr.dataset.total) || Object.entries(counts).filter(([k]) => k !== "total").reduce((a, [, v]) => a + Number(v || 0), 0);
  setProgress(tr, counts, total);
}

export async function renderDeployment(ctx) {
  const id = ctx.params[0];
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Deployment ${esc(id)}</h1><p>Loading…</p>`;
  const d = await api(`/v1/deployments/${enc(id)}`);
  if (ctx.stale()) return;
  page.innerHTML = `<h1 tabindex="-1">Deployment ${esc(id)}</h1><p><a href="#/deployments">← Deployments</a></p>
    <dl class="facts"><div><dt>Model</dt><dd><a href="#/model/${esc(enc(d.name))}">${esc(d.name)}</a>@${esc(d.version)}</dd></div>
    <div><dt>Target</dt><dd>${esc(d.target)}</dd></div><div><dt>Created</dt><dd>${when(d.created)}</dd></div>
    <div><dt>Signed rollback</dt><dd>${d.rollback ? "yes" : "no"}</dd></div></dl>
    <table class="summary" id="deployment-summary"><caption class="sr-only">Progress</caption><tbody><tr data-deployment-id="${esc(id)}" data-total="${esc((d.devices || []).length)}"><th scope="row">Progress</th><td class="progress"></td><td class="state"></td><td class="counts"></td></tr></tbody></table>
    <div class="table-wrap"><table id="deployment-devices"><caption class="sr-only">State per device</caption><thead><tr><th scope="col">Device</th><th scope="col">State</th><th scope="col">Error</th></tr></thead><tbody></tbody></table></div>`;
  const view = { name: "deployment", id };
  const fill = (det) => {
    const states = det.states || {};
    const tr = page.querySelector("#deployment-summary tr");
    setProgress(tr, countStates(states), Number(tr.dataset.total));
    page.querySelector("#deployment-devices tbody").innerHTML = Object.keys(states).sort().map((dev) => {
      const s = states[dev];
      return `<tr data-device-id="${esc(dev)}"><th scope="row"><a class="device-link" href="#/device/${esc(enc(dev))}">${esc(dev)}</a></th><td class="state state-${cls(s.state)}">${esc(s.state)}</td><td>${esc(s.error ?? "")}</td></tr>`;
    }).join("") || `<tr><td colspan="3" class="muted">No device targeted.</td></tr>`;
  };
  view.refresh = debounce(async () => {
    try { const det = await api(`/v1/deployments/${enc(id)}`); if (state.view === view) fill(det); } catch { /* next event retries */ }
  }, 300);
  view.poll = async () => view.refresh();
  state.view = view;
  fill(d);
  ctx.loaded();
}

