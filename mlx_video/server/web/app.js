// The mlxvid studio page: plain JavaScript over the server's own routes (no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const models = {};
const streams = {};
let searchText = "";

async function api(path, options = {}) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (response.status === 401) {
    const key = window.prompt("This server needs its API key:");
    if (key) {
      document.cookie = "mlxvid_key=" + encodeURIComponent(key) + "; SameSite=Strict; path=/";
      return api(path, options);
    }
  }
  const body = response.headers.get("content-type", "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error(body && body.error ? body.error.message : response.status + " " + response.statusText);
  }
  return body;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.appendChild(child);
  return node;
}

async function loadModels() {
  const list = await api("/v1/models");
  const select = $("model");
  select.innerHTML = "";
  for (const model of list.data) {
    models[model.id] = model.mlxvid;
    select.appendChild(element("option", { value: model.id, text: model.id }));
  }
  showModel();
}

function showModel() {
  const info = models[$("model").value];
  if (!info) return;
  $("image-field").style.display = info.takes_image ? "" : "none";
  $("audio-field").style.display = info.takes_audio ? "" : "none";
  $("model-info").textContent = info.description + " — " + info.sizes.join(", ") + ", " + info.frames +
    " frames at " + info.fps + " fps, " + info.steps + " steps" + (info.needs_image ? "; needs an image" : "");
}

async function submitForm(event) {
  event.preventDefault();
  $("error").textContent = "";
  const data = new FormData();
  for (const field of $("form").elements) {
    if (!field.name) continue;
    if (field.type === "file") {
      if (field.files.length && field.closest("label").style.display !== "none") data.append(field.name, field.files[0]);
    } else if (field.value !== "") {
      data.append(field.name, field.value);
    }
  }
  $("submit").disabled = true;
  try {
    await api("/v1/videos", { method: "POST", body: data });
    await refresh();
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    $("submit").disabled = false;
  }
}

function follow(job) {
  if (streams[job.id] || (job.status !== "queued" && job.status !== "in_progress")) return;
  const source = new EventSource("/api/jobs/" + job.id + "/events");
  streams[job.id] = source;
  source.addEventListener("progress", (event) => {
    const update = JSON.parse(event.data);
    renderQueueItem(update);
    if (update.status !== "queued" && update.status !== "in_progress") {
      source.close();
      delete streams[job.id];
      refresh();
    }
  });
  source.addEventListener("deleted", () => { source.close(); delete streams[job.id]; refresh(); });
}

function renderQueueItem(job) {
  const id = "job-" + job.id;
  let item = $(id);
  const x = job.mlxvid;
  if (job.status !== "queued" && job.status !== "in_progress") {
    if (item) item.remove();
    return;
  }
  if (!item) {
    item = element("li", { id: id, "data-id": job.id });
    $("queue").appendChild(item);
  }
  const eta = x.eta_seconds ? ", about " + Math.round(x.eta_seconds) + " s left" : "";
  const step = x.steps ? " step " + (x.step || 0) + "/" + x.steps : "";
  item.replaceChildren(
    element("div", {},
      element("div", { class: "prompt", text: job.prompt }),
      element("progress", { max: "100", value: String(job.progress) }),
      element("div", { class: "hint status", text: (x.stage || job.status) + step + eta }),
      element("button", { class: "cancel", text: "Cancel", onclick: () => cancel(job.id) })),
    x.preview_url ? element("img", { class: "preview", alt: "preview", src: x.preview_url + "?e=" + Date.now() }) : null);
}

async function cancel(id) {
  try { await api("/api/jobs/" + id + "/cancel", { method: "POST" }); } catch (error) { $("error").textContent = error.message; }
  refresh();
}

async function again(id, newSeed) {
  try {
    await api("/api/jobs/" + id + "/again", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ new_seed: newSeed }) });
  } catch (error) { $("error").textContent = error.message; }
  refresh();
}

async function remove(id) {
  try { await api("/v1/videos/" + id, { method: "DELETE" }); } catch (error) { $("error").textContent = error.message; }
  refresh();
}

async function showSettings(job, target) {
  try {
    const record = await api(job.mlxvid.sidecar_url);
    target.textContent = JSON.stringify(record.settings || record, null, 1);
  } catch (error) { target.textContent = error.message; }
}

function card(job) {
  const x = job.mlxvid;
  const settings = element("pre", { class: "settings" });
  const details = element("details", { ontoggle: () => { if (!settings.textContent) showSettings(job, settings); } },
    element("summary", { text: "Settings" }), settings);
  const body = job.status === "completed"
    ? element("video", { controls: "", preload: "metadata", src: x.video_url })
    : element("div", { class: "failed", text: (x.status === "cancelled" ? "cancelled" : "failed") + ": " + (job.error ? job.error.message : "") });
  return element("div", { class: "card", "data-id": job.id, "data-status": x.status }, body,
    element("div", { class: "prompt", text: job.prompt }),
    element("div", { class: "hint", text: job.model + " · " + job.size + " · " + new Date(job.created_at * 1000).toLocaleString() }),
    job.status === "completed" ? details : null,
    element("button", { class: "again-seed", text: "Again, new seed", onclick: () => again(job.id, true) }),
    element("button", { class: "again", text: "Again, same settings", onclick: () => again(job.id, false) }),
    job.status === "completed" ? element("a", { href: x.video_url, download: job.id + ".mp4" }, element("button", { text: "Download" })) : null,
    element("button", { class: "delete", text: "Delete", onclick: () => remove(job.id) }));
}

async function refresh() {
  try {
    const query = searchText ? "&q=" + encodeURIComponent(searchText) : "";
    const page = await api("/v1/videos?limit=100&order=desc" + query);
    const gallery = $("gallery");
    const shown = new Set();
    for (const job of page.data) {
      if (job.status === "queued" || job.status === "in_progress") { renderQueueItem(job); follow(job); continue; }
      const item = $("job-" + job.id);
      if (item) item.remove();
      shown.add(job.id);
      if (!gallery.querySelector('[data-id="' + job.id + '"][data-status="' + job.mlxvid.status + '"]')) {
        const old = gallery.querySelector('[data-id="' + job.id + '"]');
        if (old) old.remove();
        gallery.insertBefore(card(job), gallery.firstChild);
      }
    }
    for (const old of gallery.querySelectorAll(".card")) if (!shown.has(old.dataset.id)) old.remove();
    const system = await api("/api/system");
    $("system").textContent = system.queued + " queued" + (system.running ? ", 1 running" : "") +
      (system.loaded_models.length ? " · loaded: " + system.loaded_models.join(", ") : "");
  } catch (error) {
    $("error").textContent = error.message;
  }
}

$("form").addEventListener("submit", submitForm);
$("model").addEventListener("change", showModel);
$("search").addEventListener("input", (event) => { searchText = event.target.value; refresh(); });
loadModels().then(refresh).catch((error) => { $("error").textContent = error.message; });
setInterval(refresh, 3000);
