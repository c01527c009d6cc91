// teachx serve: the page. Plain JavaScript over the JSON API (/api/v1, see /docs); no build step.
"use strict";

const API = "/api/v1";
const PAGE = 120;
const $ = (id) => document.getElementById(id);

const state = {
  models: [],          // ModelInfo from /runs
  defaultModel: null,  // the model the page opens on (the server's pick: the first with built-in maps)
  model: null,         // ModelInfo of the selected model (loaded)
  items: [],           // ImageItem list loaded so far
  total: 0,
  loading: false,
  index: null,         // open image index
  maps: {},            // name -> {values, shape, vmax, method}
  compareMaps: {},     // the compared model's maps of the open image
  infos: {},           // model id -> loaded ModelInfo (for the compare row)
  input: null,         // HTMLImageElement of the open image
  listToken: 0,
  sentinel: null,      // the grid's last child: scrolling it into view loads the next page
};

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("data-")) el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const c of children) if (c) el.append(c);
  return el;
}

function showError(msg) {
  const e = $("error");
  if (!msg) { e.hidden = true; e.textContent = ""; return; }
  e.hidden = false;
  e.textContent = msg;
}

async function api(path, options) {
  const r = await fetch(API + path, options);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : r.statusText;
    throw new Error(`${r.status}: ${detail}`);
  }
  return body;
}

// -- URL state (bookmarkable views) ----------------------------------------------------------

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  return Object.fromEntries(p.entries());
}

function writeHash() {
  const p = new URLSearchParams();
  if (state.model) p.set("model", state.model.id);
  for (const [key, id] of [["label", "f-label"], ["pred", "f-pred"], ["correct", "f-correct"], ["trust", "f-trust"], ["sort", "f-sort"], ["order", "f-order"]]) {
    const v = $(id).value;
    if (v && !(key === "sort" && v === "index") && !(key === "order" && v === "asc")) p.set(key, v);
  }
  if (state.index !== null) p.set("index", String(state.index));
  const extra = $("method").value;
  if (extra) p.set("method", extra);
  if ($("map-class").value !== "") p.set("class", $("map-class").value);
  if ($("compare").value) p.set("compare", $("compare").value);
  history.replaceState(null, "", "#" + p.toString());
  $("bookmark").href = location.href;
}

function filterQuery() {
  const q = new URLSearchParams();
  if ($("f-label").value !== "") q.set("label", $("f-label").value);
  if ($("f-pred").value !== "") q.set("predicted", $("f-pred").value);
  if ($("f-correct").value !== "") q.set("correct", $("f-correct").value);
  if ($("f-trust").value !== "" && !$("f-trust").disabled) q.set("disagrees", $("f-trust").value);
  q.set("sort", $("f-sort").value);
  q.set("order", $("f-order").value);
  return q;
}

// -- colour map: matplotlib's bwr, symmetric around 0 (same as teachx.service.render.bwr) ---------

function bwr(v, vmax) {
  let t = vmax > 0 ? v / vmax : 0;
  if (!Number.isFinite(t)) t = 0;
  t = Math.max(-1, Math.min(1, t));
  const r = t < 0 ? 1 + t : 1, g = 1 - Math.abs(t), b = t > 0 ? 1 - t : 1;
  return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
}

function mapCanvas(m) {
  // (C, H, W) values -> offscreen canvas with the colour-mapped channel sum
  const [c, hh, ww] = m.shape;
  const off = document.createElement("canvas");
  off.width = ww; off.height = hh;
  const ctx = off.getContext("2d");
  const img = ctx.createImageData(ww, hh);
  for (let i = 0; i < hh * ww; i++) {
    let s = 0;
    for (let k = 0; k < c; k++) s += m.values[k * hh * ww + i] || 0;
    const [r, g, b] = bwr(s, m.vmax);
    img.data[4 * i] = r; img.data[4 * i + 1] = g; img.data[4 * i + 2] = b; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return off;
}

function draw(canvas, input, m) {
  const w = input ? input.naturalWidth : m.shape[2], hh = input ? input.naturalHeight : m.shape[1];
  canvas.width = w; canvas.height = hh;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, hh);
  const opacity = parseFloat($("opacity").value);
  if (input) {
    ctx.filter = m ? "grayscale(1)" : "none";
    ctx.drawImage(input, 0, 0, w, hh);
    ctx.filter = "none";
  }
  if (m) {
    ctx.globalAlpha = input ? opacity : 1;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(mapCanvas(m), 0, 0, w, hh);
    ctx.globalAlpha = 1;
  }
  canvas.dataset.drawn = "1";
}

function colourBar(vmax) {
  const f = (x) => Math.abs(x) >= 100 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(1) : x.toFixed(2);
  return h("div", {}, h("div", { class: "cbar" }),
    h("div", { class: "cbar-labels" }, h("span", { text: f(-vmax) }), h("span", { text: "0" }), h("span", { text: f(vmax) })));
}

function figure(name, caption, m) {
  const canvas = h("canvas", { id: "map-" + name.replace(/[^a-z0-9_-]/gi, "_"), "data-map": name });
  const fig = h("figure", { "data-map": name }, canvas, h("figcaption", { text: caption }), m ? colourBar(m.vmax) : null);
  return { fig, canvas };
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("could not load " + src));
    im.src = src;
  });
}

// -- models -----------------------------------------------------------------------------------

async function loadRuns() {
  const res = await api("/runs");
  state.defaultModel = res.default_model;
  const sel = $("model");
  sel.textContent = "";
  state.models = [];
  for (const run of res.runs) {
    const group = h("optgroup", { label: `${run.id} (${run.kind})` });
    for (const m of run.models) {
      state.models.push(m);
      const acc = m.test_acc === null || m.test_acc === undefined ? "" : ` · acc ${(100 * m.test_acc).toFixed(1)}%`;
      group.append(h("option", { value: m.id, text: `${m.label}${acc}${m.error ? " · error" : ""}` }));
    }
    sel.append(group);
  }
  const cmp = $("compare");
  cmp.textContent = "";
  cmp.append(h("option", { value: "", text: "(none)" }));
  for (const m of state.models) if (!m.error) cmp.append(h("option", { value: m.id, text: `${m.run_id}: ${m.label}` }));
  const teachers = await api("/teachers");
  for (const id of ["method", "upload-method"]) {
    const s = $(id);
    s.textContent = "";
    s.append(h("option", { value: "", text: id === "method" ? "(none)" : "none" }));
    if (id === "upload-method") s.append(h("option", { value: "teacher", text: "the run's teacher method" }));
    for (const t of teachers.methods) s.append(h("option", { value: t.name, text: t.name, title: t.description }));
  }
}

async function selectModel(id, keep = {}) {
  showError("");
  state.index = null;
  $("detail").hidden = true;
  const info = await api("/models/" + encodeURIComponent(id));
  state.model = info;
  state.infos[id] = info;
  $("model").value = id;
  const kindText = { impactx: "IMPACTX (built-in maps)", abn: "ABN (built-in attention maps)" }[info.kind] || "classifier (no built-in map)";
  const parts = [kindText, info.dataset, "teacher: " + info.teacher_method];
  if (info.test_acc !== null) parts.push(`test acc ${(100 * info.test_acc).toFixed(2)}%`);
  $("model-info").textContent = parts.join(" · ");
  showShortcut(info);
  // the trust filter and sort need a built-in map: off (and said so) for a plain classifier
  const trustSel = $("f-trust");
  trustSel.disabled = !info.has_built_in;
  trustSel.title = info.has_built_in ? "" : "this model has no built-in map: there is nothing to compare with its gradient";
  if (!info.has_built_in) {
    trustSel.value = "";
    if ($("f-sort").value === "trust") $("f-sort").value = "index";
  }
  $("f-sort").querySelector('option[value="trust"]').disabled = !info.has_built_in;
  if (info.error) {
    showError(`model ${info.id}: ${info.error}`);
    $("grid").textContent = "";
    $("count").textContent = "";
    writeHash();
    return;
  }
  for (const sid of ["f-label", "f-pred"]) {
    const s = $(sid);
    const old = keep[sid] !== undefined ? keep[sid] : s.value;
    s.textContent = "";
    s.append(h("option", { value: "", text: "any" }));
    (info.class_names || []).forEach((n, i) => s.append(h("option", { value: String(i), text: `${i}: ${n}` })));
    s.value = old && Number(old) < (info.class_names || []).length ? old : "";
  }
  // the one class every map, difference, agreement and curve of an image explains (default: the predicted one)
  const pick = $("map-class");
  const oldClass = keep.cls !== undefined ? keep.cls : pick.value;
  pick.textContent = "";
  pick.append(h("option", { value: "", text: "the predicted class" }), h("option", { value: "label", text: "the true class" }));
  (info.class_names || []).forEach((n, i) => pick.append(h("option", { value: String(i), text: `${i}: ${n}` })));
  pick.value = oldClass === "label" || (oldClass && Number(oldClass) < (info.class_names || []).length) ? oldClass : "";
  await resetList();
}

// -- the grid ---------------------------------------------------------------------------------

async function resetList() {
  state.items = [];
  state.total = 0;
  state.listToken += 1;
  $("grid").textContent = "";
  $("grid").dataset.loaded = "0";
  $("grid").dataset.model = "";
  $("grid").append(state.sentinel);  // the infinite-scroll marker stays the grid's last child
  writeHash();
  await loadMore();
}

async function loadMore() {
  if (!state.model || state.model.error || state.loading) return;
  if (state.items.length && state.items.length >= state.total) return;
  state.loading = true;
  const token = state.listToken;
  try {
    const q = filterQuery();
    q.set("offset", String(state.items.length));
    q.set("limit", String(PAGE));
    const res = await api(`/models/${encodeURIComponent(state.model.id)}/images?${q}`);
    if (token !== state.listToken) return;
    state.total = res.total;
    const grid = $("grid");
    const sentinel = state.sentinel;
    for (const it of res.items) {
      state.items.push(it);
      const cls = "thumb" + (it.correct ? "" : " wrong") + (it.index === state.index ? " selected" : "") + (it.disagrees ? " disagrees" : "");
      const name = res.class_names[it.predicted];
      const trustTitle = it.trust === null || it.trust === undefined ? ""
        : `; built-in map vs the model's gradient × input: correlation ${it.trust.toFixed(2)}` + (it.disagrees ? " (disagrees)" : "");
      const b = h("button", { class: cls, type: "button", title: `#${it.index}: true ${res.class_names[it.label]}, predicted ${name} (${(100 * it.confidence).toFixed(0)}%)${trustTitle}`, "data-index": String(it.index), "data-disagrees": it.disagrees ? "1" : "0" },
        h("img", { src: `${API}/models/${encodeURIComponent(state.model.id)}/images/${it.index}/input.png`, loading: "lazy", alt: `test image ${it.index}` }),
        h("span", { text: String(it.index) }),
        it.disagrees ? h("span", { class: "flag", text: "⚠", title: "the built-in map disagrees with the model's gradient" }) : null);
      b.addEventListener("click", () => openImage(it.index));
      grid.insertBefore(b, sentinel);
    }
    $("count").textContent = `${res.total} of ${res.n_images} images`;
    const cov = res.coverage;
    $("coverage").textContent = cov.morf < res.n_images
      ? `metrics cached for ${cov.morf} of ${res.n_images} images (agreement/faithfulness filters use those; run teachx serve --precompute for all)`
      : "";
    const base = `${API}/models/${encodeURIComponent(state.model.id)}`;
    $("export-csv").href = `${base}/images.csv?${filterQuery()}`;
    const idx = state.items.slice(0, 200).map((i) => i.index).join(",");
    const maps = state.model.has_built_in ? "built_in,teacher" : "teacher";
    $("export-npz").href = idx ? `${base}/export.npz?indices=${idx}&maps=${maps}` : "#";
    const few = state.items.slice(0, 16).map((i) => i.index).join(",");
    $("export-png").href = few ? `${base}/export.png?indices=${few}&maps=${maps}` : "#";
    grid.dataset.loaded = String(state.items.length);
    grid.dataset.model = state.model.id;
  } catch (err) {
    showError(err.message);
  } finally {
    state.loading = false;
  }
}

// -- one image --------------------------------------------------------------------------------

async function openImage(index) {
  if (!state.model) return;
  showError("");
  const mid = encodeURIComponent(state.model.id);
  // a later click supersedes this one: only the newest request may draw (a slow answer never overwrites a newer one)
  const seq = (state.openSeq = (state.openSeq || 0) + 1);
  const stale = () => seq !== state.openSeq;
  $("maps").dataset.state = "";
  try {
    const d = await api(`/models/${mid}/images/${index}`);
    if (stale()) return;
    state.index = index;
    for (const el of document.querySelectorAll(".thumb.selected")) el.classList.remove("selected");
    const t = document.querySelector(`.thumb[data-index="${index}"]`);
    if (t) { t.classList.add("selected"); t.scrollIntoView({ block: "nearest" }); }
    $("detail").hidden = false;
    $("detail").dataset.index = String(index);
    $("detail-title").textContent = `#${index}: true ${d.label_name}, predicted ${d.predicted_name} (${(100 * d.probabilities[d.predicted].p).toFixed(1)}%)` + (d.correct ? "" : " ✗");
    renderProbs(d);
    $("provenance").textContent = JSON.stringify(d.provenance, null, 2);
    const input = await loadImage(`${API}/models/${mid}/images/${index}/input.png`);
    if (stale()) return;
    state.input = input;
    state.maps = {};
    const names = d.maps.slice();
    const extra = $("method").value;
    if (extra && !names.includes(extra)) names.push(extra);
    const box = $("maps");
    box.textContent = "";
    const inputFig = figure("input", "input", null);
    box.append(inputFig.fig);
    draw(inputFig.canvas, state.input, null);
    const cls = classQuery();
    const maps = {};
    await Promise.all(names.map(async (name) => {
      try {
        maps[name] = await api(`/models/${mid}/images/${index}/maps/${encodeURIComponent(name)}${cls}`);
      } catch (err) {
        maps[name] = { error: err.message };
      }
    }));
    if (stale()) return;
    state.maps = maps;
    const explained = Object.values(state.maps).find((m) => !m.error);
    showExplained(explained ? explained.provenance : d.provenance);
    for (const name of names) {
      const m = state.maps[name];
      if (m.error) { box.append(h("figure", { "data-map": name }, h("figcaption", { class: "error", text: `${name}: ${m.error}` }))); continue; }
      const f = figure(name, captionFor(name, m) + ` · ${m.provenance.source}`, m);
      box.append(f.fig);
      draw(f.canvas, state.input, m);
    }
    box.dataset.state = `${state.model.id}/${index}`;
    writeHash();
    await Promise.all([renderMetrics(index), renderCompare(index)]);
  } catch (err) {
    if (!stale()) showError(err.message);
  }
}

// "?class=..." for the explained class the picker names ("" for the predicted class, the default)
function classQuery() {
  const v = $("map-class").value;
  return v === "" ? "" : `?class=${encodeURIComponent(v)}`;
}

function explainedName(prov) {
  const how = { predicted: "the predicted class", label: "the true class" }[prov.explained_choice];
  return `${prov.explained_class_name}` + (how ? ` (${how})` : "");
}

// the page says which class everything in the detail view explains
function showExplained(prov) {
  const el = $("explained");
  if (!prov || prov.explained_class === null || prov.explained_class === undefined) {
    el.textContent = "";
    $("detail").dataset.explained = "";
    return;
  }
  el.textContent = `Every map, difference, agreement and curve below explains class ${explainedName(prov)}.`;
  $("detail").dataset.explained = String(prov.explained_class);
}

function captionFor(name, m) {
  const p = m.provenance, of = p.explained_class_name ? ` · class ${p.explained_class_name}` : "";
  const shared = p.method_options && typeof p.method_options.classes === "string" && p.method_options.classes.includes("shared");
  return (name === "built_in" ? "built-in map" + (shared ? " (one map shared by all classes)" : " of class " + p.explained_class_name)
    : name === "teacher" ? `teacher method on this model (${m.method})` + of
    : name === "difference" ? `difference: ${m.method}` + of : `${m.method} on this model` + of);
}

// another model on the same test image: its prediction and maps, drawn on the same colour scale rules
async function renderCompare(index) {
  const box = $("compare-box"), maps = $("compare-maps");
  const cid = $("compare").value;
  maps.textContent = "";
  box.dataset.state = "";
  state.compareMaps = {};
  if (!cid || !state.model || cid === state.model.id) { box.hidden = true; return; }
  box.hidden = false;
  const modelId = state.model.id;
  const ce = encodeURIComponent(cid);
  try {
    const info = state.infos[cid] || (state.infos[cid] = await api("/models/" + ce));
    if (info.error) throw new Error(`model ${cid}: ${info.error}`);
    if (info.test_data && state.model.test_data && info.test_data !== state.model.test_data)
      throw new Error(`${info.label} was tested on other data (${info.dataset}): image #${index} is not the same image there`);
    const d = await api(`/models/${ce}/images/${index}`);
    if (state.index !== index || state.model.id !== modelId) return;  // the user moved on
    $("compare-title").textContent = `${info.run_id}: ${info.label} · predicted ${d.predicted_name} (${(100 * d.probabilities[d.predicted].p).toFixed(1)}%)`
      + (d.correct ? "" : " ✗") + (info.test_acc !== null && info.test_acc !== undefined ? ` · test acc ${(100 * info.test_acc).toFixed(2)}%` : "");
    const names = d.maps.filter((n) => n !== "difference");
    const extra = $("method").value;
    if (extra && !names.includes(extra)) names.push(extra);
    // the main view's explained class, so that both rows explain the same class
    const k = $("detail").dataset.explained;
    const cls = k !== undefined && k !== "" ? `?class=${k}` : "";
    await Promise.all(names.map(async (name) => {
      try { state.compareMaps[name] = await api(`/models/${ce}/images/${index}/maps/${encodeURIComponent(name)}${cls}`); }
      catch (err) { state.compareMaps[name] = { error: err.message }; }
    }));
    if (state.index !== index || state.model.id !== modelId) return;
    for (const name of names) {
      const m = state.compareMaps[name];
      if (m.error) { maps.append(h("figure", { "data-map": name }, h("figcaption", { class: "error", text: `${name}: ${m.error}` }))); continue; }
      const canvas = h("canvas", { id: "cmp-" + name.replace(/[^a-z0-9_-]/gi, "_"), "data-map": name });
      maps.append(h("figure", { "data-map": name }, canvas, h("figcaption", { text: captionFor(name, m) + ` · ${m.provenance.source}` }), colourBar(m.vmax)));
      draw(canvas, state.input, m);
    }
    box.dataset.state = `${cid}/${index}`;
  } catch (err) {
    $("compare-title").textContent = "";
    maps.append(h("div", { class: "error", text: err.message }));
    box.dataset.state = "error";
  }
}

function redraw() {
  for (const c of document.querySelectorAll("#maps canvas[data-map]")) {
    const name = c.dataset.map;
    if (name === "input") draw(c, state.input, null);
    else if (state.maps[name] && !state.maps[name].error) draw(c, state.input, state.maps[name]);
  }
  for (const c of document.querySelectorAll("#compare-maps canvas[data-map]")) {
    const m = state.compareMaps[c.dataset.map];
    if (m && !m.error) draw(c, state.input, m);
  }
}

function renderProbs(d) {
  const box = $("probs");
  box.textContent = "";
  const top = d.probabilities.slice().sort((a, b) => b.p - a.p).slice(0, 10);
  for (const p of top) {
    const fill = h("div", { class: "fill" });
    fill.style.width = `${Math.max(1, Math.round(120 * p.p))}px`;
    const cls = "bar" + (p.class_index === d.predicted ? " pred" : "") + (p.class_index === d.label ? " true" : "");
    box.append(h("div", { class: cls }, h("span", { class: "name", text: p.name }), fill, h("span", { text: `${(100 * p.p).toFixed(1)}%` })));
  }
}

async function renderMetrics(index) {
  const modelId = state.model.id;
  const mid = encodeURIComponent(modelId);
  $("curve").textContent = "";
  $("agreement").textContent = "";
  $("trust").textContent = "";
  $("trust").className = "trust";
  $("detail").dataset.trust = "";
  $("curve-note").textContent = "computing…";
  $("detail").dataset.metrics = "";
  $("detail").dataset.metricsClass = "";
  const asked = classQuery();
  try {
    const m = await api(`/models/${mid}/images/${index}/metrics${asked}`);
    if (state.index !== index || !state.model || state.model.id !== modelId || classQuery() !== asked) return;  // the user moved on
    const pf = m.pixel_flipping;
    const of = explainedName(m.provenance);
    $("curve").append(curveSvg(pf.x, pf.curve));
    $("curve-note").textContent = `${m.map} map of class ${of}: AUC ${pf.auc === null ? "n/a" : pf.auc.toFixed(3)} (lower = more faithful); `
      + `probability of class ${m.provenance.explained_class_name} as the pixels its map ranks most relevant are replaced`;
    if (m.agreement) {
      const a = m.agreement;
      const f = (v) => (v === null ? "n/a" : v.toFixed(3));
      $("agreement").append(h("div", { text: `Spearman ${f(a.spearman)}` }), h("div", { text: `Pearson ${f(a.pearson)}` }),
        h("div", { text: `cosine ${f(a.cosine)}` }), h("div", { text: `top-10% overlap ${f(a.top_k_intersection)}` }),
        h("div", { class: "muted", text: `${m.agreement_between.join(" vs ")}, both of class ${of}` }));
    } else {
      $("agreement").append(h("div", { class: "muted", text: "a plain classifier has no built-in map" }));
    }
    showTrust(m.trust);
    $("detail").dataset.metricsClass = String(m.provenance.explained_class);
    $("detail").dataset.metrics = `${modelId}/${index}`;
  } catch (err) {
    $("curve-note").textContent = err.message;
  }
}

// the trust signal next to the maps: does the built-in map point where the model's own gradient does?
function trustText(t) {
  if (!t) return "This model has no built-in map, so there is nothing to compare with its gradient.";
  const v = t.value === null ? "n/a" : t.value.toFixed(3);
  const what = `built-in map of class ${t.explained_class_name} vs this model's own gradient × input (Pearson correlation, channels summed): ${v}`;
  return t.disagrees
    ? `⚠ The built-in map disagrees with the model's gradient: ${what}, below the threshold ${t.threshold}. Do not read this built-in map alone.`
    : `Trust: ${what}; at or above the threshold ${t.threshold}, the built-in map agrees with the model's gradient.`;
}

function showTrust(t) {
  const el = $("trust");
  el.textContent = trustText(t);
  el.className = "trust" + (!t ? " none" : t.disagrees ? " disagrees" : "");
  $("detail").dataset.trust = !t ? "none" : t.disagrees ? "disagrees" : "agrees";
}

// what the run stored about the model on a shortcut benchmark: does its built-in map show the artefact?
function showShortcut(info) {
  const el = $("model-shortcut");
  const sc = info.shortcut;
  if (!sc) { el.hidden = true; el.textContent = ""; return; }
  const f = (v, n = 3) => (v === null || v === undefined ? "n/a" : v.toFixed(n));
  const parts = [`shortcut benchmark, share on the artefact: gradient ${f(sc.gradient)}, LRP ${f(sc.lrp)}`];
  if (sc.built_in !== null && sc.built_in !== undefined) {
    parts.push(`built-in map ${f(sc.built_in)}`);
    parts.push(`honesty ${f(sc.honesty, 2)} (built-in ÷ gradient share: 1 = shows the artefact as the model's gradient does, well below 1 = hides it)`);
  } else {
    parts.push("no built-in map");
  }
  parts.push(`artefact area ${f(sc.area)}`);
  el.textContent = parts.join(" · ");
  el.hidden = false;
}

function curveSvg(xs, ys) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 320 160");
  svg.setAttribute("class", "curve");
  const X = (x) => 30 + 280 * x, Y = (y) => 140 - 125 * y;
  const line = (x1, y1, x2, y2) => {
    const l = document.createElementNS(NS, "line");
    for (const [k, v] of Object.entries({ x1, y1, x2, y2 })) l.setAttribute(k, v);
    l.setAttribute("class", "axis");
    svg.append(l);
  };
  const text = (x, y, s) => { const t = document.createElementNS(NS, "text"); t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = s; svg.append(t); };
  line(X(0), Y(0), X(1), Y(0)); line(X(0), Y(0), X(0), Y(1));
  text(X(0) - 3, Y(0) + 12, "0"); text(X(1) - 3, Y(0) + 12, "1"); text(X(0.3), Y(0) + 12, "fraction of pixels flipped"); text(2, Y(1) + 4, "p=1");
  const pts = xs.map((x, i) => (ys[i] === null ? null : `${X(x).toFixed(1)},${Y(ys[i]).toFixed(1)}`)).filter(Boolean).join(" ");
  const pl = document.createElementNS(NS, "polyline");
  pl.setAttribute("points", pts);
  svg.append(pl);
  svg.dataset.points = String(xs.length);
  return svg;
}

function step(delta) {
  if (state.index === null || !state.items.length) return;
  const pos = state.items.findIndex((it) => it.index === state.index);
  const next = pos + delta;
  if (next >= 0 && next < state.items.length) openImage(state.items[next].index);
  else if (next >= state.items.length && state.items.length < state.total) loadMore().then(() => { if (state.items[next]) openImage(state.items[next].index); });
}

// -- upload -----------------------------------------------------------------------------------

async function upload(ev) {
  ev.preventDefault();
  const out = $("upload-result");
  out.textContent = "";
  const file = $("upload-file").files[0];
  if (!file || !state.model) { out.append(h("div", { class: "error", text: "choose an image file first" })); return; }
  const fd = new FormData();
  fd.append("file", file);
  if ($("upload-method").value) fd.append("method", $("upload-method").value);
  out.dataset.state = "loading";
  try {
    const r = await api(`/models/${encodeURIComponent(state.model.id)}/predict`, { method: "POST", body: fd });
    const img = await loadImage(r.image_png);
    const top = r.probabilities.slice().sort((a, b) => b.p - a.p)[0];
    out.append(h("figure", {}, h("img", { src: r.image_png, alt: "uploaded image" }), h("figcaption", { id: "upload-prediction", text: `predicted ${r.predicted_name} (${(100 * top.p).toFixed(1)}%)` + (r.notice ? `; ${r.notice}` : "") })));
    for (const [name, m] of Object.entries(r.maps)) {
      const f = figure("upload-" + name, `${name === "built_in" ? "built-in map" : name} of class ${explainedName(m.provenance)}`, m);
      out.append(f.fig);
      draw(f.canvas, img, m);
    }
    if (!Object.keys(r.maps).length) out.append(h("div", { class: "muted", text: "a plain classifier has no built-in map; choose a teacher method" }));
    if (r.trust) out.append(h("p", { id: "upload-trust", class: "trust" + (r.trust.disagrees ? " disagrees" : ""), text: trustText(r.trust) }));
    out.append(h("details", { class: "provenance" }, h("summary", { text: "provenance" }), h("pre", { text: JSON.stringify(r.provenance, null, 2) })));
    out.dataset.state = "done";
  } catch (err) {
    out.append(h("div", { class: "error", id: "upload-error", text: err.message }));
    out.dataset.state = "error";
  }
}

// -- wiring -----------------------------------------------------------------------------------

async function main() {
  state.sentinel = $("more-sentinel");
  $("grid").append(state.sentinel);
  try {
    await loadRuns();
  } catch (err) {
    showError(err.message);
    return;
  }
  const hs = readHash();
  for (const [key, id] of [["correct", "f-correct"], ["trust", "f-trust"], ["sort", "f-sort"], ["order", "f-order"], ["method", "method"], ["compare", "compare"]]) if (hs[key]) $(id).value = hs[key];
  const first = state.models.find((m) => m.id === hs.model) || state.models.find((m) => m.id === state.defaultModel)
    || state.models.find((m) => !m.error) || state.models[0];
  if (!first) { showError("no models found in the directories served"); return; }
  await selectModel(first.id, { "f-label": hs.label || "", "f-pred": hs.pred || "", cls: hs.class || "" });
  if (hs.index !== undefined && hs.index !== "") await openImage(Number(hs.index));

  $("model").addEventListener("change", () => selectModel($("model").value).catch((e) => showError(e.message)));
  for (const id of ["f-label", "f-pred", "f-correct", "f-trust", "f-sort", "f-order"]) $(id).addEventListener("change", () => resetList());
  $("method").addEventListener("change", () => { if (state.index !== null) openImage(state.index); else writeHash(); });
  $("map-class").addEventListener("change", () => { if (state.index !== null) openImage(state.index); else writeHash(); });
  $("compare").addEventListener("change", () => { writeHash(); if (state.index !== null) renderCompare(state.index); });
  $("opacity").addEventListener("input", redraw);
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("close").addEventListener("click", () => { state.index = null; $("detail").hidden = true; writeHash(); });
  $("upload-form").addEventListener("submit", upload);
  document.addEventListener("keydown", (ev) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
    if (ev.key === "ArrowRight") { step(1); ev.preventDefault(); }
    else if (ev.key === "ArrowLeft") { step(-1); ev.preventDefault(); }
    else if (ev.key === "Escape") $("close").click();
  });
  const obs = new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) loadMore(); }, { root: $("grid") });
  obs.observe(state.sentinel);
  document.body.dataset.ready = "1";
}

main();
