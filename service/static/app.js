// The try-it page. It uses only the public API (GET /v1/models, POST /v1/restore/{task}), so what
// works here works for any client, and what fails here is shown exactly as the API reports it.

import { EventStreamParser } from "./event-stream.js";

const $ = (id) => document.getElementById(id);
const form = $("restore-form");
const fileInput = $("file-input");
const dropZone = $("drop-zone");
const fileName = $("file-name");
const taskSelect = $("task-select");
const restoreButton = $("restore-button");
const statusBox = $("status");
const statusText = $("status-text");
const progress = $("progress");
const cancelButton = $("cancel-button");
const errorBox = $("error");
const resultBox = $("result");
const compare = $("compare");
const slider = $("compare-slider");
const originalImage = $("original-image");
const resultImage = $("result-image");
const download = $("download");

const STEP_LABELS = {
  decode: "Decode and cut into tiles",
  queue: "Wait in the batching queue",
  inference: "Network (batched)",
  encode: "Stitch and encode PNG",
  total: "Total on the server",
};
const MODELS_RETRY_MS = 2000;
// Below this width the slider is too fine to use, so small images are shown enlarged.
const MIN_DISPLAY_WIDTH = 512;

let chosenFile = null;
let running = null; // the XMLHttpRequest in flight, so a new choice can cancel it
let objectUrls = [];
let restores = 0; // counts restores, so the display of an older result never lands over a newer restore

// -- tasks --------------------------------------------------------------------------------------

async function loadTasks() {
  let body;
  try {
    const response = await fetch("/v1/models", { headers: { Accept: "application/json" } });
    body = await response.json();
    if (response.status === 401) {
      // README: the page sends no key; a proxy in front that adds one makes it usable.
      showStatus("This service asks for an API key, which this page cannot send: open it through a proxy " +
                 "that adds the key.");
      return;
    }
    if (!response.ok) {
      showStatus(`The service answered HTTP ${response.status} for its tasks; trying again\u2026`);
      setTimeout(loadTasks, MODELS_RETRY_MS);
      return;
    }
  } catch (error) {
    showStatus("Cannot reach the service; trying again\u2026");
    setTimeout(loadTasks, MODELS_RETRY_MS);
    return;
  }
  const tasks = Object.keys(body.models || {});
  if (!body.ready || tasks.length === 0) {
    // The service answers before its models are warm; /v1/models lists them once loaded.
    showStatus("The service is loading its models\u2026");
    setTimeout(loadTasks, MODELS_RETRY_MS);
    return;
  }
  hideStatus();
  taskSelect.replaceChildren(...tasks.map((task) => {
    const option = document.createElement("option");
    option.value = task;
    option.textContent = task.charAt(0).toUpperCase() + task.slice(1);
    return option;
  }));
  const wanted = new URLSearchParams(location.search).get("task");
  if (wanted && tasks.includes(wanted)) taskSelect.value = wanted;
  taskSelect.disabled = false;
  updateButton();
  if (chosenFile) restore();
}

// -- choosing a file ----------------------------------------------------------------------------

function choose(file) {
  if (!file) return;
  chosenFile = file;
  fileName.textContent = `${file.name} (${formatBytes(file.size)})`;
  updateButton();
  if (!taskSelect.disabled) restore();
}

function updateButton() {
  restoreButton.disabled = !chosenFile || taskSelect.disabled || running !== null;
}

fileInput.addEventListener("change", () => {
  choose(fileInput.files[0]);
  // Emptied, so that choosing the same file again (after it changed on disk) is a change too.
  fileInput.value = "";
});

// The whole window takes drops, so a near miss does not make the browser open the file instead.
let dragDepth = 0;
window.addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth += 1;
  dropZone.classList.add("dragging");
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) dropZone.classList.remove("dragging");
});
window.addEventListener("dragover", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
});
window.addEventListener("drop", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  dropZone.classList.remove("dragging");
  choose(event.dataTransfer.files[0]);
});

function hasFiles(event) {
  return Array.from(event.dataTransfer?.types || []).includes("Files");
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (chosenFile && !taskSelect.disabled) restore();
});

// -- restoring ----------------------------------------------------------------------------------

function restore() {
  if (running) running.abort();
  const file = chosenFile;
  const task = taskSelect.value;
  const body = new FormData();
  body.append("image", file, file.name);

  // XMLHttpRequest rather than fetch: fetch reports no upload progress. Asked for an event
  // stream, the service answers at once and its responseText grows event by event.
  const request = new XMLHttpRequest();
  running = request;
  const restoreNumber = ++restores;
  request.open("POST", `/v1/restore/${encodeURIComponent(task)}`);
  request.setRequestHeader("Accept", "text/event-stream");
  request.responseType = "text";
  const started = performance.now();
  let ticker = null;
  let settled = false; // a result or an error is shown: what the connection does next is moot
  let parsedUpTo = 0; // characters of responseText already given to the parser

  hideError();
  resultBox.setAttribute("aria-busy", "true");
  cancelButton.hidden = false;
  updateButton();
  progress.max = 100;
  progress.value = 0;
  progress.hidden = false;
  showStatus(`Uploading ${file.name}\u2026`);

  request.upload.addEventListener("progress", (event) => {
    if (!event.lengthComputable) return;
    const percent = Math.round((100 * event.loaded) / event.total);
    progress.value = percent;
    statusText.textContent = `Uploading ${file.name}\u2026 ${percent}%`;
  });
  request.upload.addEventListener("load", () => {
    // Until the image is decoded and cut into tiles, the only thing known is the time it takes.
    progress.removeAttribute("value");
    const tick = () => {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      statusText.textContent = `Restoring (${task})\u2026 ${seconds} s`;
    };
    tick();
    ticker = setInterval(tick, 100);
  });

  const finish = () => {
    clearInterval(ticker);
    if (running === request) running = null;
    updateButton();
    // Keyboard users go on from the button that starts the next try, not from a hidden one.
    if (document.activeElement === cancelButton) restoreButton.focus();
    cancelButton.hidden = true;
    resultBox.removeAttribute("aria-busy");
  };

  const settle = () => {
    settled = true;
    finish();
  };

  const onEvent = (type, data) => {
    if (settled) return;
    let payload;
    try {
      payload = JSON.parse(data);
    } catch (error) {
      settle();
      request.abort(); // nothing more from this stream can be trusted either
      hideStatus();
      showError(`The service sent a ${type} event this page cannot read.`, "unreadable_event");
      return;
    }
    if (type === "progress") {
      clearInterval(ticker);
      showTiles(task, payload);
    } else if (type === "result") {
      settle();
      const roundTrip = performance.now() - started;
      showResult(restoreNumber, file, task, pngFromBase64(payload.png_base64), payload.request_id,
                 payload.timings, roundTrip);
    } else if (type === "error") {
      settle();
      hideStatus();
      showApiError(payload.error?.status, payload);
    }
  };
  const events = new EventStreamParser(onEvent);

  const isEventStream = () => request.status === 200 &&
    (request.getResponseHeader("Content-Type") || "").startsWith("text/event-stream");
  const readEvents = () => {
    if (settled || !isEventStream()) return;
    const text = request.responseText;
    events.push(text.slice(parsedUpTo));
    parsedUpTo = text.length;
  };
  request.addEventListener("progress", readEvents);

  request.addEventListener("load", () => {
    readEvents(); // whatever arrived after the last progress event
    if (settled) return;
    finish();
    hideStatus();
    if (isEventStream()) {
      showError("The service ended the stream before the result.", "incomplete_stream");
    } else if (request.status === 200) {
      // Something between here and the service ignored the Accept header.
      const type = request.getResponseHeader("Content-Type") || "no content type";
      showError(`The service answered with ${type} instead of an event stream.`, "unexpected_response", 200);
    } else {
      let parsed = null;
      try {
        parsed = JSON.parse(request.responseText);
      } catch (error) {
        parsed = null; // not the API's JSON; a proxy in front answered
      }
      showApiError(request.status, parsed, request.statusText);
    }
  });
  request.addEventListener("error", async () => {
    if (settled) return;
    finish();
    hideStatus();
    // The browser sends nothing for a file changed or moved since it was chosen, and reports that
    // as a network error too; reading the file again tells the two apart.
    const readable = await file.slice(0, 1).arrayBuffer().then(() => true, () => false);
    if (!readable) {
      showError(`${file.name} can no longer be read (changed or moved since it was chosen); choose it again.`,
                "file_unreadable");
    } else {
      showError("The service could not be reached, or it closed the connection.", "network_error");
    }
  });
  request.addEventListener("abort", finish);
  request.send(body);
}

// Closing the connection is what cancels the restore on the server: its tiles leave the queue.
cancelButton.addEventListener("click", () => {
  if (!running) return;
  running.abort();
  progress.hidden = true;
  showStatus("Cancelled. Press Restore to try again, or choose another image.");
});

function showTiles(task, { done, total, eta_s: etaSeconds }) {
  progress.max = total;
  progress.value = done;
  let text = `Restoring (${task})\u2026 ${done} / ${total} tiles`;
  if (done >= total) text += ", finishing";
  else if (etaSeconds !== undefined) text += `, ${formatTimeLeft(etaSeconds)}`;
  statusText.textContent = text;
}

function pngFromBase64(encoded) {
  const binary = atob(encoded);
  const bytes = new Uint8Array(binary.length);
  for (let index = 0; index < binary.length; index += 1) bytes[index] = binary.charCodeAt(index);
  return new Blob([bytes], { type: "image/png" });
}

async function showResult(restoreNumber, file, task, blob, requestId, timings, roundTrip) {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  const originalUrl = URL.createObjectURL(file);
  const resultUrl = URL.createObjectURL(blob);
  objectUrls = [originalUrl, resultUrl];

  compare.classList.remove("no-original");
  originalImage.alt = `Original: ${file.name}`;
  resultImage.alt = `Restored (${task}): ${file.name}`;
  const originalShown = loadImage(originalImage, originalUrl);
  await loadImage(resultImage, resultUrl);
  const originalDecoded = await originalShown;
  // Another image was chosen while these decoded: its restore owns the page now.
  if (restoreNumber !== restores) return;
  if (!originalDecoded) {
    // Chromium shows no TIFF, for one; the restored PNG is still worth showing alone.
    compare.classList.add("no-original");
  }

  const width = resultImage.naturalWidth;
  const height = resultImage.naturalHeight;
  compare.style.width = `min(100%, ${Math.max(width, MIN_DISPLAY_WIDTH)}px)`;
  compare.classList.toggle("pixelated", width * 3 <= MIN_DISPLAY_WIDTH);
  $("image-size").textContent = `${width} \u00d7 ${height}`;

  const stem = file.name.replace(/\.[^.]*$/, "") || "image";
  download.href = resultUrl;
  download.download = `${stem}-${task}.png`;

  $("request-id").textContent = requestId;
  $("round-trip").textContent = `${formatMs(roundTrip)} ms`;
  showTimings(timings);

  resultBox.hidden = false;
  progress.hidden = true;
  const total = timings.total;
  showStatus(`Restored ${file.name} (${width} \u00d7 ${height})` +
             (total !== undefined ? ` in ${formatMs(total)} ms on the server.` : "."));
}

// Resolves true once shown, false when the browser cannot decode it.
function loadImage(img, url) {
  return new Promise((resolve) => {
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = url;
  });
}

// -- latency breakdown --------------------------------------------------------------------------

function showTimings(timings) {
  const tbody = $("timings").querySelector("tbody");
  const bar = $("timing-bar");
  tbody.replaceChildren();
  bar.replaceChildren();
  const steps = Object.entries(timings).filter(([name]) => name !== "total");
  const total = timings.total ?? steps.reduce((sum, [, ms]) => sum + ms, 0);
  const accounted = steps.reduce((sum, [, ms]) => sum + ms, 0);
  const rows = [...steps];
  // What the steps do not cover: reading the upload, routing, writing the answer.
  if (timings.total !== undefined && total - accounted > 0.05) rows.push(["other", total - accounted]);

  rows.forEach(([name, ms], index) => {
    const row = tbody.insertRow();
    const label = row.insertCell();
    const swatch = document.createElement("span");
    swatch.className = `swatch step-${index % 6}`;
    label.append(swatch, STEP_LABELS[name] || (name === "other" ? "Other (upload, routing)" : name));
    row.insertCell().textContent = formatMs(ms);
    const segment = document.createElement("span");
    segment.className = `step-${index % 6}`;
    segment.style.flexGrow = String(Math.max(ms, 0));
    segment.title = `${STEP_LABELS[name] || name}: ${formatMs(ms)} ms`;
    bar.append(segment);
  });
  if (timings.total !== undefined) {
    const row = tbody.insertRow();
    row.className = "total";
    const label = document.createElement("th");
    label.scope = "row";
    label.textContent = STEP_LABELS.total;
    row.append(label);
    row.insertCell().textContent = formatMs(timings.total);
  }
}

// -- the comparison slider ----------------------------------------------------------------------

function setSplit(percent) {
  const value = Math.min(100, Math.max(0, Math.round(percent)));
  slider.value = String(value);
  compare.style.setProperty("--split", `${value}%`);
  slider.setAttribute("aria-valuetext", `${value}% original, ${100 - value}% restored`);
}

slider.addEventListener("input", () => setSplit(Number(slider.value)));

// Dragging on the picture moves the same slider, which stays the one control keyboards use.
let dragging = false;
const splitFromPointer = (event) => {
  const box = compare.getBoundingClientRect();
  setSplit((100 * (event.clientX - box.left)) / box.width);
};
compare.addEventListener("pointerdown", (event) => {
  if (!compare.classList.contains("view-slider")) return;
  dragging = true;
  compare.setPointerCapture(event.pointerId);
  splitFromPointer(event);
});
compare.addEventListener("pointermove", (event) => { if (dragging) splitFromPointer(event); });
compare.addEventListener("pointerup", () => { dragging = false; });
compare.addEventListener("pointercancel", () => { dragging = false; });

for (const radio of document.querySelectorAll('input[name="view"]')) {
  radio.addEventListener("change", () => {
    const sideBySide = $("view-side").checked;
    compare.classList.toggle("view-slider", !sideBySide);
    compare.classList.toggle("view-side", sideBySide);
    slider.closest(".slider-field").hidden = sideBySide;
  });
}

// -- status and errors --------------------------------------------------------------------------

function showStatus(text) {
  statusText.textContent = text;
  statusBox.hidden = false;
}

function hideStatus() {
  statusBox.hidden = true;
}

// The API's own words: {"error": {"code", "message"}}; anything else is shown with its status.
function showApiError(status, body, statusText) {
  const detail = body && body.error;
  if (detail && detail.message) {
    showError(detail.message, detail.code, status);
  } else {
    showError(`The server answered HTTP ${status}${statusText ? ` ${statusText}` : ""}.`, "http_error", status);
  }
}

function showError(message, code, status) {
  resultBox.hidden = true;
  $("error-message").textContent = message;
  $("error-code").textContent = status ? `${code} \u00b7 HTTP ${status}` : code;
  errorBox.hidden = false;
}

function hideError() {
  errorBox.hidden = true;
}

// -- formatting ---------------------------------------------------------------------------------

function formatMs(ms) {
  return ms >= 100 ? ms.toFixed(0) : ms.toFixed(1);
}

// Rounded as a person would say it: the estimate is never more precise than that.
function formatTimeLeft(seconds) {
  if (seconds < 1) return "less than a second left";
  if (seconds < 90) return `about ${Math.round(seconds)} s left`;
  return `about ${Math.round(seconds / 60)} min left`;
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

setSplit(Number(slider.value));
loadTasks();
