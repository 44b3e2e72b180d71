import { state } from "./state.js";
import { parseJson } from "./api.js";
import { expired } from "./pages/login.js";
import { fleetLiveDevice } from "./pages/fleet.js";
import { deviceLive } from "./pages/device.js";
import { deploymentsLive } from "./pages/deployments.js";
import { rolloutsLive } from "./pages/rollouts.js";

// ---------------------------------------------------------------- live updates (SSE over fetch)

export function setLive(stateName, text) {
  const el = document.getElementById("live-status");
  el.dataset.state = stateName;
  el.textContent = text;
}

export function stopLive() {
  const live = state.live;
  clearTimeout(live.timer);
  live.timer = null;
  if (live.controller) live.controller.abort();
  live.controller = null;
  live.connected = false;
  live.backoff = 1000;
  live.gap = false;
  setLive("off", "live: off");
}

export function scheduleReconnect(reason) {
  const live = state.live;
  if (!state.token) return;
  const delay = Math.min(live.backoff, 30000) * (0.75 + Math.random() * 0.5);
  live.backoff = Math.min(live.backoff * 2, 30000);
  setLive("retrying", `live: reconnecting in ${Math.round(delay / 1000)} s${reason ? ` (${reason})` : ""}`);
  live.timer = setTimeout(startLive, delay);
}

export async function startLive() {
  const live = state.live;
  clearTimeout(live.timer);
  if (live.controller) live.controller.abort();
  if (!state.token) return;
  const controller = new AbortController();
  live.controller = controller;
  const token = state.token;
  let res;
  try {
    res = await fetch("/v1/events", {
      headers: { Accept: "text/event-stream", Authorization: `Bearer ${token}` },
      cache: "no-store",
      signal: controller.signal,
    });
  } catch (err) {
    if (controller.signal.aborted) return;
    return scheduleReconnect("hub unreachable");
  }
  if (res.status === 401) { controller.abort(); if (token === state.token) expired(); return; }
  if (!res.ok || !res.body) {
    controller.abort();
    if (res.status === 404) live.backoff = 60000; // a hub without /v1/events: try again now and then
    return scheduleReconnect(`HTTP ${res.status}`);
  }
  live.connected = true;
  live.backoff = 1000;
  setLive("on", "live: on");
  // the stream sends changes from now on: after a gap (a reconnect, an overflow) read the page's state again
  if (live.gap && state.view && state.view.poll) state.view.poll().catch(() => {});
  live.gap = true;
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      // frames end with a blank line (\n\n, \r\n\r\n or \r\r)
      let match;
      while ((match = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
        const frame = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        dispatchFrame(frame);
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
  }
  live.connected = false;
  if (controller.signal.aborted || live.controller !== controller) return;
  scheduleReconnect("stream ended");
}

// one SSE frame: "event:" / "data:" lines (several data lines join with \n); ":" lines are comments
export function parseFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split(/\r\n|\n|\r/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

export function dispatchFrame(frame) {
  const parsed = parseFrame(frame);
  if (!parsed) return; // a keepalive comment
  let data;
  try { data = parseJson(parsed.data); } catch { return; }
  if (!data || typeof data !== "object") return;
  try {
    if (parsed.event === "device") onDeviceEvent(data);
    else if (parsed.event === "deployment") onDeploymentEvent(data);
    else if (parsed.event === "rollout") onRolloutEvent(data);
  } catch (err) {
    console.error("live update failed", err);
  }
}

export function onDeviceEvent(ev) {
  const view = state.view;
  if (!view) return;
  if (view.name === "fleet") fleetLiveDevice(ev);
  else if (view.name === "device" && view.id === ev.device_id) deviceLive(ev);
}

export function onDeploymentEvent(ev) {
  const view = state.view;
  if (!view) return;
  if (view.name === "deployments") deploymentsLive(ev);
  else if (view.name === "deployment" && view.id === ev.deployment_id) view.refresh();
  else if (view.name === "rollout" && view.deployments?.has(ev.deployment_id)) view.progress(ev);
  else if (view.name === "device" && view.deployments?.has(ev.deployment_id)) view.refresh();
}

export function onRolloutEvent(ev) {
  const view = state.view;
  if (!view) return;
  if (view.name === "rollouts") rolloutsLive(ev);
  else if (view.name === "rollout" && view.id === ev.id) view.refresh();
}

// without a live stream (a hub without /v1/events, or while reconnecting) the page on show polls
export const POLL_MS = 5000;
setInterval(() => {
  const view = state.view;
  if (!state.me || state.live.connected || !view || !view.poll || document.hidden) return;
  view.poll().catch(() => {});
}, POLL_MS);

