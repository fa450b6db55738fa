// The snodevit page: each picked or dropped image becomes a card. A card POSTs the image to /classify (the answer)
// and to /explain_image (the attention heatmap, PNG), with the same seed, so the two describe the same passes.
// Everything shown comes from the service's public answers; nothing is computed here but the bar widths.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { meta: null, depth: 0 };
// The page picks the seeds itself (below 2^31): a seed the service drew may pass 2^53, beyond what a JS number holds.
const MAX_SEED = 2 ** 31 - 1;
const newSeed = () => Math.floor(Math.random() * MAX_SEED);

// ------------------------------------------------------------------------------------------ HTTP
class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    Object.assign(this, { status, code, detail });
  }
}

async function failure(resp) {
  let body = {};
  try { body = await resp.json(); } catch (_) { /* not JSON: keep the status text */ }
  return new ApiError(resp.status, body.error || resp.statusText || "error", body.detail || "(no detail)");
}

function form(file, params) {
  const data = new FormData();
  data.append("image", file, file.name);
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") data.append(k, v);
  return data;
}

async function classify(file, params) {
  const resp = await fetch("../classify", { method: "POST", body: form(file, params) });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

async function explainImage(file, params) {
  const resp = await fetch("../explain_image", { method: "POST", body: form(file, params) });
  if (!resp.ok) throw await failure(resp);
  return URL.createObjectURL(await resp.blob());
}

// ------------------------------------------------------------------------------------------ rendering
const fmt = (x, digits = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "n/a" : `${(100 * x).toFixed(1)}%`);

function bars(root, rows, max) {
  root.replaceChildren(...rows.map(([name, value, shown, cls]) => {
    const row = document.createElement("div");
    row.className = `bar-row ${cls || ""}`;
    const width = max > 0 ? Math.max(0, Math.min(1, value / max)) : 0;
    row.innerHTML = `<span class="bar-name"></span><span class="bar"><span class="fill"></span></span>` +
      `<span class="bar-value"></span>`;
    $(".bar-name", row).textContent = name;
    $(".fill", row).style.width = `${(100 * width).toFixed(1)}%`;
    $(".bar-value", row).textContent = shown;
    return row;
  }));
}

const REASONS = {
  accepted: "accepted",
  low_confidence: "low confidence",
  out_of_distribution: "out of distribution",
};

function showAnswer(card, a) {
  $(".result", card).hidden = false;
  $(".label", card).textContent = a.label;
  $(".confidence", card).textContent = `${pct(a.confidence)} calibrated confidence`;
  const decision = $(".decision", card);
  decision.textContent = `${a.decision.toUpperCase()} · ${REASONS[a.reason_code] || a.reason_code}`;
  decision.className = `decision ${a.decision} ${a.reason_code}`;
  $(".reason", card).textContent = a.reason;
  $(".prediction-set", card).textContent = a.prediction_set === null
    ? "prediction set: none (the model has no conformal threshold)"
    : `prediction set (alpha ${a.alpha}): {${a.prediction_set.join(", ")}}`;
  const u = a.uncertainty;
  const maxEntropy = Math.log(state.meta ? state.meta.classes.length : 10);
  bars($(".uncertainty", card), [
    ["total", u.total, fmt(u.total), "total"],
    ["aleatoric", u.aleatoric, fmt(u.aleatoric), "aleatoric"],
    ["epistemic", u.epistemic, fmt(u.epistemic), "epistemic"],
  ], maxEntropy);
  bars($(".top-k", card), a.top_k.map((e) => [e.label, e.probability, pct(e.probability), "prob"]), 1);
  $(".sampling", card).textContent = `seed ${a.seed} · ${a.num_samples} Monte Carlo samples`;
}

function historyLine(a, previous) {
  const li = document.createElement("li");
  let text = `seed ${a.seed}: ${a.label} ${pct(a.confidence)}, ${a.decision}`;
  if (previous) {
    const move = a.confidence - previous.confidence;
    text += ` (${move >= 0 ? "+" : ""}${(100 * move).toFixed(1)} pts` +
      `${a.label !== previous.label ? `, label was ${previous.label}` : ""}` +
      `${a.decision !== previous.decision ? `, decision was ${previous.decision}` : ""})`;
  }
  li.textContent = text;
  return li;
}

function showError(card, err) {
  const box = $(".error", card);
  box.hidden = false;
  box.replaceChildren();
  if (err instanceof ApiError) {
    const head = document.createElement("strong");
    head.textContent = `Refused (HTTP ${err.status}): ${err.code}`;
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = err.detail;
    box.append(head, detail);
  } else {
    box.textContent = `The service could not be reached: ${err.message}`;
  }
}

// ------------------------------------------------------------------------------------------ cards
function params(seed) {
  return { num_samples: $("#num-samples").value.trim(), seed };
}

async function run(card, seed) {
  $(".error", card).hidden = true;
  card.classList.add("busy");
  try {
    const previous = card.answer;
    const a = await classify(card.file, params(seed));
    card.answer = a;
    showAnswer(card, a);
    $(".history", card).prepend(historyLine(a, previous));
    await drawHeatmap(card);
  } catch (err) {
    showError(card, err);
  } finally {
    card.classList.remove("busy");
  }
}

async function drawHeatmap(card) {
  const layer = Number($(".layer", card).value);
  $(".layer-name", card).textContent = layer < 0 ? "rollout" : `block ${layer}`;
  $(".heatmap-caption", card).textContent = layer < 0 ? "attention rollout" : `attention of block ${layer}`;
  const p = { ...params(card.answer.seed), num_samples: card.answer.num_samples };
  if (layer >= 0) p.layer = layer;
  try {
    const url = await explainImage(card.file, p);
    const img = $(".heatmap", card);
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = url;
  } catch (err) {
    showError(card, err);
  }
}

function addCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.file = file;
  $(".file-name", card).textContent = file.name;
  $(".input-image", card).src = URL.createObjectURL(file);
  const slider = $(".layer", card);
  slider.max = String(Math.max(state.depth - 1, -1));
  $(".layer-control", card).hidden = state.depth === 0;
  slider.addEventListener("change", () => card.answer && drawHeatmap(card));
  slider.addEventListener("input", () => {
    $(".layer-name", card).textContent = slider.value < 0 ? "rollout" : `block ${slider.value}`;
  });
  $(".resample", card).addEventListener("click", () => run(card, newSeed()));
  $(".close", card).addEventListener("click", () => card.remove());
  $("#cards").append(card);
  const seed = $("#seed").value.trim();
  return run(card, seed === "" ? newSeed() : seed);
}

async function addFiles(files) {
  const picked = Array.from(files);  // the input is cleared right after the change event
  await ready;
  return Promise.all(picked.map(addCard));
}

// ------------------------------------------------------------------------------------------ model card
function row(name, value) {
  const tr = document.createElement("tr");
  tr.innerHTML = "<th></th><td></td>";
  tr.firstChild.textContent = name;
  tr.lastChild.textContent = value;
  return tr;
}

function showModelCard(m) {
  const c = m.calibration;
  const f = c.figures || {};
  const gate = c.ood_gate;
  const table = document.createElement("table");
  const byAlpha = (d, show) => (d ? Object.entries(d).map(([k, v]) => `alpha ${k}: ${show(v)}`).join(", ") : "n/a");
  table.append(
    row("model", `${m.model.tag} (${m.model.backend}, ${m.model.device}, ${m.model.precision})`),
    row("weights", m.model.version),
    row("classes", m.classes.join(" ")),
    row("calibrated", c.fitted ? `yes, temperature ${fmt(c.temperature)}` : "no"),
    row("test accuracy", pct(f.accuracy)),
    row("ECE before / after", `${fmt(f.ece_before, 4)} / ${fmt(f.ece_after, 4)}`),
    row("NLL before / after", `${fmt(f.nll_before)} / ${fmt(f.nll_after)}`),
    row("set coverage", byAlpha(f.coverage, pct)),
    row("mean set size", byAlpha(f.mean_set_size, (v) => fmt(v, 2))),
    row("decision rule", `${c.decision_score} threshold ${c.decision_threshold === null ? "none (accept all)"
      : fmt(c.decision_threshold)}${c.target_risk !== null ? `, target risk ${pct(c.target_risk)}` : ""}`),
    row("out-of-distribution gate", gate ? `${gate.score} > ${fmt(gate.threshold)} sends to review ` +
      `(fitted to review ${pct(gate.review_rate)} of in-distribution images)` : "none"),
    row("limits", `${m.limits.max_bytes} bytes, ${m.limits.max_pixels} pixels, ` +
      `${m.limits.num_samples_min}-${m.limits.num_samples_max} samples`),
  );
  $("#model-card-body").replaceChildren(table);
}

async function loadMetadata() {
  try {
    const resp = await fetch("../metadata");
    if (!resp.ok) throw await failure(resp);
    const m = await resp.json();
    state.meta = m;
    state.depth = Number(m.config.depth || 0);
    $("#num-samples").value = m.limits.num_samples_default;
    showModelCard(m);
  } catch (err) {
    $("#model-card-body").textContent = `GET /metadata failed: ${err.message}`;
  }
}

// ------------------------------------------------------------------------------------------ wiring
function wire() {
  const drop = $("#drop");
  $("#files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => { e.preventDefault(); addFiles(e.dataTransfer.files); });
  $("#clear").addEventListener("click", () => $("#cards").replaceChildren());
}

const ready = loadMetadata();  // cards wait for it (the layer slider needs the depth)
wire();
