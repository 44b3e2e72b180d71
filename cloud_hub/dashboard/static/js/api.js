import { state } from "./state.js";
import { expired } from "./pages/login.js";

// ---------------------------------------------------------------- the API

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// JSON, tolerating bare NaN/Infinity (Python's json.dumps writes them for figures without calls)
export function parseJson(text) {
  if (!text) return null;
  try { return JSON.parse(text); } catch {
    return JSON.parse(text.replace(/-?\bInfinity\b|\bNaN\b/g, "null"));
  }
}

export async function api(path, { method = "GET", body, token = state.token, signal } = {}) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
  const init = { method, headers, cache: "no-store", credentials: "same-origin", signal };
  if (method !== "GET") { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body ?? {}); }
  let res;
  try { res = await fetch(path, init); } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `cannot reach the hub (${err.message})`);
  }
  const text = await res.text();
  let data = null;
  try { data = parseJson(text); } catch { data = null; }
  if (!res.ok) {
    const detail = data && (data.error || (typeof data.detail === "string" ? data.detail : null));
    const error = new ApiError(res.status, detail || `${res.status} ${res.statusText}`);
    if (res.status === 401 && state.me && token === state.token) expired();
    throw error;
  }
  return data;
}

