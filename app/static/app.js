// Refiner playground: plain JavaScript, no build step. Talks to the same server that serves it.
"use strict";

const TERMS = ["logprob", "fluency", "length", "keywords", "prompt_coverage"];
const KEY_STORE = "refiner_api_key";
const $ = (id) => document.getElementById(id);

// ---- API key: asked for once (after a 401), kept in sessionStorage, sent only as a header.
function apiKey() {
  const typed = $("api_key").value.trim();
  if (typed) sessionStorage.setItem(KEY_STORE, typed);
  return sessionStorage.getItem(KEY_STORE) || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class ServerError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : "HTTP " + status);
    this.status = status;
    this.errorType = body && body.error_type ? body.error_type : "http";
  }
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw new ServerError(response.status, await response.json().catch(() => null));
  return response;
}

// ---- The request built from the controls.
function num(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function refineParams() {
  const weights = {};
  for (const term of TERMS) {
    const w = num("w_" + term);
    if (w !== undefined) weights[term] = w;
  }
  const keywords = $("keywords").value.split(",").map((k) => k.trim()).filter(Boolean);
  return { method: $("method").value, steps: num("steps"), candidates: num("candidates"),
           target_length: num("target_length"), keywords, weights };
}

function samplingParams() {
  return { do_sample: $("do_sample").checked, temperature: num("temperature"), top_p: num("top_p"),
           seed: num("seed") };
}

// ---- Word-level diff (longest common subsequence over words and the spaces between them).
function tokens(text) {
  return text.match(/\s+|[^\s]+/g) || [];
}

function diff(a, b) {
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const ops = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { ops.push(["eq", a[i]]); i++; j++; }
    else if (j < m && (i === n || lcs[i][j + 1] >= lcs[i + 1][j])) { ops.push(["ins", b[j]]); j++; }
    else { ops.push(["del", a[i]]); i++; }
  }
  return ops;
}

// Deleted words are marked in the initial panel, inserted ones in the refined panel; a word deleted
// next to an inserted one is a replacement (class "replaced" on both).
function renderDiff(initial, refined) {
  const ops = diff(tokens(initial), tokens(refined));
  const left = $("initial"), right = $("refined");
  left.replaceChildren(); right.replaceChildren();
  ops.forEach(([op, text], k) => {
    const near = (kind) => (ops[k - 1] && ops[k - 1][0] === kind) || (ops[k + 1] && ops[k + 1][0] === kind);
    if (op === "eq") { left.append(text); right.append(text); return; }
    const el = document.createElement(op);
    el.textContent = text;
    el.className = op === "ins" ? "ins" : "del";
    if (/\S/.test(text) && near(op === "ins" ? "del" : "ins")) el.classList.add("replaced");
    (op === "ins" ? right : left).append(el);
  });
}

// ---- Chart, edits, timings.
function renderChart(before, after) {
  const chart = $("chart");
  chart.replaceChildren();
  const names = Object.keys(before);
  const peak = Math.max(1e-9, ...names.map((t) => Math.abs(before[t])), ...names.map((t) => Math.abs(after[t] ?? 0)));
  for (const name of names) {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.dataset.term = name;
    const label = document.createElement("span");
    label.className = "bar-name";
    label.textContent = name;
    const bars = document.createElement("div");
    for (const [cls, value] of [["before", before[name]], ["after", after[name]]]) {
      const bar = document.createElement("div");
      bar.className = "bar " + cls;
      bar.style.width = (100 * Math.abs(value ?? 0) / peak).toFixed(1) + "%";
      bar.textContent = (value ?? NaN).toFixed(3);
      bar.title = cls + ": " + value;
      bars.append(bar);
    }
    row.append(label, bars);
    chart.append(row);
  }
}

function renderRefinement(r) {
  renderDiff(r.initial_text, r.refined_text);
  renderChart(r.objective_before, r.objective_after);
  $("edits").replaceChildren(...r.edits.map((e) => {
    const li = document.createElement("li");
    li.textContent = `step ${e.step}: ${e.op} ${JSON.stringify(e.old_text ?? "")} → ${JSON.stringify(e.new_text ?? "")}`;
    return li;
  }));
  if (!r.edits.length) $("edits").innerHTML = "<li>no edits (nothing scored higher)</li>";
  $("stats").textContent = `${r.method}: ${r.candidates_scored} candidates scored; generate ` +
    `${r.generate_seconds.toFixed(3)} s, refine ${r.refine_seconds.toFixed(3)} s (gradient ` +
    `${r.gradient_seconds.toFixed(3)} s, lookahead ${r.lookahead_seconds.toFixed(3)} s, scoring ` +
    `${r.scoring_seconds.toFixed(3)} s)`;
}

// ---- Server-sent events from fetch() (EventSource cannot POST).
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

// ---- The three ways to run.
async function runStream(prompt) {
  const body = { inputs: prompt, parameters: { max_new_tokens: num("max_new_tokens"), ...samplingParams(), refine: refineParams() } };
  const response = await post("/generate_stream", body);
  let text = "";
  for await (const event of sseEvents(response)) {
    if (event.error) throw new ServerError(200, event);
    if (event.token && !event.token.special) { text += event.token.text; $("refined").textContent = text; }
    if (event.details && event.details.refinement) return event.details.refinement;
  }
  throw new ServerError(200, { error: "the stream ended without a refinement", error_type: "stream" });
}

async function runChat(prompt) {
  const s = samplingParams();
  const body = { messages: [{ role: "user", content: prompt }], max_tokens: num("max_new_tokens"),
                 temperature: s.do_sample ? (s.temperature ?? 1) : 0, top_p: s.top_p, seed: s.seed, refine: refineParams() };
  const answer = await (await post("/v1/chat/completions", body)).json();
  return answer.choices[0].refinement;
}

async function runRefine(prompt) {
  const body = { inputs: prompt, output: $("output").value, parameters: { refine: refineParams() } };
  return (await (await post("/refine", body)).json()).refinement;
}

async function run() {
  const button = $("run");
  if (button.disabled) return;
  button.disabled = true;
  $("error").textContent = "";
  $("status").textContent = "running…";
  $("initial").textContent = ""; $("refined").textContent = "";
  try {
    const prompt = $("prompt").value;
    const mode = document.querySelector("input[name=mode]:checked").value;
    const r = mode === "refine" ? await runRefine(prompt) : $("chat").checked ? await runChat(prompt) : await runStream(prompt);
    if (!r) throw new ServerError(200, { error: "refinement is disabled on this server", error_type: "refinement" });
    renderRefinement(r);
    $("status").textContent = r.edits.length ? `done: ${r.edits.length} edit(s)` : "done: no edits";
  } catch (err) {
    $("status").textContent = "";
    if (err.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      $("key-field").hidden = false;
      $("api_key").focus();
    }
    $("error").textContent = `${err.errorType || "error"}: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---- Set-up: weights inputs, the method list from the OpenAPI schema, modes, keyboard.
// refine.method in the OpenAPI schema: {"anyOf": [{"type": "string", "enum": [...]}, {"type": "null"}]}.
function methodEnum(spec) {
  const method = spec.components.schemas.RefineParameters.properties.method;
  for (const option of [method, ...(method.anyOf || [])]) if (Array.isArray(option.enum)) return option.enum;
  return null;
}

async function loadMethods() {
  try {
    const response = await fetch("/openapi.json", { headers: headers() });
    if (!response.ok) return;
    const spec = await response.json();
    const methods = methodEnum(spec);
    if (methods && methods.length) {
      $("method").replaceChildren(...methods.map((m) => new Option(m, m)));
    }
  } catch (_) { /* keep the built-in list */ }
}

function setUp() {
  for (const term of TERMS) {
    const cell = document.createElement("div");
    cell.innerHTML = `<label for="w_${term}">${term}</label><input id="w_${term}" type="number" min="0" step="0.1" placeholder="default">`;
    $("weights").append(cell);
  }
  if (sessionStorage.getItem(KEY_STORE)) $("api_key").value = sessionStorage.getItem(KEY_STORE);
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      const refining = document.querySelector("input[name=mode]:checked").value === "refine";
      $("output-field").hidden = !refining;
      $("chat-field").hidden = refining;  // /refine takes the prompt as it is
    });
  }
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); run(); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); }
  });
  loadMethods();
}

setUp();
