// edgefed dashboard: ES modules under static/js (main.js the entry), no build step, no dependency. Every string from the API reaches the
// DOM through esc() (or textContent); the admin token lives in sessionStorage only and travels in the
// Authorization header, never in a URL. docs/dashboard-ui.md describes the pages and the DOM contract.

export const TOKEN_KEY = "edgefed.dashboard.token";
export const PRICE_KEY = "edgefed.dashboard.price_per_1000";
// the agent's latency histogram bins (edge_agent/protocol/messages.py LATENCY_EDGES_MS) plus one overflow bin
export const LATENCY_EDGES_MS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0];
export const ACTING_ROLES = new Set(["deployer", "operator"]);
export const ROLLOUT_ACTIONS = {
  pause: ["running"],
  resume: ["paused"],
  abort: ["pending", "running", "paused"],
  rollback: ["pending", "running", "paused", "succeeded", "failed", "aborted"],
};
export const FINAL_ROLLOUT = new Set(["succeeded", "failed", "rolled-back", "aborted"]);

export const page = document.getElementById("page");
export const state = {
  token: null,
  me: null, // {name, role}
  seq: 0, // the render in progress; an older one's results are dropped
  view: null, // {name, ...} what the current page keeps for live updates
  live: { controller: null, backoff: 1000, timer: null, connected: false },
  focusOnRender: false,
};

