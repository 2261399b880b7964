// clipdex's page: plain JavaScript, no build step, nothing loaded from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { target: "images", query: null, controller: null, timer: null, objectUrl: null, rerankK: null, model: "" };
const DEBOUNCE_MS = 250;
const K = 48;

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + kind;
}

function setTarget(target) {
  state.target = target;
  for (const b of document.querySelectorAll(".target button")) {
    b.setAttribute("aria-checked", String(b.dataset.target === target));
  }
  if (state.query) run(state.query);
}

function remember(query) {
  const params = new URLSearchParams();
  if (query && query.kind === "text") params.set("q", query.text);
  if (query && query.kind === "similar") params.set("like", String(query.id));
  if (state.target !== "images") params.set("target", state.target);
  const search = params.toString();
  history.replaceState(null, "", search ? "?" + search : location.pathname);
}

async function call(url, options = {}) {
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  const response = await fetch(url, { ...options, signal: state.controller.signal, credentials: "same-origin" });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (response.status === 401) {
    askToken();
    throw new Error("this server needs a token");
  }
  if (!response.ok) throw new Error((body && body.error) || `the server answered ${response.status}`);
  return body;
}

// The refinements are the inputs marked data-refine; each is named as the search request's field it fills.
const REFINE = [...document.querySelectorAll("[data-refine]")];

// One search request as [name, value] pairs (the API's fields): sent as a query string, or as form fields
// beside an image file.
function searchFields(query) {
  const fields = [["k", String(K)], ["target", state.target]];
  if (query.kind === "text") fields.unshift(["q", query.text]);
  if (query.kind === "similar") fields.unshift(["like", String(query.id)]);
  for (const input of REFINE) {
    const value = input.value.trim();
    if (input.dataset.textOnly !== undefined && query.kind !== "text") continue;  // words match only a text query
    if (value) fields.push([input.name, value]);
  }
  if (reranking(query)) fields.push(["rerank", String(state.rerankK)]);
  else if ($("relevant").checked) fields.push(["relevant", "true"]);
  return fields;
}

// The index's re-ranking head scores image-text pairs: a text query over images, or an image over texts.
function reranking(query) {
  if (!state.rerankK || !$("rerank").checked || !query) return false;
  return (query.kind === "text" && state.target === "images") || (query.kind === "image" && state.target === "texts");
}

// The cosine (in a hybrid search, beside "words" when its words matched too), or a lexical match's BM25.
function scoreText(hit) {
  let text = (hit.semantic === undefined ? hit.score : hit.semantic).toFixed(3);
  if (hit.lexical !== undefined) text = hit.semantic === undefined ? `words ${hit.lexical.toFixed(2)}` : `${text} · words`;
  return hit.rerank === undefined ? text : `${text} · ${hit.rerank.toFixed(2)}`;
}

const SCORE_TITLE = "cosine similarity (· words: its words matched too; words N: the BM25 of a match by words; " +
  "· the re-ranking head's score, for re-ranked results)";

function run(query) {
  state.query = query;
  remember(query);
  showQueryChip(query);
  if (!query) {
    $("results").replaceChildren();
    $("empty").hidden = false;
    setStatus("");
    return;
  }
  $("empty").hidden = true;
  setStatus("Searching…", "busy");
  const started = performance.now();
  let request;
  const fields = searchFields(query);
  const refined = REFINE.some((input) => input.value.trim());
  if (query.kind === "image") {
    const form = new FormData();
    form.append("image", query.file, query.file.name || "image");
    for (const [name, value] of fields) form.append(name, value);
    request = call("/api/search", { method: "POST", body: form });
  } else if (query.kind === "text" || refined || reranking(query) || $("relevant").checked) {
    request = call("/api/search?" + new URLSearchParams(fields));
  } else {
    request = call(`/api/items/${query.id}/similar?k=${K}`);
  }
  request.then((body) => {
    if (state.query !== query) return;
    render(body.results, body.target);
    const ms = Math.round(performance.now() - started);
    setStatus(body.results.length
      ? `${body.results.length} ${body.target} · ${ms} ms`
      : `Nothing found in ${body.target}. Try other words, or switch to ${body.target === "images" ? "texts" : "images"}.`,
      body.results.length ? "" : "empty-result");
  }).catch((e) => {
    if (e.name === "AbortError") return;
    $("results").replaceChildren();
    setStatus(e.message, "error");
  });
}

function fileName(path) {
  return path ? path.split(/[\\/]/).pop() : "";
}

function render(results, target) {
  const grid = $("results");
  grid.className = target === "texts" ? "list" : "grid";
  const cards = results.map((hit) => (hit.kind === "image" ? imageCard(hit) : textCard(hit)));
  grid.replaceChildren(...(byMonth(results) ? withMonths(results, cards) : cards));
}

// All relevant results sorted by date are shown under a heading per month (a library's way of browsing a subject).
function byMonth(results) {
  return $("relevant").checked && results.some((hit) => hit.date !== undefined);
}

const MONTH = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "long", timeZone: "UTC" });

function withMonths(results, cards) {
  const out = [];
  let last = null;
  results.forEach((hit, i) => {
    const month = hit.date === undefined ? "Undated" : MONTH.format(new Date(hit.date * 1000));
    if (month !== last) {
      const heading = document.createElement("h2");
      heading.className = "month";
      heading.textContent = month;
      out.push(heading);
      last = month;
    }
    out.push(cards[i]);
  });
  return out;
}

function imageCard(hit) {
  const card = document.createElement("article");
  card.className = "card";
  card.tabIndex = 0;
  card.dataset.id = hit.id;
  const name = fileName(hit.path);
  card.setAttribute("aria-label", `${hit.rank}. ${hit.text || name}, score ${hit.score.toFixed(3)}`);
  const link = document.createElement("a");
  link.href = `/api/items/${hit.id}/image`;
  link.target = "_blank";
  link.rel = "noopener";
  link.className = "thumb";
  link.tabIndex = -1;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.decoding = "async";
  img.src = `/api/items/${hit.id}/thumbnail`;
  img.alt = hit.text || name;
  img.addEventListener("error", () => card.classList.add("broken"), { once: true });
  link.append(img);
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.innerHTML = `<span class="score"></span><span class="name"></span>`;
  meta.querySelector(".score").title = SCORE_TITLE;
  meta.querySelector(".score").textContent = scoreText(hit);
  meta.querySelector(".name").textContent = name;
  meta.querySelector(".name").title = hit.path || "";
  card.append(link, meta);
  if (hit.text) {
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = hit.text;
    card.append(caption);
  }
  if (hit.ocr) {
    const words = document.createElement("p");
    words.className = "words";
    words.title = "the words read in this picture";
    words.textContent = "“" + hit.ocr.split(/\s+/).join(" ") + "”";
    card.append(words);
  }
  card.append(actions(hit, link.href));
  return card;
}

function textCard(hit) {
  const card = document.createElement("article");
  card.className = "card text";
  card.tabIndex = 0;
  card.dataset.id = hit.id;
  card.setAttribute("aria-label", `${hit.rank}. ${hit.text}, score ${hit.score.toFixed(3)}`);
  const body = document.createElement("p");
  body.className = "body";
  body.textContent = hit.text || "";
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.innerHTML = `<span class="score"></span><span class="name"></span>`;
  meta.querySelector(".score").title = SCORE_TITLE;
  meta.querySelector(".score").textContent = scoreText(hit);
  meta.querySelector(".name").textContent = hit.path ? "image: " + fileName(hit.path) : "";
  meta.querySelector(".name").title = hit.path || "";
  card.append(body, meta, actions(hit, null));
  return card;
}

function actions(hit, openUrl) {
  const bar = document.createElement("div");
  bar.className = "actions";
  const similar = document.createElement("button");
  similar.type = "button";
  similar.className = "similar";
  similar.textContent = "Similar";
  similar.addEventListener("click", (e) => { e.stopPropagation(); searchSimilar(hit); });
  bar.append(similar);
  if (openUrl) {
    const open = document.createElement("a");
    open.href = openUrl;
    open.target = "_blank";
    open.rel = "noopener";
    open.className = "open";
    open.textContent = "Full image";
    bar.append(open);
  }
  return bar;
}

function searchSimilar(hit) {
  $("q").value = "";
  state.target = hit.kind === "image" ? "images" : "texts";
  for (const b of document.querySelectorAll(".target button")) {
    b.setAttribute("aria-checked", String(b.dataset.target === state.target));
  }
  run({ kind: "similar", id: hit.id, label: hit.kind === "image" ? fileName(hit.path) : hit.text, image: hit.kind === "image" });
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function showQueryChip(query) {
  const chip = $("query-chip");
  if (state.objectUrl && !(query && query.kind === "image")) {
    URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
  }
  if (!query || query.kind === "text") { chip.hidden = true; return; }
  chip.hidden = false;
  const img = $("query-image");
  if (query.kind === "image") {
    if (!state.objectUrl) state.objectUrl = URL.createObjectURL(query.file);
    img.src = state.objectUrl;
    img.hidden = false;
    $("query-label").textContent = "Searching by " + (query.file.name || "a pasted image");
  } else {
    img.hidden = !query.image;
    if (query.image) img.src = `/api/items/${query.id}/thumbnail`;
    $("query-label").textContent = "Similar to " + (query.label || `item ${query.id}`);
  }
}

function searchByFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not an image file.", "error");
    return;
  }
  $("q").value = "";
  if (state.objectUrl) { URL.revokeObjectURL(state.objectUrl); state.objectUrl = null; }
  run({ kind: "image", file });
}

function askToken() {
  const dialog = $("token-dialog");
  if (!dialog.open) dialog.showModal();
}

$("token-form").addEventListener("submit", () => {
  const token = $("token").value.trim();
  if (!token) return;
  document.cookie = `clipdex_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
  loadSummary();
  if (state.query) run(state.query);
});

$("q").addEventListener("input", () => {
  clearTimeout(state.timer);
  const text = $("q").value;
  state.timer = setTimeout(() => run(text.trim() ? { kind: "text", text } : null), DEBOUNCE_MS);
});

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  clearTimeout(state.timer);
  const text = $("q").value;
  run(text.trim() ? { kind: "text", text } : null);
});

for (const b of document.querySelectorAll(".target button")) {
  b.addEventListener("click", () => setTarget(b.dataset.target));
  b.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
      const next = state.target === "images" ? "texts" : "images";
      setTarget(next);
      $("target-" + next).focus();
      e.preventDefault();
    }
  });
}

for (const input of REFINE) {
  input.addEventListener("input", () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(() => { if (state.query) run(state.query); }, DEBOUNCE_MS);
  });
}

$("rerank").addEventListener("change", () => { if (state.query) run(state.query); });
$("relevant").addEventListener("change", () => { if (state.query) run(state.query); });

$("image-button").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => { searchByFile($("file").files[0]); $("file").value = ""; });
$("clear-query").addEventListener("click", () => { $("q").value = ""; run(null); $("q").focus(); });

let dragDepth = 0;
window.addEventListener("dragenter", (e) => {
  if (![...e.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  $("drop").hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) $("drop").hidden = true;
});
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  const file = [...(e.dataTransfer.files || [])][0];
  if (file) searchByFile(file);
});
window.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
  if (item) { e.preventDefault(); searchByFile(item.getAsFile()); }
});

document.addEventListener("keydown", (e) => {
  const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
  if (e.key === "/" && !typing) { e.preventDefault(); $("q").focus(); $("q").select(); return; }
  if (e.key === "Escape" && document.activeElement === $("q")) { $("q").value = ""; run(null); return; }
  const card = e.target.closest && e.target.closest(".card");
  if (!card || e.target !== card) return;
  const cards = [...document.querySelectorAll("#results .card")];
  const i = cards.indexOf(card);
  if (e.key === "Enter") { card.querySelector(".similar").click(); e.preventDefault(); }
  else if (e.key === "o") { const open = card.querySelector(".open"); if (open) open.click(); }
  else if (e.key === "ArrowRight" && cards[i + 1]) { cards[i + 1].focus(); e.preventDefault(); }
  else if (e.key === "ArrowLeft" && cards[i - 1]) { cards[i - 1].focus(); e.preventDefault(); }
});

async function loadSummary() {
  try {
    const response = await fetch("/api/info", { credentials: "same-origin" });
    if (response.status === 401) { askToken(); return; }
    const info = await response.json();
    const counts = info.counts || {};
    if (info.rerank) {
      state.rerankK = info.rerank.k;
      $("rerank-toggle").hidden = false;
    }
    state.model = info.model.name;
    showCounts(counts);
    if (info.watch) follow(info.watch);
  } catch (_) { /* the summary is a nicety; searches report their own errors */ }
}

function showCounts(counts) {
  $("index-summary").textContent =
    `${(counts.images || 0).toLocaleString()} images and ${(counts.texts || 0).toLocaleString()} texts · ${state.model}`;
}

// Under `clipdex serve --watch` the index changes while the page is open: say when indexing is under way, and
// when a run publishes new results, search again so they appear without a reload.
const FOLLOW_MS = 2000;

function showWatch(watch) {
  const el = $("watch-state");
  el.hidden = false;
  const offline = watch.offline && watch.offline.length ? ` · ${watch.offline.length} folder(s) offline` : "";
  el.textContent = (watch.indexing ? "indexing new photos…" : "watching for new photos") + offline;
  el.className = "watch-state" + (watch.indexing ? " busy" : "");
  el.title = watch.error || "";
}

function follow(watch) {
  showWatch(watch);
  let generation = null;
  const tick = async () => {
    try {
      const response = await fetch("/api/status", { credentials: "same-origin" });
      if (!response.ok) return;
      const status = await response.json();
      if (status.watch) showWatch(status.watch);
      if (generation !== null && status.generation !== generation) {
        showCounts(status.counts || {});
        if (state.query) run(state.query);
      }
      generation = status.generation;
    } catch (_) { /* the next tick tries again */ }
  };
  tick();
  setInterval(tick, FOLLOW_MS);
}

(function start() {
  const params = new URLSearchParams(location.search);
  if (params.get("target") === "texts") setTarget("texts");
  loadSummary();
  if (params.get("q")) {
    $("q").value = params.get("q");
    run({ kind: "text", text: params.get("q") });
  } else if (/^[0-9]+$/.test(params.get("like") || "")) {
    run({ kind: "similar", id: Number(params.get("like")), label: null, image: state.target === "images" });
  } else {
    run(null);
  }
})();
