import { page, state } from "../state.js";
import { bytes, enc, esc, ms, num, pool, when } from "../format.js";
import { api } from "../api.js";
import { activeModels } from "./fleet.js";

// ---------------------------------------------------------------- models

export async function renderModels(ctx) {
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Models</h1><p>Loading…</p>`;
  const artifacts = await api("/v1/models");
  if (ctx.stale()) return;
  const byName = new Map();
  for (const a of artifacts) {
    let m = byName.get(a.name);
    if (!m) { m = { name: a.name, versions: new Map(), profiles: new Set(), size: 0, created: 0, count: 0 }; byName.set(a.name, m); }
    m.versions.set(a.version, Math.max(m.versions.get(a.version) ?? -1, Number(a.release)));
    m.profiles.add(a.profile);
    m.size += Number(a.size || 0);
    m.count += 1;
    m.created = Math.max(m.created, Number(a.created || 0));
  }
  const models = [...byName.values()].sort((a, b) => a.name.localeCompare(b.name));
  page.innerHTML = `<h1 tabindex="-1">Models</h1>
    <div class="table-wrap"><table id="models-table"><caption class="sr-only">Registered models</caption><thead><tr><th scope="col">Model</th><th scope="col">Versions (release)</th><th scope="col">Profiles</th><th scope="col">Artifacts</th><th scope="col">Total size</th><th scope="col">Last added</th></tr></thead><tbody>`
    + (models.length ? models.map((m) => {
      const versions = [...m.versions.entries()].sort((a, b) => b[1] - a[1]).map(([v, r]) => `<span class="chip">${esc(v)} <span class="muted">r${esc(r)}</span></span>`).join(" ");
      return `<tr data-model="${esc(m.name)}"><th scope="row"><a class="model-link" href="#/model/${esc(enc(m.name))}">${esc(m.name)}</a></th><td>${versions}</td><td>${[...m.profiles].sort().map((p) => `<span class="chip">${esc(p)}</span>`).join(" ")}</td><td>${num(m.count)}</td><td>${bytes(m.size)}</td><td>${when(m.created)}</td></tr>`;
    }).join("") : `<tr><td colspan="6" class="muted">No model registered: add one with 'cloud-hub models add'.</td></tr>`)
    + `</tbody></table></div>`;
  state.view = { name: "models" };
  ctx.loaded();
}

export function tensorsHtml(list) {
  return (list || []).map((t) => `<li><code>${esc(t.name)}</code> ${esc(t.dtype)} [${(t.shape || []).map(esc).join(", ")}]</li>`).join("");
}

export function interfaceChanges(prev, cur) {
  if (!prev || !cur) return [];
  const lines = [];
  for (const role of ["inputs", "outputs"]) {
    const old = new Map((prev[role] || []).map((t) => [t.name, t]));
    const now = new Map((cur[role] || []).map((t) => [t.name, t]));
    for (const n of old.keys()) if (!now.has(n)) lines.push(`${role.slice(0, -1)} ${n} removed`);
    for (const [n, t] of now) {
      if (!old.has(n)) lines.push(`${role.slice(0, -1)} ${n} added (${t.dtype} [${(t.shape || []).join(", ")}])`);
      else {
        const o = old.get(n);
        if (o.dtype !== t.dtype || JSON.stringify(o.shape) !== JSON.stringify(t.shape)) lines.push(`${role.slice(0, -1)} ${n}: ${o.dtype} [${(o.shape || []).join(", ")}] → ${t.dtype} [${(t.shape || []).join(", ")}]`);
      }
    }
  }
  if ((prev.max_batch ?? 0) !== (cur.max_batch ?? 0)) lines.push(`max batch ${prev.max_batch || "no limit"} → ${cur.max_batch || "no limit"}`);
  return lines;
}

export function validationHtml(v) {
  if (!v || !Object.keys(v).length) return `<span class="muted">none recorded</span>`;
  const passed = v.passed === true ? `<span class="ok">passed</span>` : v.passed === false ? `<span class="bad">failed</span>` : "";
  const metric = v.metric ? `${esc(v.metric)} ${esc(num(v.value, 6))} (tolerance ${esc(num(v.tolerance, 6))}) ` : "";
  const fallbacks = Array.isArray(v.fallbacks) && v.fallbacks.length ? `<br><span class="muted">fallbacks: ${v.fallbacks.map((f) => esc(typeof f === "string" ? f : JSON.stringify(f))).join("; ")}</span>` : "";
  const reason = v.reason ? `<br><span class="muted">${esc(v.reason)}</span>` : "";
  return `${metric}${passed}${reason}${fallbacks}`;
}

export async function renderModel(ctx) {
  const name = ctx.params[0];
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Model ${esc(name)}</h1><p>Loading…</p>`;
  const [model, devices] = await Promise.all([api(`/v1/models/${enc(name)}`), api("/v1/devices").catch(() => [])]);
  if (ctx.stale()) return;
  const release = new Map();
  for (const a of model.artifacts || []) release.set(a.version, Math.max(release.get(a.version) ?? -1, Number(a.release)));
  const versions = [...(model.versions || [])].sort((a, b) => (release.get(b) ?? 0) - (release.get(a) ?? 0));
  const shown = versions.slice(0, 20);
  const details = await pool(shown, 6, (v) => api(`/v1/models/${enc(name)}/${enc(v)}`));
  if (ctx.stale()) return;
  const running = new Map();
  for (const d of devices) for (const m of activeModels(d)) if (m.name === name && m.state === "active") running.set(m.version, (running.get(m.version) || 0) + 1);
  let html = `<h1 tabindex="-1">Model ${esc(name)}</h1><p><a href="#/models">← Models</a> · <a href="#/drift?model=${esc(enc(name))}">Drift</a></p>`;
  html += `<h2>Lineage</h2><ol class="lineage" reversed>${shown.map((v, i) => {
    const det = details[i];
    const prev = details[i + 1];
    const changes = det && !(det instanceof Error) && prev && !(prev instanceof Error) ? interfaceChanges(prev.interface, det.interface) : [];
    return `<li><a href="#v-${esc(enc(v))}">${esc(v)}</a> <span class="muted">release ${esc(release.get(v))}</span> · ${num(running.get(v) || 0)} devices active`
      + (i + 1 < shown.length ? (changes.length ? `<br><span class="bad">interface changed from ${esc(shown[i + 1])}: ${changes.map(esc).join("; ")}</span>` : `<br><span class="muted">same interface as ${esc(shown[i + 1])}</span>`) : "")
      + `</li>`;
  }).join("")}</ol>`;
  if (versions.length > shown.length) html += `<p class="muted">${versions.length - shown.length} older versions not shown.</p>`;
  shown.forEach((v, i) => {
    const det = details[i];
    html += `<section class="version" id="v-${esc(enc(v))}" aria-labelledby="h-${esc(enc(v))}"><h2 id="h-${esc(enc(v))}">${esc(name)}@${esc(v)}</h2>`;
    if (!det || det instanceof Error) { html += `<p class="error">Could not load: ${esc(det && det.message)}</p></section>`; return; }
    const itf = det.interface || {};
    html += `<div class="interface"><div><h3>Inputs</h3><ul>${tensorsHtml(itf.inputs)}</ul></div><div><h3>Outputs</h3><ul>${tensorsHtml(itf.outputs)}</ul></div><div><h3>Max batch</h3><p>${esc(itf.max_batch ? itf.max_batch : "no limit")}</p></div></div>`;
    html += `<div class="table-wrap"><table class="artifacts"><caption>Artifacts per profile (this hub serves profile ${esc(det.serving_profile)})</caption><thead><tr><th scope="col">Profile</th><th scope="col">Precision</th><th scope="col">Runtime</th><th scope="col">Size</th><th scope="col">Validation</th><th scope="col">Latency (build host)</th><th scope="col">Servable here</th><th scope="col">Artifact</th></tr></thead><tbody>`
      + (det.artifacts || []).map((a) => {
        const lat = a.latency_ms || {};
        const latText = lat.median !== undefined ? `${ms(lat.median)} median${lat.budget_ms ? ` / budget ${ms(lat.budget_ms)}` : ""}${lat.over_budget ? ` <span class="bad">over budget</span>` : ""}` : "–";
        return `<tr><th scope="row">${esc(a.profile)}</th><td>${esc(a.precision)}</td><td>${esc(a.runtime)}</td><td>${bytes(a.size)}</td><td>${validationHtml(a.validation)}</td><td>${latText}</td><td>${a.servable ? "yes" : "no"}</td><td><code title="${esc(a.artifact_id)}">${esc(String(a.artifact_id).slice(0, 12))}</code></td></tr>`;
      }).join("") + `</tbody></table></div></section>`;
  });
  page.innerHTML = html;
  state.view = { name: "model", id: name };
  ctx.loaded();
}

