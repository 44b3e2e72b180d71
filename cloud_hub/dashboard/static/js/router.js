import { page, state } from "./state.js";
import { esc, tickTimes } from "./format.js";
import { renderLogin } from "./pages/login.js";
import { renderFleet } from "./pages/fleet.js";
import { renderDevice } from "./pages/device.js";
import { renderModel, renderModels } from "./pages/models.js";
import { renderDeployment, renderDeployments } from "./pages/deployments.js";
import { renderRollout, renderRollouts } from "./pages/rollouts.js";
import { renderDrift } from "./pages/drift.js";
import { renderUsage } from "./pages/usage.js";

// ---------------------------------------------------------------- router

export const ROUTES = [
  [/^\/fleet$/, "fleet", renderFleet],
  [/^\/device\/(.+)$/, "device", renderDevice],
  [/^\/models$/, "models", renderModels],
  [/^\/model\/(.+)$/, "model", renderModel],
  [/^\/deployments$/, "deployments", renderDeployments],
  [/^\/deployment\/(.+)$/, "deployment", renderDeployment],
  [/^\/rollouts$/, "rollouts", renderRollouts],
  [/^\/rollout\/(.+)$/, "rollout", renderRollout],
  [/^\/drift$/, "drift", renderDrift],
  [/^\/usage$/, "usage", renderUsage],
];
export const NAV_FOR = { device: "fleet", model: "models", deployment: "deployments", rollout: "rollouts" };

export function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/fleet";
  const q = raw.indexOf("?");
  const path = q < 0 ? raw : raw.slice(0, q);
  const query = new URLSearchParams(q < 0 ? "" : raw.slice(q + 1));
  return { path, query };
}

// soft: a live refresh of the page on show (no placeholder, data-loaded stays, focus stays put)
export async function route({ soft = false } = {}) {
  if (!state.me) return renderLogin();
  const { path, query } = parseHash();
  let found = null;
  for (const [pattern, name, render] of ROUTES) {
    const m = pattern.exec(path);
    if (m) {
      let params;
      try { params = m.slice(1).map(decodeURIComponent); } catch { params = m.slice(1); }
      found = { name, render, params };
      break;
    }
  }
  if (!found) { location.replace("#/fleet"); return; }
  const seq = ++state.seq;
  const previousView = state.view;
  state.view = null;
  const ctx = {
    seq,
    soft: soft && page.dataset.page === found.name && page.dataset.loaded === "true",
    params: found.params,
    query,
    stale: () => seq !== state.seq,
    loaded: () => { if (seq === state.seq) { page.dataset.loaded = "true"; page.removeAttribute("aria-busy"); tickTimes(); } },
  };
  if (!ctx.soft) {
    page.removeAttribute("data-loaded");
    page.setAttribute("aria-busy", "true");
    page.innerHTML = `<h1 tabindex="-1">Loading…</h1>`;
    page.dataset.page = found.name;
  }
  const navName = NAV_FOR[found.name] || found.name;
  for (const a of document.querySelectorAll("#nav a[data-page]")) {
    if (a.dataset.page === navName) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    await found.render(ctx);
  } catch (err) {
    if (ctx.stale() || err.name === "AbortError") return;
    if (err.status === 401) return;
    if (ctx.soft) { state.view = previousView; return; } // a live refresh that failed: keep what is shown
    const title = found.params.length ? `${found.name[0].toUpperCase()}${found.name.slice(1)} ${found.params[0]}` : found.name[0].toUpperCase() + found.name.slice(1);
    page.innerHTML = `<h1 tabindex="-1">${esc(title)}</h1><p class="error" role="alert">Could not load this page: ${esc(err.message)}</p>`;
    page.dataset.loaded = "error";
    page.removeAttribute("aria-busy");
  }
  if (!ctx.stale()) {
    const h1 = page.querySelector("h1");
    if (h1) document.title = `${h1.textContent} · edgefed`;
    if (state.focusOnRender && h1) { h1.setAttribute("tabindex", "-1"); h1.focus({ preventScroll: false }); }
    state.focusOnRender = false;
  }
}

window.addEventListener("hashchange", () => { state.focusOnRender = true; route(); });
// a click on an in-app link clears data-loaded at once (hashchange comes a task later), so nobody reads
// the old page as the new one's
document.addEventListener("click", (event) => {
  const a = event.target.closest && event.target.closest('a[href^="#/"]');
  if (a && state.me && a.getAttribute("href") !== location.hash && !event.defaultPrevented) page.removeAttribute("data-loaded");
});

