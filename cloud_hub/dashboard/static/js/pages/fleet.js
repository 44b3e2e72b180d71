import { page, state } from "../state.js";
import { cls, debounce, enc, esc, num, when } from "../format.js";
import { api } from "../api.js";

// ---------------------------------------------------------------- fleet

export function activeModels(d) {
  if (d._active) return Object.entries(d._active).map(([name, version]) => ({ name, version, state: "active" }));
  const models = d.reported && Array.isArray(d.reported.models) ? d.reported.models : [];
  return models.map((m) => ({ name: m.name, version: m.version, state: m.state || "unknown", error: m.error, ab: m.ab }));
}

export function activeHtml(d) {
  const models = activeModels(d);
  if (!models.length) return `<span class="muted">none</span>`;
  return models.map((m) => {
    const label = `${m.name}@${m.version ?? "?"}`;
    const extra = m.state && m.state !== "active" ? ` <span class="badge state-${cls(m.state)}">${esc(m.state)}</span>` : "";
    const ab = m.ab ? ` <span class="badge">B ${esc(m.ab.version)} ${esc(m.ab.split)}%</span>` : "";
    return `<span class="model-chip"${m.error ? ` title="${esc(m.error)}"` : ""}>${esc(label)}${extra}${ab}</span>`;
  }).join(" ");
}

export function tagPairs(d) { return Object.entries(d.tags || {}).map(([k, v]) => `${k}=${v}`); }

// what the filter matches: free words against everything, or key:value (profile, group, tag, status, model)
export function indexDevice(d) {
  const models = activeModels(d);
  const keys = {
    profile: [String(d.profile ?? "").toLowerCase()],
    group: (d.groups || []).map((g) => String(g).toLowerCase()),
    tag: tagPairs(d).map((t) => t.toLowerCase()),
    status: [String(d.status ?? "unknown").toLowerCase()],
    model: models.flatMap((m) => [String(m.name).toLowerCase(), `${m.name}@${m.version}`.toLowerCase()]),
    id: [String(d.device_id).toLowerCase()],
  };
  d._keys = keys;
  d._blob = Object.values(keys).flat().join(" ");
}

export function matcher(text) {
  const terms = text.toLowerCase().split(/\s+/).filter(Boolean);
  return (d) => terms.every((t) => {
    const m = /^(profile|group|tag|status|model|id):(.*)$/.exec(t);
    if (m && m[2]) return d._keys[m[1]].includes(m[2]);
    return d._blob.includes(t);
  });
}

export function fleetRow(d) {
  const status = d.status ?? "unknown";
  const groups = (d.groups || []).map((g) => `<span class="chip">${esc(g)}</span>`).join(" ");
  const tags = tagPairs(d).map((t) => `<span class="chip">${esc(t)}</span>`).join(" ");
  return `<tr data-device-id="${esc(d.device_id)}"><th scope="row"><a class="device-link" href="#/device/${esc(enc(d.device_id))}">${esc(d.device_id)}</a></th>`
    + `<td class="status status-${cls(status)}">${esc(status)}</td><td class="profile">${esc(d.profile ?? "")}</td>`
    + `<td class="groups">${groups}</td><td class="tags">${tags}</td><td class="active">${activeHtml(d)}</td>`
    + `<td class="last-seen">${when(d.last_seen)}</td></tr>`;
}

export function fleetSummaryHtml(devices) {
  const online = (d) => d.status === "online";
  const tally = (keyOf) => {
    const map = new Map();
    for (const d of devices) for (const k of keyOf(d)) {
      const e = map.get(k) || { total: 0, online: 0 };
      e.total += 1; if (online(d)) e.online += 1;
      map.set(k, e);
    }
    return [...map.entries()].sort((a, b) => b[1].total - a[1].total || String(a[0]).localeCompare(String(b[0])));
  };
  const block = (label, prefix, entries) => {
    if (!entries.length) return "";
    const shown = entries.slice(0, 30);
    return `<div class="facet"><h2>${esc(label)}</h2><ul>${shown.map(([k, e]) =>
      `<li><button type="button" class="chip facet-button" data-filter="${esc(`${prefix}:${k}`)}">${esc(k)} <span class="muted">${e.online}/${e.total} online</span></button></li>`).join("")}`
      + `${entries.length > shown.length ? `<li class="muted">and ${entries.length - shown.length} more</li>` : ""}</ul></div>`;
  };
  const total = devices.length, on = devices.filter(online).length;
  return `<p class="totals"><strong>${num(total)}</strong> devices: <span class="status-online">${num(on)} online</span>, `
    + `<span class="status-offline">${num(devices.filter((d) => d.status === "offline").length)} offline</span>, `
    + `${num(total - on - devices.filter((d) => d.status === "offline").length)} other</p>`
    + `<div class="facets">${block("By profile", "profile", tally((d) => [d.profile ?? "unknown"]))}`
    + `${block("By group", "group", tally((d) => d.groups || []))}${block("By tag", "tag", tally(tagPairs))}</div>`;
}

// The table holds one page of the matching devices (PAGE_SIZES; "all" shows every one): drawing 1,000 rows
// costs Chromium most of a second of layout and paint, one page of 100 a few milliseconds.
// The choice is kept in the browser's localStorage (PAGE_SIZE_KEY).
export const PAGE_SIZES = [25, 100, 500, "all"];
export const PAGE_SIZE_KEY = "edgefed.dashboard.fleet_page_size";
const DEFAULT_PAGE_SIZE = 100;

function fleetHtml(filter, size) {
  const options = PAGE_SIZES.map((n) => `<option value="${n}"${String(n) === String(size) ? " selected" : ""}>${n === "all" ? "all" : n}</option>`).join("");
  return `<h1 tabindex="-1">Fleet</h1><div id="fleet-summary"><p>Loading devices…</p></div>
    <div class="toolbar"><label for="fleet-filter">Filter devices</label>
    <input id="fleet-filter" type="search" value="${esc(filter)}" placeholder="words, or group:G tag:K=V profile:P status:online model:NAME" autocomplete="off" spellcheck="false" aria-describedby="fleet-count">
    <span id="fleet-count" role="status" aria-live="polite"></span></div>
    <div class="table-wrap"><table id="fleet-table"><caption class="sr-only">Devices</caption><thead><tr>
    <th scope="col" aria-sort="ascending"><button type="button" class="sort" data-sort="device">Device</button></th>
    <th scope="col"><button type="button" class="sort" data-sort="status">Status</button></th>
    <th scope="col"><button type="button" class="sort" data-sort="profile">Profile</button></th><th scope="col">Groups</th>
    <th scope="col">Tags</th><th scope="col">Active versions</th>
    <th scope="col"><button type="button" class="sort" data-sort="last_seen">Last seen</button></th></tr></thead><tbody></tbody></table></div>
    <nav class="pager toolbar" aria-label="Pages of devices"><button type="button" id="fleet-prev">Previous</button>
    <span id="fleet-range"></span><button type="button" id="fleet-next">Next</button>
    <label for="fleet-page-size" class="check">Rows per page</label><select id="fleet-page-size">${options}</select></nav>`;
}

export async function renderFleet(ctx) {
  const filter = ctx.query.get("filter") ?? state.fleetFilter ?? "";
  page.innerHTML = fleetHtml(filter, localStorage.getItem(PAGE_SIZE_KEY) ?? DEFAULT_PAGE_SIZE);
  const devices = await api("/v1/devices");
  if (ctx.stale()) return;
  const byId = new Map();
  for (const d of devices) { indexDevice(d); byId.set(d.device_id, d); }
  const table = page.querySelector("#fleet-table");
  const view = { name: "fleet", byId, rows: new Map(), devices, tbody: table.tBodies[0], matches: [], offset: 0 };
  state.view = view;
  const summary = document.getElementById("fleet-summary");
  view.summary = debounce(() => { if (state.view === view) summary.innerHTML = fleetSummaryHtml(view.devices); }, 500);
  summary.innerHTML = fleetSummaryHtml(devices);
  const input = document.getElementById("fleet-filter");
  const sizeSelect = document.getElementById("fleet-page-size");
  const pageSize = () => (sizeSelect.value === "all" ? Infinity : Number(sizeSelect.value));
  view.draw = () => drawFleetPage(view, table, pageSize());
  // the filter again over every device; the page redrawn only when its devices changed (`first`: from the top)
  view.apply = (first = false) => {
    state.fleetFilter = input.value;
    const match = matcher(input.value);
    view.matches = view.devices.filter(match);
    if (first) view.offset = 0;
    const lastStart = Number.isFinite(pageSize()) ? Math.floor(Math.max(0, view.matches.length - 1) / pageSize()) * pageSize() : 0;
    view.offset = Math.max(0, Math.min(view.offset, lastStart));
    const wanted = view.matches.slice(view.offset, view.offset + pageSize()).map((d) => d.device_id);
    const shown = [...view.rows.keys()];
    if (wanted.length !== shown.length || wanted.some((id, i) => id !== shown[i])) view.draw();
    else updateRange(view, table, pageSize());
    document.getElementById("fleet-count").textContent = `${num(view.matches.length)} of ${num(view.devices.length)} match`;
  };
  input.addEventListener("input", () => view.apply(true));
  sizeSelect.addEventListener("change", () => { localStorage.setItem(PAGE_SIZE_KEY, sizeSelect.value); view.apply(true); view.draw(); });
  const turn = (step) => { if (Number.isFinite(pageSize())) { view.offset = Math.max(0, view.offset + step * pageSize()); view.apply(); } };
  document.getElementById("fleet-prev").addEventListener("click", () => turn(-1));
  document.getElementById("fleet-next").addEventListener("click", () => turn(1));
  summary.addEventListener("click", (event) => {
    const b = event.target.closest("button[data-filter]");
    if (!b) return;
    input.value = b.dataset.filter;
    view.apply(true);
    input.focus();
  });
  view.poll = async () => {
    const fresh = await api("/v1/devices");
    if (state.view !== view) return;
    for (const f of fresh) {
      const d = byId.get(f.device_id);
      if (d && d.status === f.status && d.last_seen === f.last_seen) continue;
      if (!d) { byId.set(f.device_id, f); view.devices.push(f); }
      const nd = Object.assign(byId.get(f.device_id), f);
      delete nd._active;
      indexDevice(nd);
      redrawRow(view, nd);
    }
    view.apply();
    view.summary();
  };
  // sorting: a header button orders the devices (again: the other way) and shows the first page
  const SORT_KEYS = {
    device: (d) => String(d.device_id),
    status: (d) => String(d.status ?? "~"),
    profile: (d) => String(d.profile ?? "~"),
    last_seen: (d) => Number(d.last_seen || 0),
  };
  table.tHead.addEventListener("click", (event) => {
    const b = event.target.closest("button[data-sort]");
    if (!b) return;
    const th = b.closest("th");
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of table.tHead.querySelectorAll("th")) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = SORT_KEYS[b.dataset.sort];
    const sign = ascending ? 1 : -1;
    view.devices.sort((x, y) => {
      const a = key(x), c = key(y);
      return sign * (a < c ? -1 : a > c ? 1 : String(x.device_id).localeCompare(String(y.device_id)));
    });
    view.apply(true);
  });
  view.apply(true);
  ctx.loaded();
}

// the rows of the current page, and the pager's range and buttons
function drawFleetPage(view, table, size) {
  const slice = view.matches.slice(view.offset, view.offset + size);
  view.tbody.innerHTML = slice.length ? slice.map(fleetRow).join("")
    : `<tr><td colspan="7" class="muted">${view.devices.length ? "No device matches the filter."
      : "No devices yet: enroll one with 'cloud-hub devices enroll-token'."}</td></tr>`;
  view.rows = new Map();
  for (const tr of view.tbody.rows) if (tr.dataset.deviceId) view.rows.set(tr.dataset.deviceId, tr);
  updateRange(view, table, size);
}

function updateRange(view, table, size) {
  const total = view.matches.length;
  const last = Math.min(total, view.offset + size);
  document.getElementById("fleet-range").textContent = total ? `${num(view.offset + 1)}–${num(last)} of ${num(total)}` : "none";
  document.getElementById("fleet-prev").disabled = view.offset === 0;
  document.getElementById("fleet-next").disabled = last >= total;
  table.dataset.total = String(view.devices.length);
  table.dataset.shown = String(view.rows.size);
}

// a device's cells again from its data, when its row is on the current page
function redrawRow(view, d) {
  const tr = view.rows.get(d.device_id);
  if (!tr) return;
  const status = d.status ?? "unknown";
  const cell = tr.querySelector("td.status");
  cell.textContent = status;
  cell.className = `status status-${cls(status)}`;
  tr.querySelector("td.active").innerHTML = activeHtml(d);
  tr.querySelector("td.last-seen").innerHTML = when(d.last_seen);
}

export function fleetLiveDevice(ev) {
  const view = state.view;
  let d = view.byId.get(ev.device_id);
  if (!d) {
    d = { device_id: ev.device_id, profile: null, groups: [], tags: {}, reported: null };
    view.byId.set(d.device_id, d);
    view.devices.push(d);
  }
  if (ev.status !== undefined) d.status = ev.status;
  if (ev.last_seen !== undefined) d.last_seen = ev.last_seen;
  if (ev.active && typeof ev.active === "object") d._active = ev.active;
  indexDevice(d);
  redrawRow(view, d);
  view.apply();
  view.summary();
}
