// The hiseg page: sends a photo to POST /v1/segment and draws the answer's label maps over it.
// Plain browser JavaScript, no build step; everything stays in this tab.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], blob: null, answer: null, photo: null, maps: [], level: 0 };

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function headers(extra = {}) {
  const key = $("key").value || localStorage.getItem("hiseg-key") || "";
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function errorText(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch {
    return response.statusText;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    status("This server needs an API key: enter it, then choose a photo.", true);
    return;
  }
  if (!response.ok) {
    status(`Could not list the models: ${await errorText(response)}`, true);
    return;
  }
  const body = await response.json();
  state.models = body.models;
  $("model").replaceChildren(
    ...body.models.map((m) => new Option(`${m.name} (${m.levels.length} levels)`, m.name)),
  );
  $("model").value = body.default;
  status("Ready: choose or drop a photo.");
}

function levelTitle(level) {
  const names = level.nodes.map((n) => n.name).filter((n) => n !== "background");
  return `Level ${level.index}: ${names.join(", ")}`;
}

// A grey PNG (one byte per pixel: the node index) -> its indices, untouched by colour management.
async function decodeMap(base64, width, height) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
  });
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, width, height).data;
  const indices = new Uint8Array(width * height);
  for (let i = 0; i < indices.length; i++) indices[i] = rgba[4 * i];
  return indices;
}

async function segment(blob) {
  state.blob = blob;
  const model = $("model").value;
  if ($("key").value) localStorage.setItem("hiseg-key", $("key").value);
  status("Segmenting…");
  document.body.dataset.ready = "false";
  const query = new URLSearchParams({ model, levels: "all" });
  const response = await fetch(`/v1/segment?${query}`, {
    method: "POST",
    headers: headers({ "Content-Type": blob.type || "application/octet-stream" }),
    body: blob,
  });
  if (response.status === 401) $("key-row").hidden = false;
  if (!response.ok) {
    status(`Refused (${response.status}): ${await errorText(response)}`, true);
    return;
  }
  const answer = await response.json();
  const { width, height } = answer;
  state.photo = await createImageBitmap(blob, { imageOrientation: "from-image" });
  state.maps = await Promise.all(answer.levels.map((l) => decodeMap(l.png, width, height)));
  state.answer = answer;
  state.level = answer.levels.length - 1;
  buildLevels();
  render();
  buildDownloads();
  const t = answer.timing_ms;
  status(
    `${answer.model}: ${width}×${height}, ${answer.people} person region(s), ` +
      `${Math.round(t.total)} ms (network and clean-up ${Math.round(t.inference)} ms).`,
  );
  document.body.dataset.ready = "true";
}

function buildLevels() {
  const fieldset = $("levels");
  fieldset.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "Level" }));
  state.answer.levels.forEach((level, i) => {
    const input = Object.assign(document.createElement("input"), {
      type: "radio",
      name: "level",
      value: String(i),
      checked: i === state.level,
    });
    input.dataset.level = String(level.index);
    input.addEventListener("change", () => {
      state.level = i;
      render();
    });
    const label = document.createElement("label");
    label.append(input, " ", levelTitle(level));
    fieldset.append(label);
  });
  fieldset.disabled = false;
}

function render() {
  const { width, height } = state.answer;
  const level = state.answer.levels[state.level];
  const canvas = $("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(state.photo, 0, 0, width, height);
  const picture = context.getImageData(0, 0, width, height);
  const pixels = picture.data;
  const indices = state.maps[state.level];
  const alpha = Number($("opacity").value) / 100;
  const colors = level.nodes.map((n) => (n.name === "background" ? null : n.color));
  for (let i = 0; i < indices.length; i++) {
    const color = colors[indices[i]];
    if (!color) continue;
    const p = 4 * i;
    pixels[p] = (1 - alpha) * pixels[p] + alpha * color[0];
    pixels[p + 1] = (1 - alpha) * pixels[p + 1] + alpha * color[1];
    pixels[p + 2] = (1 - alpha) * pixels[p + 2] + alpha * color[2];
  }
  context.putImageData(picture, 0, 0);
  canvas.dataset.level = String(level.index);
  $("legend").replaceChildren(
    ...level.nodes.map((node) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${node.color.join(",")})`;
      const share = (100 * level.share[node.name]).toFixed(1);
      item.append(swatch, `${node.name} ${share}%`);
      return item;
    }),
  );
}

// Colour mask of one level as a PNG blob (transparent background).
function colourMask(i) {
  const { width, height } = state.answer;
  const level = state.answer.levels[i];
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  const picture = context.createImageData(width, height);
  const indices = state.maps[i];
  for (let p = 0; p < indices.length; p++) {
    const node = level.nodes[indices[p]];
    if (node.name === "background") continue;
    picture.data.set([...node.color, 255], 4 * p);
  }
  context.putImageData(picture, 0, 0);
  return canvas.convertToBlob({ type: "image/png" });
}

function link(text, href, name) {
  return Object.assign(document.createElement("a"), { textContent: text, href, download: name });
}

function buildDownloads() {
  const links = [];
  state.answer.levels.forEach((level, i) => {
    const raw = `data:image/png;base64,${level.png}`;
    links.push(link(`Level ${level.index} label map (node indices)`, raw, `level${level.index}.png`));
    const mask = link(`Level ${level.index} colour mask`, "#", `level${level.index}_colour.png`);
    mask.addEventListener("click", async (event) => {
      if (mask.href.startsWith("blob:")) return;
      event.preventDefault();
      mask.href = URL.createObjectURL(await colourMask(i));
      mask.click();
    });
    links.push(mask);
  });
  $("downloads").replaceChildren(...links);
}

function takeFile(file) {
  if (file) segment(file).catch((err) => status(`Failed: ${err}`, true));
}

$("file").addEventListener("change", (event) => takeFile(event.target.files[0]));
$("opacity").addEventListener("input", () => state.answer && render());
$("model").addEventListener("change", () => takeFile(state.blob));
$("key").addEventListener("change", loadModels);
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  takeFile(event.dataTransfer.files[0]);
});

if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
  $("camera").hidden = false;
  $("camera").addEventListener("click", async () => {
    try {
      $("video").srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
      $("video").hidden = false;
      $("snap").hidden = false;
    } catch (err) {
      status(`No webcam: ${err.message}`, true);
    }
  });
  $("snap").addEventListener("click", () => {
    const video = $("video");
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => takeFile(blob), "image/jpeg", 0.92);
  });
}

loadModels();
