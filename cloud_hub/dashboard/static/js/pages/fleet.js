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

export async function renderFleet(ctx) {
  const filter = ctx.query.get("filter") ?? state.fleetFilter ?? "";
  page.innerHTML = `<h1 tabindex="-1">Fleet</h1><div id="fleet-summary"><p>Loading devices…</p></div>
    <div class="toolbar"><label for="fleet-filter">Filter devices</label>
    <input id="fleet-filter" type="search" value="${esc(filter)}" placeholder="words, or group:G tag:K=V profile:P status:online model:NAME" autocomplete="off" spellcheck="false" aria-describedby="fleet-count">
    <span id="fleet-count" role="status" aria-live="polite"></span></div>
    <div class="table-wrap"><table id="fleet-table"><caption class="sr-only">Devices</caption><thead><tr>
    <th scope="col" aria-sort="ascending"><button type="button" class="sort" data-sort="device">Device</button></th>
    <th scope="col"><button type="button" class="sort" data-sort="status">Status</button></th>
    <th scope="col"><button type="button" class="sort" data-sort="profile">Profile</button></th><th scope="col">Groups</th>
    <th scope="col">Tags</th><th scope="col">Active versions</th>
    <th scope="col"><button type="button" class="sort" data-sort="last_seen">Last seen</button></th></tr></thead><tbody></tbody></table></div>`;
  const devices = await api("/v1/devices");
  if (ctx.stale()) return;
  const byId = new Map();
  for (const d of devices) { indexDevice(d); byId.set(d.device_id, d); }
  const tbody = page.querySelector("#fleet-table tbody");
  tbody.innerHTML = devices.map(fleetRow).join("");
  const rows = new Map();
  for (const tr of tbody.rows) rows.set(tr.dataset.deviceId, tr);
  const view = { name: "fleet", byId, rows, devices, tbody };
  state.view = view;
  const summary = document.getElementById("fleet-summary");
  view.summary = debounce(() => { if (state.view === view) summary.innerHTML = fleetSummaryHtml(view.devices); }, 500);
  summary.innerHTML = fleetSummaryHtml(devices);
  const input = document.getElementById("fleet-filter");
  view.apply = () => {
    state.fleetFilter = input.value;
    const match = matcher(input.value);
    let shown = 0;
    for (const d of view.devices) {
      const tr = rows.get(d.device_id);
      if (!tr) continue;
      const ok = match(d);
      if (tr.hidden === ok) tr.hidden = !ok;
      if (ok) shown += 1;
    }
    document.getElementById("fleet-count").textContent = `${num(shown)} of ${num(view.devices.length)} shown`;
  };
  input.addEventListener("input", view.apply);
  summary.addEventListener("click", (event) => {
    const b = event.target.closest("button[data-filter]");
    if (!b) return;
    input.value = b.dataset.filter;
    view.apply();
    input.focus();
  });
  view.poll = async () => {
    const fresh = await api("/v1/devices");
    if (state.view !== view) return;
    for (const f of fresh) {
      const d = byId.get(f.device_id);
      if (d && d.status === f.status && d.last_seen === f.last_seen) continue;
      if (d) {
        Object.assign(d, f);
        delete d._active;
        fleetLiveDevice({ device_id: f.device_id }); // redraws its cells from d
      } else {
        fleetLiveDevice({ device_id: f.device_id }); // adds the row, then fill it in whole
        const nd = Object.assign(byId.get(f.device_id), f);
        indexDevice(nd);
        const holder = document.createElement("tbody");
        holder.innerHTML = fleetRow(nd);
        const tr = holder.firstElementChild;
        rows.get(f.device_id).replaceWith(tr);
        rows.set(f.device_id, tr);
      }
    }
    view.apply();
  };
  // sorting: a header button orders the rows (again: the other way), moving the row elements
  const SORT_KEYS = {
    device: (d) => String(d.device_id),
    status: (d) => String(d.status ?? "~"),
    profile: (d) => String(d.profile ?? "~"),
    last_seen: (d) => Number(d.last_seen || 0),
  };
  page.querySelector("#fleet-table thead").addEventListener("click", (event) => {
    const b = event.target.closest("button[data-sort]");
    if (!b) return;
    const th = b.closest("th");
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of page.querySelectorAll("#fleet-table thead th")) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = SORT_KEYS[b.dataset.sort];
    const sign = ascending ? 1 : -1;
    view.devices.sort((x, y) => {
      const a = key(x), c = key(y);
      return sign * (a < c ? -1 : a > c ? 1 : String(x.device_id).localeCompare(String(y.device_id)));
    });
    const fragment = document.createDocumentFragment();
    for (const d of view.devices) { const tr = rows.get(d.device_id); if (tr) fragment.appendChild(tr); }
    tbody.appendChild(fragment);
  });
  view.apply();
  if (!devices.length) tbody.innerHTML = `<tr><td colspan="7" class="muted">No devices yet: enroll one with 'cloud-hub devices enroll-token'.</td></tr>`;
  ctx.loaded();
}

export function fleetLiveDevice(ev) {
  const view = state.view;
  let d = view.byId.get(ev.device_id);
  if (!d) {
    d = { device_id: ev.device_id, profile: null, groups: [], tags: {}, reported: null };
    view.byId.set(d.device_id, d);
    view.devices.push(d);
    if (view.devices.length === 1) view.tbody.innerHTML = "";
  }
  if (ev.status !== undefined) d.status = ev.status;
  if (ev.last_seen !== undefined) d.last_seen = ev.last_seen;
  if (ev.active && typeof ev.active === "object") d._active = ev.active;
  indexDevice(d);
  let tr = view.rows.get(d.device_id);
  if (!tr) {
    const holder = document.createElement("tbody");
    holder.innerHTML = fleetRow(d);
    tr = holder.firstElementChild;
    view.tbody.appendChild(tr);
    view.rows.set(d.device_id, tr);
  } else {
    const status = d.status ?? "unknown";
    const cell = tr.querySelector("td.status");
    cell.textContent = status;
    cell.className = `status status-${cls(status)}`;
    tr.querySelector("td.active").innerHTML = activeHtml(d);
    tr.querySelector("td.last-seen").innerHTML = when(d.last_seen);
  }
  view.apply();
  view.summary();
}

