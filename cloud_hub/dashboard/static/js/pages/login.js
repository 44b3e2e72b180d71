import { ACTING_ROLES, TOKEN_KEY, page, state } from "../state.js";
import { esc } from "../format.js";
import { api } from "../api.js";
import { startLive, stopLive } from "../live.js";
import { route } from "../router.js";

// ---------------------------------------------------------------- session

export async function whoami(token) {
  try {
    return await api("/v1/whoami", { token });
  } catch (err) {
    if (err.status !== 404 && err.status !== 405) throw err;
  }
  // a hub without /v1/whoami: check the token, then whether it may list tokens (operator only)
  await api("/v1/status", { token });
  try { await api("/v1/tokens", { token }); return { name: "token", role: "operator" }; } catch (err) {
    if (err.status === 403) return { name: "token", role: "viewer" };
    throw err;
  }
}

export function canAct() { return !!state.me && ACTING_ROLES.has(state.me.role); }

export function showSession(on) {
  document.getElementById("nav").hidden = !on;
  document.getElementById("session").hidden = !on;
  document.getElementById("whoami").textContent = on ? `${state.me.name} (${state.me.role})` : "";
}

export function renderLogin(message = "") {
  state.seq += 1;
  state.view = null;
  page.dataset.page = "login";
  page.removeAttribute("data-loaded");
  page.innerHTML = `<section class="login" aria-labelledby="login-title">
    <h1 id="login-title" tabindex="-1">Sign in</h1>
    <form id="login-form" autocomplete="off">
      <label for="login-token">Admin token (operator, deployer or viewer)</label>
      <input id="login-token" name="token" type="password" required spellcheck="false" autocapitalize="off">
      <button type="submit" id="login-submit">Sign in</button>
      <p id="login-error" class="error" role="alert"${message ? "" : " hidden"}>${esc(message)}</p>
    </form></section>`;
  document.title = "Sign in · edgefed";
  bindLogin();
}

export function bindLogin() {
  const form = document.getElementById("login-form");
  if (!form || form.dataset.bound) return;
  form.dataset.bound = "1";
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("login-token");
    const button = document.getElementById("login-submit");
    const error = document.getElementById("login-error");
    const token = input.value.trim();
    error.hidden = true;
    if (!token) { error.textContent = "Enter a token."; error.hidden = false; input.focus(); return; }
    button.disabled = true;
    try {
      const me = await whoami(token);
      state.token = token;
      state.me = { name: String(me.name ?? "token"), role: String(me.role ?? "viewer") };
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = "";
      showSession(true);
      startLive();
      state.focusOnRender = true;
      if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/fleet"; // routes
      else route();
    } catch (err) {
      error.textContent = err.status === 401 || err.status === 403
        ? "That token was refused: check it and try again."
        : `Sign-in failed: ${err.message}`;
      error.hidden = false;
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
    }
  });
}

export function logout(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.me = null;
  stopLive();
  showSession(false);
  renderLogin(message);
  document.getElementById("login-token")?.focus();
}

export function expired() { logout("Your token was refused (expired or revoked): sign in again."); }

document.getElementById("logout").addEventListener("click", () => logout());

