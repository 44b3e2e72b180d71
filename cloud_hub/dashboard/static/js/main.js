import { TOKEN_KEY, state } from "./state.js";
import "./format.js";
import "./api.js";
import { bindLogin, renderLogin, showSession, whoami } from "./pages/login.js";
import { startLive } from "./live.js";
import { route } from "./router.js";
import "./svg.js";
import "./pages/fleet.js";
import "./pages/device.js";
import "./pages/models.js";
import "./pages/deployments.js";
import "./pages/rollouts.js";
import "./pages/drift.js";
import "./pages/usage.js";

// ---------------------------------------------------------------- start

async function start() {
  bindLogin();
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (!saved) return; // the form in index.html, bound above (what was typed stays); no data-loaded behind it
  try {
    const me = await whoami(saved);
    state.token = saved;
    state.me = { name: String(me.name ?? "token"), role: String(me.role ?? "viewer") };
    showSession(true);
    startLive();
    route();
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    renderLogin(err.status === 401 ? "Your saved token was refused: sign in again." : `Could not reach the hub: ${err.message}`);
  }
}

start();
