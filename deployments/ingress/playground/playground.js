// The playground: a form that streams one generation request and shows it as it comes.
// Plain JavaScript, no build step. URLs are relative, so the page works under any route prefix.
"use strict";

const form = document.getElementById("generate-form");
const generateButton = document.getElementById("generate");
const stopButton = document.getElementById("stop");
const progressBar = document.getElementById("progress");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");
const gallery = document.getElementById("gallery");
const apiKeyInput = document.getElementById("api_key");
const modelSelect = document.getElementById("model");

const API_KEY_STORAGE = "image-service-api-key";
let running = null; // the AbortController of the request in flight

function headers() {
  const result = { "content-type": "application/json" };
  const key = apiKeyInput.value.trim();
  if (key) result.authorization = `Bearer ${key}`;
  return result;
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = false;
}

function clearError() {
  errorLine.textContent = "";
  errorLine.hidden = true;
}

// The API's error shape is {"error": {"message": ...}}; anything else gets a plain sentence.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `The service answered ${response.status} ${response.statusText}.`;
}

async function loadModels() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) {
      if (response.status === 401) showError("This service needs an API key: open “API key” below.");
      return;
    }
    const body = await response.json();
    modelSelect.replaceChildren(...body.data.map((model) => new Option(model.id, model.id)));
  } catch (_) {
    showError("Could not reach the service to list its models.");
  }
}

// The request body from the form: empty optional fields are left out (the model's defaults).
function requestBody() {
  const value = (id) => document.getElementById(id).value.trim();
  const body = {
    prompt: value("prompt"),
    model: modelSelect.value || undefined,
    n: Number(value("n") || 1),
    size: value("size") || "auto",
    response_format: "url",
    stream: true,
    stream_progress: true,
    partial_images: Number(value("partial_images") || 0),
  };
  if (value("negative_prompt")) body.negative_prompt = value("negative_prompt");
  for (const id of ["num_inference_steps", "guidance_scale", "seed"]) {
    if (value(id) !== "") body[id] = Number(value(id));
  }
  return body;
}

// One figure per image of the request, filled by previews and then by the final image.
function makeFigures(count) {
  gallery.replaceChildren();
  const figures = [];
  for (let index = 0; index < count; index += 1) {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.alt = `Image ${index + 1}, not generated yet`;
    const caption = document.createElement("figcaption");
    caption.textContent = `Image ${index + 1}: waiting…`;
    figure.append(image, caption);
    gallery.append(figure);
    figures.push({ figure, image, caption });
  }
  return figures;
}

function dataUrl(event) {
  const type = event.output_format === "jpeg" ? "jpeg" : event.output_format;
  return `data:image/${type};base64,${event.b64_json}`;
}

function handleEvent(type, data, figures, request) {
  if (type === "image_generation.progress") {
    progressBar.max = data.total_steps;
    progressBar.value = data.step;
    statusLine.textContent = `Denoising: step ${data.step} of ${data.total_steps}`;
  } else if (type === "image_generation.partial_image") {
    const { image, caption } = figures[data.image_index];
    image.src = dataUrl(data);
    image.className = "preview";
    image.alt = `Preview ${data.partial_image_index + 1} of image ${data.image_index + 1}`;
    caption.textContent = `Image ${data.image_index + 1}: preview ${data.partial_image_index + 1}`;
  } else if (type === "image_generation.completed") {
    const { image, caption } = figures[data.image_index];
    image.src = data.url || dataUrl(data);
    image.className = "final";
    image.alt = `Image ${data.image_index + 1}: ${request.prompt}`;
    caption.replaceChildren(`Image ${data.image_index + 1}, seed ${data.seed}, ${data.size} · `);
    const link = document.createElement("a");
    link.href = image.src;
    link.target = "_blank";
    link.textContent = "open";
    caption.append(link);
    request.completed += 1;
    statusLine.textContent = `Done: ${request.completed} of ${figures.length} image(s).`;
  } else if (type === "error") {
    showError((data.error && data.error.message) || "The generation failed.");
  }
}

// Server-sent events from a fetch body: blocks separated by a blank line, each with
// "event: <type>" and "data: <json>" lines. (EventSource cannot POST.)
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(type, JSON.parse(data));
    }
  }
}

async function generate(event) {
  event.preventDefault();
  clearError();
  const body = requestBody();
  if (!body.prompt) {
    showError("Write a prompt first.");
    return;
  }
  localStorage.setItem(API_KEY_STORAGE, apiKeyInput.value);
  running = new AbortController();
  generateButton.disabled = true;
  stopButton.disabled = false;
  progressBar.hidden = false;
  progressBar.value = 0;
  statusLine.textContent = "Waiting for the service…";
  const request = { prompt: body.prompt, completed: 0 };
  const started = performance.now();
  try {
    const response = await fetch("v1/images/generations", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!response.ok) {
      showError(await errorMessage(response));
      statusLine.textContent = "";
      return;
    }
    const figures = makeFigures(body.n);
    await readEvents(response, (type, data) => handleEvent(type, data, figures, request));
    if (request.completed === figures.length) {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      statusLine.textContent = `Done: ${figures.length} image(s) in ${seconds} s.`;
    }
  } catch (error) {
    if (error.name === "AbortError") statusLine.textContent = "Stopped.";
    else showError("The connection to the service failed. Is it running?");
  } finally {
    running = null;
    generateButton.disabled = false;
    stopButton.disabled = true;
    progressBar.hidden = true;
  }
}

// Stopping closes the connection; the service then stops the generation at its next step.
stopButton.addEventListener("click", () => running && running.abort());
form.addEventListener("submit", generate);
apiKeyInput.value = localStorage.getItem(API_KEY_STORAGE) || "";
apiKeyInput.addEventListener("change", loadModels);
loadModels();
