// teachx serve: the reveal view, the person-in-the-loop step of Reveal-to-Revise, over the JSON API
// /api/v1/runs/{run}/reveal (see /docs). Uses app.js's helpers: $, h, api, colourBar.
"use strict";

const RV_PAGE = 24;
// one colour per group (rank order does not matter: the legend names each)
const RV_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

const rv = {
  runs: [],          // RunInfo of the runs (not studies) served
  index: null,       // RevealIndex of the chosen run
  cls: null,         // RevealClass shown
  group: null,       // the group whose images are listed
  offset: 0,
  marked: new Set(), // training indices checked by hand
  token: 0,          // the latest class asked for: an older answer arriving later is dropped
};

const rvColour = (g) => (g < 0 ? "#bbbbbb" : RV_COLOURS[g % RV_COLOURS.length]);
const rvNum = (x) => (x === null || x === undefined ? "n/a" : Math.abs(x) >= 100 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(2) : x.toFixed(3));
const rvBase = () => `/runs/${encodeURIComponent($("rv-run").value)}/reveal`;

function rvStatus(text, ...extra) {
  const s = $("rv-status");
  s.textContent = text;
  for (const e of extra) s.append(" ", e);
}

async function rvOpen(show) {
  $("reveal-view").hidden = !show;
  document.querySelector("main").hidden = show;
  $("reveal-toggle").setAttribute("aria-pressed", String(show));
  $("reveal-toggle").textContent = show ? "Back to the test images" : "Reveal";
  if (!show) return;
  if (!rv.runs.length) {
    const res = await api("/runs");
    rv.runs = res.runs.filter((r) => r.kind === "run" && !r.error);
    const sel = $("rv-run");
    sel.textContent = "";
    for (const r of rv.runs) sel.append(h("option", { value: r.id, text: `${r.id} (${r.path})` }));
    const current = state.model ? rv.runs.find((r) => r.id === state.model.run_id) : null;
    if (current) sel.value = current.id;
  }
  if (!rv.runs.length) { rvStatus("No run directory is served: the reveal view works on `teachx run` and `teachx demo` directories."); return; }
  await rvLoadRun();
}

async function rvLoadRun() {
  rvStatus("loading the run's classes ...");
  rv.index = await api(rvBase());
  const msel = $("rv-method");
  // the method picked before, else the first with a class revealed, else the default of `teachx reveal` (listed first)
  const revealed = rv.index.methods.find((m) => rv.index.classes.some((c) => c.methods.includes(m)));
  const keep = msel.value || revealed || rv.index.methods[0];
  msel.textContent = "";
  for (const m of rv.index.methods) msel.append(h("option", { value: m, text: m }));
  msel.value = rv.index.methods.includes(keep) ? keep : rv.index.methods[0];
  rvFillClasses();
  rvConcepts();
  await rvLoadClass();
}

function rvFillClasses() {
  const method = $("rv-method").value;
  const sel = $("rv-class");
  const keep = sel.value;
  sel.textContent = "";
  for (const c of rv.index.classes) {
    const done = c.methods.includes(method) ? "revealed" : "not revealed yet";
    sel.append(h("option", { value: String(c.label), text: `${c.label}: ${c.name} (${c.n_images} images, ${done})` }));
  }
  const first = rv.index.classes.find((c) => c.methods.includes(method));
  sel.value = keep !== "" && rv.index.classes.some((c) => String(c.label) === keep) ? keep : String(first ? first.label : 0);
}

function rvConcepts() {
  const box = $("rv-concepts");
  box.textContent = "";
  if (!rv.index.concepts.length) { box.append(h("span", { class: "muted", text: "none yet" })); return; }
  for (const c of rv.index.concepts) {
    box.append(h("button", {
      type: "button", class: "rv-concept-button", "data-concept": c.name,
      text: `${c.name}: ${c.source} of class ${c.label}, ${c.n_members} images, layer ${c.layer}`,
      onclick: () => rvShowConcept(c.name).catch((e) => showError(e.message)),
    }));
  }
}

async function rvLoadClass() {
  const label = Number($("rv-class").value);
  const method = $("rv-method").value;
  const entry = rv.index.classes.find((c) => c.label === label);
  const token = ++rv.token;
  rv.cls = null; rv.group = null; rv.marked.clear();
  $("rv-class-view").hidden = true;
  $("rv-class-view").dataset.label = "";
  $("rv-group").hidden = true;
  rvMarkedNote();
  if (!entry) return;
  if (!entry.methods.includes(method)) {
    const cmd = `teachx reveal ${rv.index.run_dir} --class ${label} --method ${method}`;
    if (entry.n_images > rv.index.max_reveal_images) {
      rvStatus(`Class ${label} (${entry.name}) has no ${method} reveal yet, and its ${entry.n_images} training images are more than this server reveals (${rv.index.max_reveal_images}). Run:`, h("code", { text: cmd }));
    } else {
      const btn = h("button", { id: "rv-run-reveal", type: "button", text: `reveal class ${label} now` });
      btn.addEventListener("click", () => rvRunReveal(label, method, btn));
      rvStatus(`Class ${label} (${entry.name}) has no ${method} reveal yet (same as \`${cmd}\`).`, btn);
    }
    return;
  }
  rvStatus(`loading class ${label} ...`);
  const cls = await api(`${rvBase()}/${encodeURIComponent(method)}/classes/${label}`);
  if (token === rv.token) rvShowClass(cls);
}

async function rvRunReveal(label, method, btn) {
  btn.disabled = true;
  const token = rv.token;
  rvStatus(`revealing class ${label}: explaining its training images and grouping them (this can take a while) ...`);
  try {
    const cls = await api(`${rvBase()}/${encodeURIComponent(method)}/classes/${label}`, { method: "POST" });
    rv.index = await api(rvBase());
    rvFillClasses();
    if (token !== rv.token) return;
    $("rv-class").value = String(label);
    rvShowClass(cls);
  } catch (err) {
    rvStatus(err.message);
  }
}

function rvShowClass(cls) {
  rv.cls = cls;
  const s = cls.settings;
  rvStatus(`Class ${cls.label} (${cls.name}): ${cls.n_images} training images in ${cls.groups.length} groups` +
    (cls.n_groups_eigengap ? ` (the eigengap suggests ${cls.n_groups_eigengap})` : "") +
    `; ${cls.method} on ${s.teacher ? s.teacher + " maps" : (s.latent || "activations") + " of layer " + s.layer}.`);
  $("rv-class-view").hidden = false;
  $("rv-class-view").dataset.label = String(cls.label);
  $("rv-plot").textContent = "";
  $("rv-plot").append(rvScatter(cls));
  $("rv-plot-caption").textContent = `Each point is a training image of class ${cls.label}, placed by ${cls.embedding}; colour: its group. Click a point or a group to list its images.`;
  const legend = $("rv-legend");
  legend.textContent = "";
  for (const g of cls.groups) {
    const b = h("button", {
      type: "button", class: "rv-group-button", "data-group": String(g.group),
      text: `group ${g.group}: rank ${g.rank}, ${g.size} images, ${rvScoreName(cls)} ${rvNum(g.score)}`,
      title: `${rvScoreName(cls)} ${rvNum(g.score)}; ` + Object.entries(g.parts).map(([k, v]) => `${k.replaceAll("_", " ")} ${rvNum(v)}`).join(", "),
      onclick: () => rvShowGroup(g.group, 0).catch((e) => showError(e.message)),
    });
    b.prepend(h("span", { class: "rv-swatch" }));
    b.firstChild.style.background = rvColour(g.group);
    legend.append(b);
  }
  $("rv-groups-title").textContent = cls.score_name === "specificity" ? "groups, most specific first" : "groups, most suspicious first";
  $("rv-score-note").textContent = cls.score_meaning;
  rvMarkedNote();
}

function rvScatter(cls) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 420, H = 320, P = 12;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "rv-scatter");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `2-D embedding of the ${cls.points.length} training images of class ${cls.label}, coloured by group`);
  const xs = cls.points.map((p) => p.x), ys = cls.points.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const X = (x) => P + (W - 2 * P) * (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5);
  const Y = (y) => H - P - (H - 2 * P) * (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5);
  for (const p of cls.points) {
    const c = document.createElementNS(NS, "circle");
    c.setAttribute("cx", X(p.x).toFixed(1)); c.setAttribute("cy", Y(p.y).toFixed(1)); c.setAttribute("r", "4");
    c.setAttribute("fill", rvColour(p.group));
    c.setAttribute("data-group", String(p.group)); c.setAttribute("data-index", String(p.index));
    const t = document.createElementNS(NS, "title");
    t.textContent = `training image #${p.index}, group ${p.group}, ${rvPointScore(cls)} ${rvNum(p.score)}`;
    c.append(t);
    if (p.group >= 0) c.addEventListener("click", () => rvShowGroup(p.group, 0).catch((e) => showError(e.message)));
    svg.append(c);
  }
  svg.dataset.points = String(cls.points.length);
  return svg;
}

/** What a group's score is called: "specificity" (--rank specificity) or "score" (the method's suspicion score). */
function rvScoreName(cls) {
  return cls.score_name === "specificity" ? "specificity" : "score";
}

/** An image's score: its group's specificity, or its own suspicion score. */
function rvPointScore(cls) {
  return cls.score_name === "specificity" ? "group specificity" : "suspicion score";
}

async function rvShowGroup(group, offset) {
  const cls = rv.cls;
  const res = await api(`${rvBase()}/${encodeURIComponent(cls.method)}/classes/${cls.label}/groups/${group}/images?offset=${offset}&limit=${RV_PAGE}`);
  rv.group = group; rv.offset = offset;
  const g = cls.groups.find((x) => x.group === group);
  for (const b of document.querySelectorAll(".rv-group-button")) b.setAttribute("aria-pressed", String(b.dataset.group === String(group)));
  $("rv-group").hidden = false;
  $("rv-group-title").textContent = `Group ${group} of class ${cls.label}: rank ${g.rank} of ${cls.groups.length}, ${g.size} images, ${rvScoreName(cls)} ${rvNum(g.score)}`;
  const scoreNote = cls.score_name === "specificity"
    ? "Each image shows its group's specificity."
    : `Suspicion: the image's score from ${cls.method}.`;
  $("rv-group-note").textContent = `Each image with its ${res.map_name} (blue negative, white zero, red positive; scale [-vmax, vmax] per map). ${scoreNote} Check images to mark them one by one.`;
  const box = $("rv-images");
  box.textContent = "";
  for (const it of res.items) {
    const id = `rv-mark-${it.index}`;
    const cb = h("input", { type: "checkbox", id, checked: rv.marked.has(it.index), "data-index": String(it.index) });
    cb.addEventListener("change", () => { if (cb.checked) rv.marked.add(it.index); else rv.marked.delete(it.index); rvMarkedNote(); });
    box.append(h("figure", { class: "rv-item", "data-index": String(it.index) },
      h("div", { class: "rv-pair" },
        h("img", { src: it.image_png, alt: `training image #${it.index}` }),
        h("img", { src: it.map_png, alt: `${res.map_name} of training image #${it.index}`, class: "rv-map" })),
      colourBar(it.vmax),
      h("figcaption", {}, h("label", { htmlFor: id }, cb, ` mark #${it.index}`), h("span", { class: "muted", text: ` ${rvPointScore(cls)} ${rvNum(it.score)}` }))));
  }
  $("rv-page").textContent = `images ${offset + 1}-${offset + res.items.length} of ${res.size}`;
  $("rv-prev").disabled = offset === 0;
  $("rv-next").disabled = offset + res.items.length >= res.size;
  box.dataset.group = String(group);
  rvMarkedNote();
}

function rvMarkedNote() {
  const n = rv.marked.size;
  $("rv-marked").textContent = n ? `${n} image${n === 1 ? "" : "s"} checked: ${[...rv.marked].slice(0, 12).join(", ")}${n > 12 ? " ..." : ""}` : "";
  $("rv-mark-images").disabled = n < 2;
  $("rv-mark-images").textContent = `mark the ${n} checked images as an artefact`;
  $("rv-mark-group").disabled = rv.group === null;
  $("rv-mark-group").textContent = rv.group === null ? "mark a group as an artefact (choose one)" : `mark group ${rv.group} as an artefact`;
}

async function rvMark(byGroup) {
  const name = $("rv-name").value.trim();
  const out = $("rv-concept");
  if (!$("rv-name").reportValidity() || !name) return;
  const body = { class: rv.cls.label, method: rv.cls.method, name, replace: $("rv-replace").checked };
  if (byGroup) body.group = rv.group; else body.indices = [...rv.marked];
  out.hidden = false;
  out.textContent = "";
  out.dataset.state = "loading";
  out.append(h("p", { class: "muted", text: `fitting the concept '${name}', scoring every training image and localising it ...` }));
  try {
    const c = await api(`${rvBase()}/concepts`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    rv.index = await api(rvBase());
    rvConcepts();
    rvRenderConcept(c);
  } catch (err) {
    out.textContent = "";
    out.append(h("div", { class: "error", id: "rv-concept-error", text: err.message }));
    out.dataset.state = "error";
  }
}

async function rvShowConcept(name) {
  rvRenderConcept(await api(`${rvBase()}/concepts/${encodeURIComponent(name)}`));
}

function rvRenderConcept(c) {
  const out = $("rv-concept");
  out.hidden = false;
  out.textContent = "";
  out.append(
    h("h3", { text: `Concept '${c.name}': ${c.source} of class ${c.label} (${c.class_name}), ${c.n_members} images` }),
    h("p", { id: "rv-concept-summary", text: `${c.cav_kind} CAV at layer ${c.layer}. In-class AUROC ${rvNum(c.auroc_in_class)} (how well the CAV score separates the marked images from the rest of their class). ${c.n_retrieved} of the ${c.n_images} training images of all classes score at or above the threshold ${rvNum(c.threshold)} (midway between the marked images' mean and the rest's). Saved as ${c.path}.` }),
    h("p", { class: "muted", id: "rv-score-meaning", text: c.score_meaning }));
  const top = h("ol", { id: "rv-top", class: "rv-top" });
  for (const it of c.top) {
    top.append(h("li", { "data-index": String(it.index), class: it.member ? "member" : "" },
      h("img", { src: it.image_png, alt: `training image #${it.index}` }),
      h("span", { text: `#${it.index} ${it.class_name}: CAV score ${rvNum(it.score)}${it.member ? " (marked)" : ""}${it.above_threshold ? "" : " (below threshold)"}` })));
  }
  const loc = h("div", { id: "rv-localised", class: "rv-images" });
  for (const it of c.localised) {
    loc.append(h("figure", { class: "rv-item", "data-index": String(it.index) },
      h("div", { class: "rv-pair" },
        h("img", { src: it.image_png, alt: `training image #${it.index}` }),
        h("img", { src: it.heatmap_png, alt: `concept heatmap of image #${it.index}`, class: "rv-map" }),
        h("img", { src: it.mask_png, alt: `artefact mask of image #${it.index}`, class: "rv-map" })),
      colourBar(it.vmax),
      h("figcaption", { text: `#${it.index} ${it.class_name}: image, heatmap, mask (${(100 * it.mask_fraction).toFixed(0)}% of the pixels)` })));
  }
  out.append(h("h4", { text: "localisation: where the concept sits (the marked images first, then those scoring above the threshold)" }), h("p", { class: "muted", text: c.localisation }), loc,
    h("h4", { text: "retrieval: the highest CAV scores over the training images of all classes" }), top);
  if (c.notes && c.notes.length) out.append(h("details", {}, h("summary", { text: "what teachx reveal printed" }), h("pre", { text: c.notes.join("\n") })));
  out.dataset.state = "done";
  out.dataset.concept = c.name;
}

function rvWire() {
  const fail = (e) => rvStatus(e.message);
  $("reveal-toggle").addEventListener("click", () => rvOpen($("reveal-view").hidden).catch(fail));
  $("rv-run").addEventListener("change", () => rvLoadRun().catch(fail));
  $("rv-method").addEventListener("change", () => { rvFillClasses(); rvLoadClass().catch(fail); });
  $("rv-class").addEventListener("change", () => rvLoadClass().catch(fail));
  $("rv-prev").addEventListener("click", () => rvShowGroup(rv.group, Math.max(0, rv.offset - RV_PAGE)).catch(fail));
  $("rv-next").addEventListener("click", () => rvShowGroup(rv.group, rv.offset + RV_PAGE).catch(fail));
  $("rv-mark-group").addEventListener("click", () => rvMark(true));
  $("rv-mark-images").addEventListener("click", () => rvMark(false));
  $("rv-concept-form").addEventListener("submit", (ev) => { ev.preventDefault(); if (rv.group !== null) rvMark(true); });
}

rvWire();
