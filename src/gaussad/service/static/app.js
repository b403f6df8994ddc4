// gaussad inspection page: pick a model, drop or choose images, see each with its score, decision and heat map,
// most anomalous first. Plain browser JavaScript talking to the service's JSON API; no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], maxFiles: 16, results: [], pending: 0, auth: false, feedback: false, history: null,
  names: new Set() }; // names: every name given to a file since the page was last cleared
const KEY = "gaussad-key"; // the API key, kept for this browser tab only (sessionStorage)

// fetch with the API key when the service needs one; a 401 asks for the key again.
async function api(url, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const resp = await fetch(url, { ...options, headers });
  if (resp.status === 401 && state.auth) askKey("the key was not accepted; enter a valid key");
  return resp;
}

function askKey(message) {
  $("key-form").hidden = false;
  $("key-message").textContent = message || "";
  $("key").focus();
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// A file's name as shown and sent: its path inside the chosen or dropped folder (e.g. "test/good/000.png"), so that
// same-named files of different sub-folders stay apart; else its name.
function fileName(f) {
  return f.relativePath || f.webkitRelativePath || f.name;
}

// The files under dropped entries (FileSystemEntry: files and folders, walked to every depth), each with its path
// from the dropped item as relativePath. A folder reader gives its entries in batches until an empty one.
async function walkEntries(entries) {
  const files = [];
  async function walk(entry, path) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      file.relativePath = path;
      files.push(file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${path}/${child.name}`);
      }
    }
  }
  for (const entry of entries) await walk(entry, entry.name);
  return files.sort((a, b) => fileName(a).localeCompare(fileName(b)));
}

// Names for a batch of files, none equal to another of the batch or to one given earlier: a repeated name
// (000.png picked from two folders one after the other) becomes "000 (2).png", "000 (3).png", ...
function uniqueNames(files) {
  return files.map((f) => {
    const name = fileName(f);
    const dot = name.lastIndexOf(".");
    const [stem, ext] = dot > name.lastIndexOf("/") + 1 ? [name.slice(0, dot), name.slice(dot)] : [name, ""];
    let out = name;
    for (let k = 2; state.names.has(out); k += 1) out = `${stem} (${k})${ext}`;
    state.names.add(out);
    return out;
  });
}

// A p-value in words: how rare a score this high is among good images.
function plainP(p) {
  if (p == null) return "";
  if (p < 1e-6) return "below 1e-6: fewer than 1 in a million good images score this high";
  if (p >= 0.1) return `${Math.round(100 * p)} % of good images score this high`;
  const n = Number((1 / p).toPrecision(2));
  return `1 in ${n.toLocaleString("en-US")} good images score this high`;
}

function showError(text) {
  const line = document.createElement("div");
  line.textContent = text;
  $("error").append(line);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  } catch (e) { /* not JSON: fall through to the status line */ }
  return `${resp.status} ${resp.statusText}`;
}

function describeModel() {
  const m = currentModel();
  if (!m) return;
  const t = m.threshold;
  $("model-info").textContent = `${m.backbone}, ${m.input_size} px, trained on ${m.n_samples} images; ` +
    `decision: ${t.image_score === "fused" ? "fused score, conformal" : t.method} at target FPR ${t.fpr}` +
    `${t.note ? ` (${t.note})` : ""}; ${m.maps ? "heat maps" : "no heat maps"}`;
  $("version").textContent = m.version == null ? "" : `version ${m.version}`;
  $("maps-toggle").hidden = !m.maps;
  $("apply").hidden = !state.feedback;
  $("rollback").hidden = !(m.version > 1);  // only an updated model has a previous version to serve again
  loadHistory();
}

async function reloadModels() {
  const resp = await api("/models");
  if (!resp.ok) { showError(await errorText(resp)); return false; }
  const chosen = $("model").value;
  state.models = await resp.json();
  // "apply feedback" works only where the service keeps the scored images (--keep-images): /health says so.
  const health = await api("/health");
  state.feedback = health.ok && (await health.json()).feedback === true;
  $("model").replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  if (state.models.some((m) => m.name === chosen)) $("model").value = chosen;
  describeModel();
  return true;
}

// Score over time (oldest left) with the threshold line; flagged points red; the drift tests underneath.
async function loadHistory() {
  const m = currentModel();
  if (!m) return;
  const resp = await api(`/models/${encodeURIComponent(m.name)}/history?limit=200`);
  if (!resp.ok) { $("history").hidden = true; return; }
  const h = await resp.json();
  $("history").hidden = false;
  state.history = h;
  drawChart();
  loadRates();
  const d = h.drift;
  const alarm = $("drift");
  alarm.className = d.alarm ? "alarm" : "";
  alarm.textContent = d.alarm ? `DRIFT: ${d.reasons.join("; ")}` :
    `no drift (${d.status}; last ${d.n} images of version ${h.version}, ${d.flagged} flagged at target FPR ${d.fpr})`;
}

// The chart in the SVG's own pixels (its viewBox follows its size), so that the dots stay round at any width;
// labelled axes: score up, the scored images from oldest to newest across.
function drawChart() {
  const h = state.history;
  const svg = $("chart");
  if (!h || $("history").hidden) return;
  const W = Math.max(svg.clientWidth, 200), H = Math.max(svg.clientHeight, 100);
  const left = 52, right = 10, top = 8, bottom = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const scores = h.points.map((p) => p.score);
  const ymax = Math.max(...scores, h.threshold || 0, 1e-9) * 1.05;
  const x = (i) => left + (h.points.length < 2 ? 0 : (i * (W - left - right)) / (h.points.length - 1));
  const y = (v) => H - bottom - (v / ymax) * (H - top - bottom);
  const fmt = (v) => (ymax >= 100 ? v.toFixed(0) : ymax >= 10 ? v.toFixed(1) : v.toFixed(2));
  const parts = [
    `<line class="axis" x1="${left}" x2="${left}" y1="${top}" y2="${H - bottom}"></line>`,
    `<line class="axis" x1="${left}" x2="${W - right}" y1="${H - bottom}" y2="${H - bottom}"></line>`,
  ];
  for (const v of [0, ymax / 2, ymax / 1.05]) {
    parts.push(`<text class="ytick" x="${left - 4}" y="${y(v) + 4}" text-anchor="end">${fmt(v)}</text>`);
  }
  parts.push(`<text class="ylabel" transform="translate(12 ${(top + H - bottom) / 2}) rotate(-90)" ` +
    `text-anchor="middle">score</text>`);
  parts.push(`<text class="xlabel" x="${(left + W - right) / 2}" y="${H - 8}" text-anchor="middle">` +
    `last ${h.points.length} scored images, oldest left${h.threshold != null ? "; dashed: threshold" : ""}</text>`);
  if (h.threshold != null) {
    parts.push(`<line class="threshold" x1="${left}" x2="${W - right}" y1="${y(h.threshold)}" y2="${y(h.threshold)}"></line>`);
  }
  h.points.forEach((p, i) => parts.push(
    `<circle class="${p.anomalous ? "flag" : "pt"}" cx="${x(i).toFixed(1)}" cy="${y(p.score).toFixed(1)}" r="3"></circle>`));
  svg.innerHTML = parts.join("");
}

// Realised rates from the operators' labels, per model and version (false alarms among good-marked, hits among
// defect-marked).
async function loadRates() {
  const resp = await api("/feedback/rates");
  if (!resp.ok) return;
  const rows = await resp.json();
  const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)} %`);
  const table = $("rates");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  for (const t of ["model", "version", "good marked", "flagged (FPR)", "defects marked", "flagged (TPR)"]) {
    const th = document.createElement("th");
    th.textContent = t;
    head.append(th);
  }
  const body = table.createTBody();
  for (const r of rows) {
    const row = body.insertRow();
    for (const v of [r.model, r.version, r.good, `${r.good_flagged} (${pct(r.fpr)})`, r.defect,
                     `${r.defect_flagged} (${pct(r.tpr)})`]) row.insertCell().textContent = String(v);
  }
  table.hidden = rows.length === 0;
}

async function mark(r, label, fig) {
  const resp = await api(`/results/${r.id}/label`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label }) });
  if (!resp.ok) { showError(await errorText(resp)); return; }
  r.label = label;
  fig.querySelector(".label").textContent = `marked ${label}`;
  loadRates();
}

async function applyFeedback() {
  const m = currentModel();
  if (!m) return;
  const resp = await api(`/models/${encodeURIComponent(m.name)}/update`, { method: "POST" });
  if (!resp.ok) { showError(await errorText(resp)); return; }
  const body = await resp.json();
  $("status").textContent = `model ${m.name}: version ${body.version} with ${body.added} image(s) added`;
  await reloadModels();
}

async function rollback() {
  const m = currentModel();
  if (!m) return;
  const resp = await api(`/models/${encodeURIComponent(m.name)}/rollback`, { method: "POST" });
  if (!resp.ok) { showError(await errorText(resp)); return; }
  await reloadModels();
}

function clearResults() {
  state.results.forEach((r) => URL.revokeObjectURL(r.url));
  state.results = [];
  state.names.clear();
  $("error").textContent = "";
  render();
}

function levelTable(levels) {
  const table = document.createElement("table");
  for (const [name, value] of Object.entries(levels)) {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = value.toFixed(3);
  }
  return table;
}

function card(r, showMaps) {
  const fig = document.createElement("figure");
  fig.className = `card ${r.anomalous ? "anomalous" : "ok"}`;
  fig.dataset.filename = r.path;
  fig.dataset.score = String(r.score);
  const img = document.createElement("img");
  img.src = showMaps && r.overlay ? r.overlay : r.url;
  img.alt = r.path;
  const cap = document.createElement("figcaption");
  const name = document.createElement("div");
  name.className = "filename";
  name.textContent = r.path;
  const line = document.createElement("div");
  line.className = "line";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = r.score.toFixed(3);
  score.title = r.evidence && r.evidence.rule === "fused"
    ? "score: -log10 of the fused p-value (global score and map peak); higher = more anomalous"
    : "score: mean Mahalanobis distance over the levels";
  const decision = document.createElement("span");
  decision.className = "decision";
  decision.textContent = r.anomalous ? "ANOMALY" : "ok";
  line.append(score, decision);
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  const pvalue = document.createElement("div");
  pvalue.className = "pvalue";
  pvalue.textContent = plainP(r.pvalue);
  if (r.pvalue != null) pvalue.title = `p-value ${r.pvalue.toExponential(2)}`;
  summary.textContent = "levels";
  details.append(summary, levelTable(r.levels));
  cap.append(name, line, pvalue);
  if (r.evidence && r.evidence.text) {  // what decided, in words (issue 35)
    const why = document.createElement("div");
    why.className = "evidence";
    why.textContent = r.evidence.text;
    cap.append(why);
  }
  cap.append(details);
  if (r.id) {
    const fb = document.createElement("div");
    fb.className = "feedback";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = r.label ? `marked ${r.label}` : "";
    for (const which of ["good", "defect"]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = `mark-${which}`;
      b.textContent = which;
      b.title = which === "good" ? "a good image (a false alarm if flagged): add it to the model with 'apply feedback'"
        : "a real defect";
      b.addEventListener("click", () => mark(r, which, fig));
      fb.append(b);
    }
    fb.append(label);
    cap.append(fb);
  }
  fig.append(img, cap);
  return fig;
}

function render() {
  const showMaps = $("show-maps").checked;
  const sorted = [...state.results].sort((a, b) => b.score - a.score);
  $("results").replaceChildren(...sorted.map((r) => card(r, showMaps)));
  const flagged = state.results.filter((r) => r.anomalous).length;
  $("status").textContent = state.pending
    ? `scoring ${state.pending} image(s)…`
    : state.results.length ? `${state.results.length} image(s), ${flagged} flagged` : "";
}

async function scoreChunk(model, files, names) {
  const form = new FormData();
  files.forEach((f, i) => form.append("files", f, names[i]));
  const url = `/models/${encodeURIComponent(model.name)}/score?maps=${model.maps}`;
  try {
    const resp = await api(url, { method: "POST", body: form });
    if (!resp.ok) {
      showError(await errorText(resp));
      return;
    }
    const body = await resp.json();
    if (currentModel() !== model) return; // the model was switched while this request ran
    body.results.forEach((r, i) => state.results.push({ ...r, url: URL.createObjectURL(files[i]) }));
  } catch (e) {
    showError(`request failed: ${e}`);
  } finally {
    state.pending -= files.length;
    render();
    if (!state.pending) loadHistory();
  }
}

async function scoreFiles(fileList) {
  const model = currentModel();
  if (!model) return;
  const files = [];
  for (const f of fileList) {
    if (f.type.startsWith("image/")) files.push(f);
    else showError(`${fileName(f)}: skipped, not an image`);
  }
  const names = uniqueNames(files);
  const chunks = [];
  for (let i = 0; i < files.length; i += state.maxFiles) {
    chunks.push([files.slice(i, i + state.maxFiles), names.slice(i, i + state.maxFiles)]);
  }
  state.pending += files.length;
  render();
  await Promise.all(chunks.map(([c, n]) => scoreChunk(model, c, n)));
}

async function init() {
  const health = await fetch("/health").then((r) => r.json());
  state.maxFiles = health.limits.max_files;
  state.auth = health.auth;
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("error").textContent = "";
    if (await reloadModels()) $("key-form").hidden = true;
  });
  if (state.auth && !sessionStorage.getItem(KEY)) askKey("this service needs an API key");
  else await reloadModels();

  $("model").addEventListener("change", () => { clearResults(); describeModel(); });
  $("apply").addEventListener("click", applyFeedback);
  $("rollback").addEventListener("click", rollback);
  for (const id of ["files", "folder"]) {
    $(id).addEventListener("change", (e) => { scoreFiles(e.target.files); e.target.value = ""; });
  }
  $("show-maps").addEventListener("change", render);
  window.addEventListener("resize", drawChart);
  $("clear").addEventListener("click", clearResults);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    // The entries must be taken while the event runs: a dropped folder is walked for its images afterwards.
    const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    if (entries.some((entry) => entry.isDirectory)) {
      walkEntries(entries).then(scoreFiles, (err) => showError(`could not read the dropped folder: ${err}`));
    } else {
      scoreFiles(e.dataTransfer.files);
    }
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

init().catch((e) => showError(`cannot reach the service: ${e}`));
