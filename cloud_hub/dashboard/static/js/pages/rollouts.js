import { FINAL_ROLLOUT, ROLLOUT_ACTIONS, page, state } from "../state.js";
import { cls, debounce, enc, esc, ms, num, pct, pool, when } from "../format.js";
import { api } from "../api.js";
import { canAct } from "./login.js";
import { route } from "../router.js";
import { countStates, setProgress } from "./deployments.js";

// ---------------------------------------------------------------- rollouts

export function actionButtons(r) {
  const allowed = canAct();
  return `<div class="actions" role="group" aria-label="Rollout ${esc(r.id)} actions">${Object.entries(ROLLOUT_ACTIONS).map(([action, states]) => {
    const possible = states.includes(r.state);
    const disabled = !allowed || !possible;
    const why = !allowed ? "needs a deployer or operator token" : !possible ? `not possible while ${r.state}` : `${action} rollout ${r.id}`;
    return `<button type="button" data-action="${action}" data-rollout-id="${esc(r.id)}"${disabled ? ` disabled aria-disabled="true"` : ""} title="${esc(why)}">${action[0].toUpperCase()}${action.slice(1)}</button>`;
  }).join("")}</div>`;
}

export function rolloutRow(r) {
  const waves = (r.waves || []).length;
  const wave = FINAL_ROLLOUT.has(r.state) ? `${waves}` : `${Math.min((r.current_wave ?? 0) + 1, waves)}/${waves}`;
  return `<tr data-rollout-id="${esc(r.id)}"><th scope="row"><a class="rollout-link" href="#/rollout/${esc(enc(r.id))}">${esc(r.id)}</a></th>`
    + `<td>${esc(`${r.model}@${r.version}`)}</td><td>${esc(r.strategy)}</td><td class="state state-${cls(r.state)}">${esc(r.state)}</td>`
    + `<td class="wave">${esc(wave)}</td><td>${num(r.deployed)}/${num(r.devices)}</td><td>${esc(r.reason ?? "")}</td><td>${when(r.updated || r.created)}</td><td>${actionButtons(r)}</td></tr>`;
}

export async function runAction(button) {
  const id = button.dataset.rolloutId;
  const action = button.dataset.action;
  if (!canAct() || button.disabled) return;
  const note = (text) => {
    state.actionNote = { text, at: Date.now() };
    const status = document.getElementById("action-status");
    if (status) status.textContent = text;
  };
  button.disabled = true;
  try {
    const r = await api(`/v1/rollouts/${enc(id)}/${enc(action)}`, { method: "POST" });
    note(`Rollout ${id}: ${action} done, now ${r && r.state ? r.state : "updated"}.`);
    if (r && r.id) rolloutsLive({ id: r.id, state: r.state, current_wave: r.current_wave }, true);
    if (state.view && state.view.refresh) state.view.refresh();
  } catch (err) {
    note(`Rollout ${id}: ${action} refused: ${err.message}`);
    button.disabled = false;
  }
}

page.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button && page.contains(button)) runAction(button);
});

// the last action's outcome, kept across the refresh that follows it
export function actionNoteText() {
  const n = state.actionNote;
  return n && Date.now() - n.at < 30000 ? esc(n.text) : "";
}

export async function renderRollouts(ctx) {
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Rollouts</h1><p>Loading…</p>`;
  const rollouts = await api("/v1/rollouts");
  if (ctx.stale()) return;
  const note = canAct() ? "" : `<p class="muted">Your role (${esc(state.me.role)}) may look but not act: the buttons need a deployer or operator token.</p>`;
  page.innerHTML = `<h1 tabindex="-1">Rollouts</h1>${note}<p id="action-status" role="status" aria-live="polite">${actionNoteText()}</p>
    <div class="table-wrap"><table id="rollouts-table"><caption class="sr-only">Rollouts, newest first</caption><thead><tr><th scope="col">Rollout</th><th scope="col">Model</th><th scope="col">Strategy</th><th scope="col">State</th><th scope="col">Wave</th><th scope="col">Devices reached</th><th scope="col">Reason</th><th scope="col">Updated</th><th scope="col">Actions</th></tr></thead>
    <tbody>${rollouts.length ? [...rollouts].sort((a, b) => (b.created ?? 0) - (a.created ?? 0)).map(rolloutRow).join("") : `<tr class="empty"><td colspan="9" class="muted">No rollouts yet: 'cloud-hub deploy NAME@VERSION --to TARGET --strategy canary'.</td></tr>`}</tbody></table></div>`;
  const view = { name: "rollouts" };
  view.refresh = debounce(() => { if (state.view === view) route({ soft: true }); }, 1000);
  view.poll = async () => view.refresh();
  state.view = view;
  ctx.loaded();
}

export function rolloutsLive(ev, fromAction = false) {
  const tr = page.querySelector(`tr[data-rollout-id="${CSS.escape(String(ev.id))}"]`);
  if (!tr) { if (!fromAction && state.view && state.view.name === "rollouts") state.view.refresh(); return; }
  const sc = tr.querySelector("td.state");
  if (ev.state) { sc.textContent = ev.state; sc.className = `state state-${cls(ev.state)}`; }
  const actions = tr.querySelector(".actions");
  if (actions && ev.state) {
    const hadFocus = actions.contains(document.activeElement);
    actions.outerHTML = actionButtons({ id: ev.id, state: ev.state });
    if (hadFocus) (tr.querySelector(".actions button:not([disabled])") || tr.querySelector("a.rollout-link"))?.focus();
  }
  const wave = tr.querySelector("td.wave");
  if (wave && Number.isFinite(ev.current_wave)) {
    const total = String(wave.textContent).split("/")[1];
    if (total && !FINAL_ROLLOUT.has(ev.state)) wave.textContent = `${Math.min(ev.current_wave + 1, Number(total))}/${total}`;
  }
}

export function verdictHtml(v) {
  if (!v || !Object.keys(v).length) return `<span class="muted">not judged yet</span>`;
  const head = v.passed === true ? `<span class="ok">passed</span>` : v.passed === false ? `<span class="bad">failed</span>` : `<span class="muted">waiting</span>`;
  const row = (label, f) => (f ? `<tr><th scope="row">${esc(label)}</th><td>${num(f.calls)}</td><td>${pct(f.error_rate)}</td><td>${pct(f.fallback_rate)}</td><td>${pct(f.breach_rate)}</td><td>${ms(f.p95_ms)}</td></tr>` : "");
  return `${head}: ${esc(v.why ?? "")}<table class="verdict"><caption class="sr-only">Gate figures</caption><thead><tr><th scope="col"></th><th scope="col">Calls</th><th scope="col">Errors</th><th scope="col">Cloud fallback</th><th scope="col">Budget breaches</th><th scope="col">p95</th></tr></thead><tbody>${row("new version", v.new)}${row("compared with", v.previous)}</tbody></table>${v.drift_score !== null && v.drift_score !== undefined ? `<p>Drift score ${esc(num(v.drift_score, 2))}</p>` : ""}`;
}

export async function renderRollout(ctx) {
  const id = ctx.params[0];
  if (!ctx.soft) page.innerHTML = `<h1 tabindex="-1">Rollout ${esc(id)}</h1><p>Loading…</p>`;
  const r = await api(`/v1/rollouts/${enc(id)}`);
  if (ctx.stale()) return;
  const waves = r.waves || [];
  const deployed = waves.filter((w) => w.deployment_id);
  const details = await pool(deployed, 6, (w) => api(`/v1/deployments/${enc(w.deployment_id)}`));
  if (ctx.stale()) return;
  const detailBy = new Map(deployed.map((w, i) => [w.deployment_id, details[i]]));
  const note = canAct() ? "" : `<p class="muted">Your role (${esc(state.me.role)}) may look but not act.</p>`;
  let html = `<h1 tabindex="-1">Rollout ${esc(id)}</h1><p><a href="#/rollouts">← Rollouts</a></p>
    <dl class="facts"><div><dt>Model</dt><dd><a href="#/model/${esc(enc(r.model))}">${esc(r.model)}</a>@${esc(r.version)}</dd></div>
    <div><dt>Target</dt><dd>${esc(r.target)}</dd></div><div><dt>Strategy</dt><dd>${esc(r.strategy)}</dd></div>
    <div><dt>State</dt><dd><span id="rollout-state" class="state state-${cls(r.state)}">${esc(r.state)}</span></dd></div>
    <div><dt>Wave</dt><dd>${esc(Math.min((r.current_wave ?? 0) + 1, waves.length))} of ${esc(waves.length)}</dd></div>
    <div><dt>Devices reached</dt><dd>${num(r.deployed)} of ${num(r.devices)}</dd></div>
    <div><dt>Created</dt><dd>${when(r.created)}</dd></div><div><dt>Updated</dt><dd>${when(r.updated)}</dd></div></dl>
    ${r.reason ? `<p class="error">${esc(r.reason)}</p>` : ""}${note}${actionButtons(r)}<p id="action-status" role="status" aria-live="polite">${actionNoteText()}</p>
    <h2>Waves</h2><div class="table-wrap"><table id="rollout-waves"><caption class="sr-only">Waves with their install progress and gate verdicts</caption><thead><tr><th scope="col">Wave</th><th scope="col">Devices</th><th scope="col">Deployment</th><th scope="col">Progress</th><th scope="col">State</th><th scope="col">Started</th><th scope="col">Installed</th><th scope="col">Gates passed</th><th scope="col">Gate verdict</th></tr></thead><tbody>`;
  html += waves.map((w, i) => {
    const det = detailBy.get(w.deployment_id);
    const dep = w.deployment_id ? `<a href="#/deployment/${esc(enc(w.deployment_id))}">${esc(w.deployment_id)}</a>` : `<span class="muted">not yet</span>`;
    return `<tr${w.deployment_id ? ` data-deployment-id="${esc(w.deployment_id)}"` : ""} data-total="${esc((w.devices || []).length)}"${i === r.current_wave ? ` class="current" aria-current="step"` : ""}><th scope="row">${i + 1}</th><td>${num((w.devices || []).length)}</td><td>${dep}</td>`
      + `<td class="progress">${w.deployment_id ? "" : "–"}</td><td class="state">${w.deployment_id ? "" : "waiting"}</td><td>${when(w.started_at)}</td><td>${when(w.active_at)}</td><td>${when(w.passed_at)}</td><td>${verdictHtml(w.verdict)}</td></tr>`;
  }).join("");
  html += `</tbody></table></div><h2>Events</h2><ol class="events" reversed>${[...(r.events || [])].reverse().slice(0, 100).map((e) => `<li>${when(e.at)} ${esc(e.event)}</li>`).join("")}</ol>`;
  page.innerHTML = html;
  for (const tr of page.querySelectorAll("#rollout-waves tr[data-deployment-id]")) {
    const det = detailBy.get(tr.dataset.deploymentId);
    if (det && !(det instanceof Error)) setProgress(tr, countStates(det.states), Number(tr.dataset.total));
  }
  const view = { name: "rollout", id, deployments: new Set(deployed.map((w) => w.deployment_id)) };
  view.refresh = debounce(() => { if (state.view === view) route({ soft: true }); }, 800);
  view.poll = async () => view.refresh();
  view.progress = (ev) => {
    const tr = page.querySelector(`#rollout-waves tr[data-deployment-id="${CSS.escape(ev.deployment_id)}"]`);
    if (tr) setProgress(tr, ev.counts || {}, Number(tr.dataset.total));
  };
  state.view = view;
  ctx.loaded();
}

