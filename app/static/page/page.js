// The page at /: sends images to POST /explain and shows, per image, what the model saw,
// what it thinks, and where it looked. Plain script, no build step, same-origin requests only.
"use strict";

const TOP_K = 3;
const KEY_STORAGE = "fashion-serve.api-key"; // sessionStorage: this tab only
const SAMPLES = [
  ["t-shirt-top", "T-shirt/top"],
  ["trouser", "Trouser"],
  ["pullover", "Pullover"],
  ["dress", "Dress"],
  ["coat", "Coat"],
  ["sandal", "Sandal"],
  ["shirt", "Shirt"],
  ["sneaker", "Sneaker"],
  ["bag", "Bag"],
  ["ankle-boot", "Ankle boot"],
];
// Stops of a dark-to-bright heat scale (inferno-like), for the saliency map.
const HEAT = [
  [0.0, [0, 0, 4]],
  [0.25, [87, 16, 110]],
  [0.5, [188, 55, 84]],
  [0.75, [249, 142, 9]],
  [1.0, [252, 255, 164]],
];

const $ = (id) => document.getElementById(id);
const objectUrls = [];
let waitingForKey = null;
let candidate = null; // {model, version, role}: a canary or shadow of the default model, shown beside its answers // files whose request was refused for want of a key; sent again once one is entered

class KeyNeeded extends Error {}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function setStatus(text) {
  $("status").textContent = text;
}

// Every API call goes through here: the key (if any) as a Bearer token, and 401 turned into a prompt.
async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = $("api-key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...init, headers, cache: "no-store" });
  if (response.status === 401) {
    askForKey(Boolean(key));
    throw new KeyNeeded();
  }
  $("key-prompt").hidden = true;
  return response;
}

function askForKey(keyWasSent) {
  const prompt = $("key-prompt");
  prompt.textContent = keyWasSent
    ? "The service did not accept this API key. Check it, then press Enter in the API key field."
    : "This service needs an API key. Type it in the API key field above, then press Enter.";
  prompt.hidden = false;
  $("api-key").focus();
}

async function loadModel() {
  const info = $("model-info");
  try {
    const response = await api("model");
    if (!response.ok) {
      info.textContent =
        response.status === 503
          ? "The model is still loading; reload the page in a moment."
          : `The model's description is unavailable (HTTP ${response.status}).`;
      return;
    }
    const model = await response.json();
    const accuracy = model.metrics && model.metrics.test_accuracy;
    const parts = [
      `Model: ${model.name}`,
      `architecture: ${model.arch}`,
      `${model.num_parameters.toLocaleString("en")} parameters`,
      typeof accuracy === "number" ? `test accuracy ${(accuracy * 100).toFixed(1)} %` : "no test accuracy recorded",
    ];
    info.textContent = parts.join(" · ");
    $("model-architecture").textContent = model.architecture;
    $("model-details").hidden = false;
    listVersions(model.served || []);
    candidate = rolloutCandidate(model);
  } catch (error) {
    info.textContent =
      error instanceof KeyNeeded ? "The model's description needs an API key." : "Cannot reach the service.";
  }
}

// The model versions served, as choices: a request for one goes to /models/{name}/versions/{v}/explain.
function listVersions(served) {
  const select = $("model-choice");
  for (const row of served.filter((r) => r.state === "READY")) {
    const value = `models/${encodeURIComponent(row.name)}/versions/${encodeURIComponent(row.version)}/`;
    if (![...select.options].some((o) => o.value === value)) {
      select.append(element("option", { value }, `${row.name}, version ${row.version}`));
    }
  }
}

// The default model's canary or shadow, if it has one (/model says), shown beside its answers.
function rolloutCandidate(model) {
  const rollout = model.rollout;
  if (!rollout) return null;
  if (rollout.shadow) return { model: model.name, version: rollout.shadow, role: "shadow" };
  if (rollout.canary) return { model: model.name, version: rollout.canary, role: "canary" };
  return null;
}

function plainError(status) {
  switch (status) {
    case 400:
      return "This file could not be read as an image: it may be empty, cut short or damaged.";
    case 413:
      return "Too large: the image (or the whole upload) is over the service's limit.";
    case 415:
      return "This is not an image type the service reads. Use PNG, JPEG, GIF, WEBP, BMP or TIFF.";
    case 503:
      return "The service is busy or still starting. Try again in a moment.";
    default:
      return `The service could not classify this (HTTP ${status}).`;
  }
}

function detailText(body) {
  if (!body || body.detail === undefined) return "";
  return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
}

function heat(value) {
  for (let i = 1; i < HEAT.length; i += 1) {
    const [stop, color] = HEAT[i];
    if (value <= stop) {
      const [previousStop, previous] = HEAT[i - 1];
      const t = (value - previousStop) / (stop - previousStop);
      return previous.map((c, j) => c + (color[j] - c) * t);
    }
  }
  return HEAT[HEAT.length - 1][1];
}

function pixelCanvas(rows, label, paint) {
  const height = rows.length;
  const width = rows[0].length;
  const canvas = element("canvas", { class: "pixels", width, height, role: "img", "aria-label": label });
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  rows.forEach((row, y) =>
    row.forEach((value, x) => {
      const [r, g, b] = paint(value, x, y);
      image.data.set([r, g, b, 255], (y * width + x) * 4);
    }),
  );
  context.putImageData(image, 0, 0);
  return canvas;
}

function figure(content, caption) {
  const node = element("figure");
  node.append(content, element("figcaption", {}, caption));
  return node;
}

function thumbnail(file) {
  const url = URL.createObjectURL(file);
  objectUrls.push(url);
  const image = element("img", { class: "thumb", src: url, alt: `Your upload, ${file.name}` });
  image.addEventListener("error", () => {
    image.replaceWith(element("p", { class: "thumb no-preview" }, "No preview in this browser"));
  });
  return image;
}

function invertCaption(inverted, choice) {
  const way = inverted ? "inverted" : "not inverted";
  if (choice === "auto") return `What the model saw (auto: ${way})`;
  return `What the model saw (${way}, as you chose)`;
}

function resultCard(file, explanation, choice, answeredBy = "") {
  const card = element("article", { class: "card" });
  card.append(element("h3", {}, file.name));
  if (answeredBy) card.append(element("p", { class: "answered-by" }, answeredBy));
  if (explanation.error) {
    card.classList.add("failed");
    if (file.type.startsWith("image/")) card.append(thumbnail(file));
    card.append(element("p", {}, plainError(explanation.error.status)));
    card.append(element("p", { class: "error-detail" }, `The service said: ${explanation.error.message}`));
    return card;
  }
  const top = explanation.top_k[0];
  const input = explanation.input;
  const pictures = element("div", { class: "pictures" });
  pictures.append(
    figure(thumbnail(file), "Your upload"),
    figure(
      pixelCanvas(input, "The 28 by 28 grayscale input the model received", (v) => [v, v, v]),
      invertCaption(explanation.inverted, choice),
    ),
    figure(
      pixelCanvas(explanation.saliency, `Heat map of the pixels that moved the answer ${top.label} most`, (s, x, y) => {
        const base = input[y][x] * 0.35;
        const alpha = Math.sqrt(s);
        return heat(s).map((c) => base + (c - base) * alpha);
      }),
      `Where it looked for “${top.label}”`,
    ),
  );
  card.append(pictures);

  const list = element("ol", { class: "top-k", "aria-label": "Most likely classes" });
  for (const entry of explanation.top_k) {
    const percent = `${(entry.probability * 100).toFixed(1)} %`;
    const item = element("li");
    const track = element("span", { class: "track", "aria-hidden": "true" });
    const fill = element("span", { class: "fill" });
    fill.style.width = `${entry.probability * 100}%`;
    track.append(fill);
    item.append(element("span", { class: "label" }, entry.label), track, element("span", { class: "pct" }, percent));
    list.append(item);
  }
  card.append(list);
  if (explanation.out_of_distribution) {
    card.append(
      element(
        "p",
        { class: "verdict" },
        "This does not look like clothing the model knows, so take these classes with caution.",
      ),
    );
  }
  return card;
}

function failedCard(file, status, body) {
  return resultCard(file, { error: { status, message: detailText(body) || `HTTP ${status}` } }, "auto");
}

function show(cards) {
  const fragment = document.createDocumentFragment();
  fragment.append(...cards);
  $("results").prepend(fragment);
  $("clear").hidden = false;
}

async function classify(files) {
  if (files.length === 0) return;
  const choice = $("invert").value;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  const count = files.length === 1 ? "1 image" : `${files.length} images`;
  setStatus(`Looking at ${count}…`);
  let response;
  let beside = null;
  try {
    const model = $("model-choice").value;
    response = await api(`${model}explain?k=${TOP_K}&invert=${choice}`, { method: "POST", body: form });
    if (response.ok && !model && candidate) beside = await candidateAnswers(files, choice);
  } catch (error) {
    if (error instanceof KeyNeeded) {
      waitingForKey = files;
      setStatus(`Waiting for an API key to send ${count}.`);
    } else {
      setStatus("Cannot reach the service. Is it running?");
    }
    return;
  }
  waitingForKey = null;
  const body = await response.json().catch(() => null);
  if (response.ok) {
    const answeredBy = `Answered by ${body.model}, version ${body.model_version}`;
    const cards = body.explanations.map((explanation, i) => resultCard(files[i], explanation, choice, answeredBy));
    show(beside ? cards.map((card, i) => sideBySide(card, beside[i])) : cards);
    const failed = body.explanations.filter((e) => e.error).length;
    setStatus(`Done: ${count}${failed ? `, ${failed} could not be classified` : ""}.`);
  } else if (files.length === 1 && [400, 413, 415].includes(response.status)) {
    show([failedCard(files[0], response.status, body)]);
    setStatus("Done: the image could not be classified.");
  } else {
    const detail = detailText(body);
    setStatus(`${plainError(response.status)}${detail ? ` The service said: ${detail}` : ""}`);
  }
}

// The same images answered by the rollout's candidate version, for a side-by-side comparison.
async function candidateAnswers(files, choice) {
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  const path = `models/${encodeURIComponent(candidate.model)}/versions/${encodeURIComponent(candidate.version)}/`;
  const response = await api(`${path}explain?k=${TOP_K}&invert=${choice}`, { method: "POST", body: form });
  if (!response.ok) return null;
  const body = await response.json();
  const label = `The ${candidate.role}: ${body.model}, version ${body.model_version}`;
  return body.explanations.map((explanation, i) => resultCard(files[i], explanation, choice, label));
}

function sideBySide(primary, other) {
  const pair = element("div", { class: "pair" });
  pair.append(primary, other);
  return pair;
}

async function sampleFile(slug) {
  const response = await fetch(`static/page/samples/${slug}.png`);
  return new File([await response.blob()], `${slug}.png`, { type: "image/png" });
}

function setUpSamples() {
  const list = $("samples");
  for (const [slug, label] of SAMPLES) {
    const button = element("button", { type: "button", "aria-label": `Try a sample: ${label}`, title: label });
    button.append(element("img", { src: `static/page/samples/${slug}.png`, alt: "" }));
    button.addEventListener("click", async () => classify([await sampleFile(slug)]));
    const item = element("li");
    item.append(button);
    list.append(item);
  }
  $("all-samples").addEventListener("click", async () => {
    classify(await Promise.all(SAMPLES.map(([slug]) => sampleFile(slug))));
  });
}

function setUpInputs() {
  const picker = $("file-input");
  picker.addEventListener("change", () => {
    classify([...picker.files]);
    picker.value = "";
  });

  const zone = $("drop-zone");
  let depth = 0; // dragenter/dragleave fire for every child crossed
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault(); // never let the browser navigate to a dropped file
    depth = 0;
    zone.classList.remove("dragging");
    classify([...event.dataTransfer.files]);
  });

  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])];
    if (files.length === 0) return; // plain text: leave it to the field being pasted into
    event.preventDefault();
    classify(files);
  });

  $("clear").addEventListener("click", () => {
    $("results").replaceChildren();
    objectUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
    $("clear").hidden = true;
    setStatus("Results cleared.");
    $("results-heading").focus();
  });
}

function setUpKey() {
  const field = $("api-key");
  field.value = sessionStorage.getItem(KEY_STORAGE) || "";
  field.addEventListener("input", () => {
    const key = field.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  field.addEventListener("change", () => {
    // Enter or leaving the field: try the key on the description and on what waited for it.
    loadModel();
    if (waitingForKey) classify(waitingForKey);
  });
}

setUpKey();
setUpSamples();
setUpInputs();
loadModel();
