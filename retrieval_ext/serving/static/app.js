// retrieval_ext browser UI: pick or upload an image, draw a box, rank the collection.
// Plain JavaScript, no build step. Boxes are kept in the image's own pixels (the frame the
// server's boxes are in) and converted to screen pixels only to draw them.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  source: "db", // browsing tab
  offset: 0,
  query: null, // {source, id, width, height, image_id}
  box: null, // [x1, y1, x2, y2] in image pixels
  drag: null,
};
const PAGE = 60;
const HANDLE = 6; // screen pixels within which a press grabs an edge
const QUERY_W = 416; // the query image is shown at most this wide and high
const QUERY_H = 400;

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(detail || `${r.status} ${r.statusText}`);
  }
  return body;
}

function imageUrl(source, id, size) {
  return `/api/image/${source}/${encodeURIComponent(id)}?size=${size || 0}`;
}

function showMessage(text) {
  $("message").textContent = text || "";
}

// ---- browsing -------------------------------------------------------------------------------
async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  $("dataset-info").textContent =
    `${info.dataset}: ${info.num_images} indexed images, ${info.num_queries} queries` +
    (info.has_ground_truth ? ", ground truth available" : "");
  $("top-n").value = info.top_n;
  $("qe-m").value = info.qe_m;
  $("top-k").max = info.max_top_k;
  $("upload-limit").textContent = `${(info.max_upload_bytes / 2 ** 20).toFixed(0)} MiB`;
  const cs = info.stages.includes("cs_sr");
  $("rerank-cs").disabled = !cs;
  $("rerank-cs").parentElement.title = cs ? "" : "needs a detector fine-tuned on the query objects";
  const select = $("class-id");
  info.class_names.forEach((name, i) => select.add(new Option(name, i)));
}

async function loadThumbs(reset) {
  if (reset) {
    state.offset = 0;
    $("thumbs").replaceChildren();
  }
  const q = encodeURIComponent($("filter").value);
  const page = await api(
    `/api/images?source=${state.source}&q=${q}&offset=${state.offset}&limit=${PAGE}`
  );
  for (const item of page.items) {
    const b = document.createElement("button");
    b.className = "thumb";
    b.dataset.source = item.source;
    b.dataset.id = item.id;
    b.dataset.imageId = item.image_id;
    b.title = item.object ? `${item.image_id} (${item.object})` : item.image_id;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = imageUrl(item.source, item.id, 128);
    img.alt = item.image_id;
    const name = document.createElement("div");
    name.textContent = item.image_id.split("/").pop();
    b.append(img, name);
    b.addEventListener("click", () => {
      document.querySelectorAll(".thumb.selected").forEach((t) => t.classList.remove("selected"));
      b.classList.add("selected");
      selectQuery({ ...item }, item.box || null);
    });
    $("thumbs").append(b);
  }
  state.offset += page.items.length;
  $("more").hidden = state.offset >= page.total;
}

function switchTab(source) {
  state.source = source;
  document.querySelectorAll(".tabs button").forEach((t) => {
    t.classList.toggle("active", t.dataset.source === source);
  });
  $("browse-pane").hidden = source === "upload";
  $("upload-pane").hidden = source !== "upload";
  if (source !== "upload") loadThumbs(true).catch((e) => showMessage(e.message));
}

async function uploadFile(file) {
  showMessage("");
  try {
    const item = await api("/api/upload", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream", "X-Filename": file.name },
      body: file,
    });
    selectQuery({ ...item, image_id: file.name }, null);
  } catch (e) {
    showMessage(e.message);
  }
}

// ---- query image and box --------------------------------------------------------------------
function selectQuery(item, box) {
  state.query = item;
  state.box = box ? box.slice() : null;
  $("query-title").textContent =
    item.source === "upload" ? `upload: ${item.image_id}` : `${item.source}: ${item.image_id}`;
  const img = $("query-image");
  img.onload = () => {
    // fit the box of QUERY_W x QUERY_H screen pixels, small images enlarged for drawing
    const f = Math.min(QUERY_W / item.width, QUERY_H / item.height);
    img.style.width = `${Math.round(item.width * f)}px`;
    img.style.height = `${Math.round(item.height * f)}px`;
    $("canvas-wrap").hidden = false;
    const c = $("query-canvas");
    c.width = img.clientWidth;
    c.height = img.clientHeight;
    c.dataset.imageWidth = state.query.width; // lets tests map image pixels to the screen
    c.dataset.ready = "1";
    redraw();
  };
  $("query-canvas").dataset.ready = "0";
  img.src = imageUrl(item.source, item.id, 1024);
  // a dataset query names its object: preselect it as the class for CS-SR
  const k = state.info.class_names.indexOf(item.object);
  if (k >= 0) $("class-id").value = k;
  updateFields();
}

function scale() {
  // screen pixels per image pixel
  return $("query-image").clientWidth / state.query.width;
}

function redraw() {
  const c = $("query-canvas");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!state.box) return;
  const s = scale();
  const [x1, y1, x2, y2] = state.box.map((v) => v * s);
  ctx.fillStyle = "rgba(0, 0, 0, 0.35)"; // dim what is outside the box
  ctx.fillRect(0, 0, c.width, y1);
  ctx.fillRect(0, y2, c.width, c.height - y2);
  ctx.fillRect(0, y1, x1, y2 - y1);
  ctx.fillRect(x2, y1, c.width - x2, y2 - y1);
  ctx.strokeStyle = "#ffd400";
  ctx.lineWidth = 2;
  ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
}

function updateFields() {
  const names = ["x1", "y1", "x2", "y2"];
  names.forEach((n, i) => {
    $(`box-${n}`).value = state.box ? Math.round(state.box[i]) : "";
  });
  $("search").disabled = !(state.query && state.box);
}

function clampBox(b) {
  const w = state.query.width;
  const h = state.query.height;
  let [x1, y1, x2, y2] = b;
  [x1, x2] = [Math.min(x1, x2), Math.max(x1, x2)];
  [y1, y2] = [Math.min(y1, y2), Math.max(y1, y2)];
  return [Math.max(0, x1), Math.max(0, y1), Math.min(w, x2), Math.min(h, y2)];
}

function pointer(ev) {
  const r = $("query-canvas").getBoundingClientRect();
  const s = scale();
  return { x: (ev.clientX - r.left) / s, y: (ev.clientY - r.top) / s };
}

function grab(p) {
  // which part of the box a press at p takes: edges/corners resize, inside moves
  if (!state.box) return null;
  const tol = HANDLE / scale();
  const [x1, y1, x2, y2] = state.box;
  const inY = p.y > y1 - tol && p.y < y2 + tol;
  const inX = p.x > x1 - tol && p.x < x2 + tol;
  const edges = {
    left: inY && Math.abs(p.x - x1) < tol,
    right: inY && Math.abs(p.x - x2) < tol,
    top: inX && Math.abs(p.y - y1) < tol,
    bottom: inX && Math.abs(p.y - y2) < tol,
  };
  if (edges.left || edges.right || edges.top || edges.bottom) return { mode: "resize", edges };
  if (p.x > x1 && p.x < x2 && p.y > y1 && p.y < y2) return { mode: "move" };
  return null;
}

function onDown(ev) {
  if (!state.query) return;
  ev.preventDefault();
  const p = pointer(ev);
  const g = grab(p);
  state.drag = g ? { ...g, start: p, box: state.box.slice() } : { mode: "draw", start: p };
  if (!g) state.box = [p.x, p.y, p.x, p.y]; // a new box replaces the old one
  $("query-canvas").setPointerCapture?.(ev.pointerId);
}

function onMove(ev) {
  const c = $("query-canvas");
  if (!state.drag) {
    const g = state.query && grab(pointer(ev));
    c.style.cursor = !g ? "crosshair" : g.mode === "move" ? "move" : "nwse-resize";
    return;
  }
  const p = pointer(ev);
  const d = state.drag;
  if (d.mode === "draw") {
    state.box = clampBox([d.start.x, d.start.y, p.x, p.y]);
  } else if (d.mode === "move") {
    const w = d.box[2] - d.box[0];
    const h = d.box[3] - d.box[1];
    const x1 = Math.min(Math.max(0, d.box[0] + p.x - d.start.x), state.query.width - w);
    const y1 = Math.min(Math.max(0, d.box[1] + p.y - d.start.y), state.query.height - h);
    state.box = [x1, y1, x1 + w, y1 + h];
  } else {
    const b = d.box.slice();
    if (d.edges.left) b[0] = p.x;
    if (d.edges.right) b[2] = p.x;
    if (d.edges.top) b[1] = p.y;
    if (d.edges.bottom) b[3] = p.y;
    state.box = clampBox(b);
  }
  redraw();
  updateFields();
}

function onUp() {
  if (!state.drag) return;
  state.drag = null;
  if (state.box && (state.box[2] - state.box[0] < 2 || state.box[3] - state.box[1] < 2)) {
    state.box = null; // a click, not a drag
  }
  redraw();
  updateFields();
}

function onField() {
  const v = ["x1", "y1", "x2", "y2"].map((n) => parseFloat($(`box-${n}`).value));
  if (state.query && v.every((x) => Number.isFinite(x))) {
    state.box = clampBox(v);
    redraw();
    $("search").disabled = false;
  }
}

// ---- search and results ---------------------------------------------------------------------
function chosenStage() {
  const rerank = document.querySelector("input[name=rerank]:checked").value;
  const qe = $("qe").checked;
  if (rerank === "none") return qe ? "filtering_qe" : "filtering";
  return qe ? `${rerank}_qe` : rerank;
}

const STAGE_NAMES = {
  extraction: "query extraction (network)",
  filtering: "filtering",
  filtering_qe: "filtering + QE",
  ca_sr: "CA-SR",
  ca_sr_qe: "CA-SR + QE",
  cs_sr: "CS-SR",
  cs_sr_qe: "CS-SR + QE",
};

async function search() {
  showMessage("");
  const stage = chosenStage();
  const body = {
    source: state.query.source,
    id: state.query.id,
    box: state.box,
    stage,
    top_n: parseInt($("top-n").value, 10),
    qe_m: parseInt($("qe-m").value, 10),
    top_k: parseInt($("top-k").value, 10),
  };
  if (stage.startsWith("cs_sr")) body.class_id = parseInt($("class-id").value, 10);
  $("search").disabled = true;
  $("summary").textContent = "searching...";
  try {
    const res = await api("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showResults(res);
  } catch (e) {
    $("summary").textContent = "";
    showMessage(e.message);
  } finally {
    $("search").disabled = false;
  }
}

function boxOverlay(box, width, height) {
  const d = document.createElement("div");
  d.className = "box";
  d.style.left = `${(100 * box[0]) / width}%`;
  d.style.top = `${(100 * box[1]) / height}%`;
  d.style.width = `${(100 * (box[2] - box[0])) / width}%`;
  d.style.height = `${(100 * (box[3] - box[1])) / height}%`;
  return d;
}

function showResults(res) {
  const gt = res.ground_truth;
  let summary = `${STAGE_NAMES[res.stage]} (N=${res.top_n}, M=${res.qe_m}): ` +
    `${res.results.length} results`;
  if (gt) {
    summary += ` | ground truth: "${gt.object}" (${gt.num_relevant} relevant images), ` +
      `AP ${(100 * res.ap[res.stage]).toFixed(1)}%`;
  } else if (state.info.has_ground_truth) {
    summary += " | the box marks no annotated object: no ground truth for this query";
  }
  $("summary").textContent = summary;
  const rows = Object.entries(res.latency_ms).map(([stage, ms]) => {
    const tr = document.createElement("tr");
    const ap = res.ap && stage in res.ap && res.ap[stage] !== null
      ? `${(100 * res.ap[stage]).toFixed(1)}` : "";
    [STAGE_NAMES[stage] || stage, ms.toFixed(1), ap].forEach((v) => {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    });
    return tr;
  });
  $("latency").querySelector("tbody").replaceChildren(...rows);
  $("latency").hidden = false;

  const cards = res.results.map((hit) => {
    const card = document.createElement("div");
    card.className = "hit";
    if (hit.relevant === 1) card.classList.add("relevant");
    if (hit.relevant === 0) card.classList.add("nonrelevant");
    if (hit.relevant === -1) card.classList.add("junk");
    card.dataset.imageId = hit.image_id;
    card.dataset.rank = hit.rank;
    const frame = document.createElement("div");
    frame.className = "framed";
    const img = document.createElement("img");
    img.src = imageUrl("db", hit.id, 256);
    img.alt = hit.image_id;
    frame.append(img);
    if (hit.box && hit.width) frame.append(boxOverlay(hit.box, hit.width, hit.height));
    const cap = document.createElement("div");
    cap.className = "caption";
    const mark = hit.relevant === 1 ? " ✓" : hit.relevant === 0 ? " ✗" : "";
    const name = hit.image_id.split("/").pop();
    const score = hit.score === null ? "-" : hit.score.toFixed(3); // null: not scored
    cap.textContent = `#${hit.rank} ${score}${mark} ${name}`;
    cap.title = hit.image_id;
    card.append(frame, cap);
    card.addEventListener("click", () => openViewer(hit));
    return card;
  });
  $("hits").replaceChildren(...cards);
}

function openViewer(hit) {
  const frame = $("viewer-frame");
  frame.querySelectorAll(".box").forEach((b) => b.remove());
  $("viewer-image").src = imageUrl("db", hit.id, 1024);
  $("viewer-image").alt = hit.image_id;
  if (hit.box && hit.width) frame.append(boxOverlay(hit.box, hit.width, hit.height));
  const where = hit.box ? ` located at [${hit.box.map((v) => Math.round(v)).join(", ")}]` : "";
  const score = hit.score === null ? "not scored" : `score ${hit.score.toFixed(4)}`;
  $("viewer-caption").textContent = `#${hit.rank} ${hit.image_id} ${score}${where}`;
  // the located object becomes the next query (the same stages, N and M)
  const again = $("viewer-search");
  again.hidden = !hit.box;
  again.onclick = () => {
    $("viewer").hidden = true;
    const item = { source: "db", id: hit.id, width: hit.width, height: hit.height };
    selectQuery({ ...item, image_id: hit.image_id }, hit.box);
    search();
  };
  $("viewer").hidden = false;
}

// ---- wiring ---------------------------------------------------------------------------------
function init() {
  document.querySelectorAll(".tabs button").forEach((t) => {
    t.addEventListener("click", () => switchTab(t.dataset.source));
  });
  let timer = null;
  $("filter").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => loadThumbs(true).catch((e) => showMessage(e.message)), 200);
  });
  $("more").addEventListener("click", () => loadThumbs(false).catch((e) => showMessage(e.message)));
  $("upload-file").addEventListener("change", (ev) => {
    if (ev.target.files.length) uploadFile(ev.target.files[0]);
  });
  const c = $("query-canvas");
  c.addEventListener("pointerdown", onDown);
  c.addEventListener("pointermove", onMove);
  c.addEventListener("pointerup", onUp);
  c.addEventListener("pointercancel", onUp);
  ["x1", "y1", "x2", "y2"].forEach((n) => $(`box-${n}`).addEventListener("change", onField));
  document.querySelectorAll("input[name=rerank]").forEach((r) => {
    r.addEventListener("change", () => {
      $("class-row").hidden = chosenStage().indexOf("cs_sr") !== 0;
    });
  });
  $("search").addEventListener("click", search);
  $("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });
  $("viewer").addEventListener("click", (ev) => {
    if (ev.target === $("viewer")) $("viewer").hidden = true;
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") $("viewer").hidden = true;
  });
  window.addEventListener("resize", () => {
    if (state.query && $("query-canvas").dataset.ready === "1") {
      $("query-canvas").width = $("query-image").clientWidth;
      $("query-canvas").height = $("query-image").clientHeight;
      redraw();
    }
  });
  loadInfo()
    .then(() => loadThumbs(true))
    .catch((e) => showMessage(e.message));
}

init();
