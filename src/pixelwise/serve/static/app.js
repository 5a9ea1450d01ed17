// pixelwise web page: upload an image, show image | colour mask | overlay, legend, hover, download.
// Plain browser JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
let models = {};   // name -> GET /v1/models entry
let current = null; // {labels, width, height, classes}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  const response = await fetch("/v1/models");
  const body = await response.json();
  for (const model of body.models) {
    models[model.name] = model;
    $("model").add(new Option(`${model.name} (${model.architecture}, ${model.classes.length} classes)`, model.name));
  }
}

function decodeRunLength(rle) {
  const [height, width] = rle.shape;
  const labels = new Uint16Array(height * width);
  let at = 0;
  rle.values.forEach((value, i) => { labels.fill(value, at, at + rle.counts[i]); at += rle.counts[i]; });
  return labels;
}

function drawMask(canvas, labels, width, height, classes) {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < labels.length; i++) {
    const colour = classes[labels[i]] ? classes[labels[i]].colour : [0, 0, 0];
    pixels.data.set([colour[0], colour[1], colour[2], 255], 4 * i);
  }
  context.putImageData(pixels, 0, 0);
}

function showLegend(classes) {
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  for (const c of classes) {
    const row = body.insertRow();
    row.dataset.classId = c.id;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${c.colour.join(",")})`;
    row.insertCell().append(swatch);
    row.insertCell().textContent = c.name;
    row.insertCell().textContent = `${(100 * c.fraction).toFixed(1)} %`;
  }
}

function showDownload(base64, filename) {
  const bytes = Uint8Array.from(atob(base64), (ch) => ch.charCodeAt(0));
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  link.download = `${filename.replace(/\.[^.]*$/, "") || "upload"}_labels.png`;
}

async function predict(file) {
  const name = $("model").value;
  const form = new FormData();
  form.append("image", file);
  form.append("format", "json");
  form.append("include_png", "true");
  if ($("tile").value) form.append("tile", $("tile").value);
  form.append("flip", $("flip").checked ? "true" : "false");
  document.body.dataset.state = "busy";
  setStatus(`segmenting ${file.name} with ${name} …`);
  const started = performance.now();
  const response = await fetch(`/v1/models/${encodeURIComponent(name)}/predict`, { method: "POST", body: form });
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    document.body.dataset.state = "error";
    setStatus(`error ${response.status}: ${body.detail}`, true);
    return;
  }
  const labels = decodeRunLength(body.labels);
  current = { labels, width: body.width, height: body.height, classes: body.classes };
  const url = URL.createObjectURL(file);
  $("overlay").style.position = "";
  $("image").alt = "input image";
  $("image").onerror = () => { $("image").alt = "this browser cannot show this image (e.g. TIFF)"; };
  $("under").onerror = () => { $("overlay").style.position = "static"; };  // the mask alone
  $("image").src = url;
  $("under").src = url;
  drawMask($("mask"), labels, body.width, body.height, body.classes);
  drawMask($("overlay"), labels, body.width, body.height, body.classes);
  showLegend(body.classes);
  showDownload(body.label_png, file.name);
  $("result").hidden = false;
  document.body.dataset.state = "done";
  setStatus(`${file.name}: ${body.width} × ${body.height} px in ${((performance.now() - started) / 1000).toFixed(2)} s`);
}

function readClass(event) {
  if (!current) return;
  const canvas = event.target;
  const x = Math.min(current.width - 1, Math.floor(event.offsetX * current.width / canvas.clientWidth));
  const y = Math.min(current.height - 1, Math.floor(event.offsetY * current.height / canvas.clientHeight));
  const id = current.labels[y * current.width + x];
  const c = current.classes[id];
  $("hover").textContent = `(${x}, ${y}): ${c ? c.name : `label ${id}`}`;
}

function start() {
  $("file").addEventListener("change", () => { if ($("file").files[0]) predict($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]);
  });
  $("opacity").addEventListener("input", () => { $("overlay").style.opacity = $("opacity").value; });
  for (const id of ["mask", "overlay"]) $(id).addEventListener("mousemove", readClass);
  loadModels()
    .then(() => { document.body.dataset.state = "ready"; })
    .catch((err) => setStatus(`cannot list models: ${err}`, true));
}

start();
