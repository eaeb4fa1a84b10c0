// The playground: submits with wait=false, then reads the run's Server-Sent Events with fetch
// (EventSource cannot send the API key) and shows them as they come. What a run sends back is
// hostile: it goes into the page as text nodes and data:/blob: images only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // {id, controller} of the run being shown

function headers(extra) {
  const all = Object.assign({}, extra);
  const key = $("key").value.trim();
  if (key) all.Authorization = "Bearer " + key;
  return all;
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return `${problem.status} ${problem.title}: ${problem.detail}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setState(text) {
  $("state").textContent = text;
}

function line(parent, text, className) {
  const element = document.createElement("div");
  if (className) element.className = className;
  element.textContent = text;
  parent.appendChild(element);
  return element;
}

// The environments the key may use, default selected; without an answer (a key still to type),
// default alone, which every server has.
async function loadEnvironments() {
  const select = $("environment");
  const chosen = select.value || "default";
  let names = ["default"];
  try {
    const response = await fetch("/environments", {headers: headers({})});
    if (response.ok) names = (await response.json()).map((environment) => environment.name);
  } catch (_) {
    // the server is unreachable: a run will say so
  }
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  select.value = names.includes(chosen) ? chosen : names.includes("default") ? "default" : names[0];
}

async function request() {
  const body = {code: $("code").value, stdin: $("stdin").value, wait: false, files: []};
  if ($("environment").value) body.environment = $("environment").value;
  for (const file of $("files").files) body.files.push({path: file.name, content: await base64Of(file)});
  // One argument a line, so that one may hold spaces; blank lines (a trailing newline) are none.
  const args = $("args").value.split("\n").filter((arg) => arg !== "");
  if (args.length) body.args = args;
  const sources = $("sources").value.split(",").map((name) => name.trim()).filter((name) => name !== "");
  if (sources.length) body.sources = sources;
  for (const name of ["timeout", "cpu_time", "memory_mb"]) {
    const value = $(name).value.trim();
    if (value) body[name] = name === "timeout" ? parseFloat(value) : parseInt(value, 10);
  }
  return body;
}

async function run() {
  if (current) return;
  for (const id of ["stdout", "stderr", "summary", "outfiles"]) $(id).replaceChildren();
  const controller = new AbortController();
  current = {id: null, controller};
  $("run").disabled = true;
  setState("submitting");
  try {
    const response = await fetch("/run-json/", {
      method: "POST",
      headers: headers({"Content-Type": "application/json"}),
      body: JSON.stringify(await request()),
      signal: controller.signal,
    });
    if (response.status !== 202) {
      setState("refused");
      line($("summary"), await problemText(response), "error");
      return;
    }
    const accepted = await response.json();
    current.id = accepted.id;
    $("cancel").disabled = false;
    setState("queued");
    await follow(accepted.id, controller.signal);
  } catch (error) {
    if (error.name !== "AbortError") {
      setState("failed");
      line($("summary"), String(error), "error");
    }
  } finally {
    current = null;
    $("run").disabled = false;
    $("cancel").disabled = true;
  }
}

// Reads the stream to its result event, resuming after the last output seen if it drops.
async function follow(id, signal) {
  let last = null;
  for (let attempt = 0; attempt < 6; attempt++) {
    const extra = {Accept: "text/event-stream"};
    if (last !== null) extra["Last-Event-ID"] = String(last);
    let response;
    try {
      response = await fetch(`/status/${id}/stream`, {headers: headers(extra), signal});
    } catch (error) {
      if (error.name === "AbortError") throw error;
      await new Promise((resolve) => setTimeout(resolve, 500 * (attempt + 1)));
      continue;
    }
    if (!response.ok) {
      line($("summary"), await problemText(response), "error");
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = {type: "message", data: [], id: null};
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const text = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (text === "") {
            if (event.data.length) {
              if (event.id !== null) last = parseInt(event.id, 10);
              if (handle(id, event.type, event.data.join("\n"))) return;
            }
            event = {type: "message", data: [], id: null};
          } else if (!text.startsWith(":")) {
            const colon = text.indexOf(":");
            const field = colon < 0 ? text : text.slice(0, colon);
            const data = colon < 0 ? "" : text.slice(colon + 1).replace(/^ /, "");
            if (field === "event") event.type = data;
            else if (field === "data") event.data.push(data);
            else if (field === "id") event.id = data;
          }
        }
      }
    } catch (error) {
      if (error.name === "AbortError") throw error;
    }
    attempt = last === null ? attempt : 0;
  }
  line($("summary"), "the stream kept dropping; the run goes on: GET /status/" + id, "error");
}

// One event; true once the result has been shown.
function handle(id, type, data) {
  const body = JSON.parse(data);
  if (type === "stdout" || type === "stderr") {
    $(type).appendChild(document.createTextNode(body.text));
  } else if (type === "status") {
    setState(body.status);
  } else if (type === "result") {
    showResult(id, body);
    return true;
  }
  return false;
}

function showResult(id, result) {
  setState(result.status);
  const summary = $("summary");
  const parts = [`status ${result.status}`];
  if (result.exit_code !== null) parts.push(`exit ${result.exit_code}`);
  parts.push(`${Math.round(result.duration_ms)} ms`);
  if (result.limits_hit.length) parts.push(`limits hit: ${result.limits_hit.join(", ")}`);
  line(summary, parts.join(" · "), result.status === "succeeded" ? "ok" : "error").id = "result-line";
  if (result.error) line(summary, result.error, "error");
  if (result.stdout_truncated || result.stderr_truncated) line(summary, "output cut at the limit", "note");
  if (result.files_truncated) line(summary, "some files were left out (the server's caps)", "note");
  for (const file of result.files) showFile(id, file);
}

function bytesOf(base64) {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// Raster images, which a browser only decodes, are the one kind of a run's file shown inline. Any
// other blob: URL carries octet-stream: one typed text/html or image/svg+xml (a document that runs
// script) would open, from its link, as a page of this origin, with its rights.
const INLINE = /^image\/(png|jpeg|gif|webp)$/;

function blobType(file) {
  return INLINE.test(file.media_type) ? file.media_type : "application/octet-stream";
}

async function blobOf(id, file) {
  if (file.content !== null) return new Blob([bytesOf(file.content)], {type: blobType(file)});
  const path = file.path.split("/").map(encodeURIComponent).join("/");
  const response = await fetch(`/status/${id}/files/${path}`, {headers: headers({})});
  if (!response.ok) throw new Error(await problemText(response));
  return new Blob([await response.arrayBuffer()], {type: blobType(file)});
}

async function showFile(id, file) {
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  const link = document.createElement("a");
  link.textContent = file.path;
  link.download = file.path.split("/").pop();
  caption.append(link, ` (${file.size} bytes, ${file.media_type})`);
  $("outfiles").appendChild(figure);
  try {
    const url = URL.createObjectURL(await blobOf(id, file));
    link.href = url;
    if (INLINE.test(file.media_type)) {
      const image = document.createElement("img");
      image.alt = file.path;
      image.src = url;
      figure.appendChild(image);
    }
  } catch (error) {
    line(figure, String(error), "error");
  }
  figure.appendChild(caption);
}

async function cancel() {
  if (!current || !current.id) return;
  $("cancel").disabled = true;
  const response = await fetch(`/status/${current.id}`, {method: "DELETE", headers: headers({})});
  if (!response.ok && response.status !== 409) line($("summary"), await problemText(response), "error");
}

document.addEventListener("DOMContentLoaded", () => {
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", cancel);
  $("key").addEventListener("change", loadEnvironments);
  loadEnvironments();
  $("code").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    } else if (event.key === "Tab" && !event.shiftKey) {
      event.preventDefault();
      event.target.setRangeText("    ", event.target.selectionStart, event.target.selectionEnd, "end");
    }
  });
});
