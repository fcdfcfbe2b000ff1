// lm-eval-server dashboard: plain JS, no build step, nothing fetched from outside the server.
// URLs are relative ("jobs", not "/jobs") so the dashboard also works behind a path prefix.
"use strict";

const KEY_STORAGE = "lm-eval-server.api-key";
const FILTER_STORAGE = "lm-eval-server.status-filter";
const POLL_MS = 1500;
const PAGE = 100; // newest jobs shown in the table
const TERMINAL = new Set(["Completed", "Failed", "Stopped"]);
// The options people set on almost every job; everything else folds under "Advanced".
const FIRST_FIELDS = ["model", "tasks", "model_args", "limit", "num_fewshot"];

const $ = (id) => document.getElementById(id);

// Extension points for the dashboard's other scripts (team.js, ...), which load after this one:
// query parameters for the jobs list, cells appended to a job's row, facts on the job page, and
// panels that render themselves from each fresh copy of the job (gates.js: its verdict;
// reproduce.js: a reproduction's diff).
const hooks = { jobsParams: [], jobCells: [], jobFacts: [], jobPanels: [] };

// Builds elements with textContent only: job arguments and logs come from any submitter.
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// The same for SVG (gates.js's charts, reproduce.js's bar): attributes, text as text nodes.
const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    el.setAttribute(key === "className" ? "class" : key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// ---------------------------------------------------------------- API access

class ApiError extends Error {
  constructor(status, detail) {
    super(formatDetail(detail));
    this.status = status;
    this.detail = detail;
  }
}

function formatDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    // FastAPI's validation errors: [{loc: ["body", "limit"], msg: "..."}, ...]
    return detail
      .map((e) => {
        const loc = (e.loc || []).filter((p) => p !== "body").join(".");
        return loc ? `${loc}: ${e.msg}` : String(e.msg);
      })
      .join("\n");
  }
  return JSON.stringify(detail);
}

async function api(path, { method = "GET", json } = {}) {
  const headers = { Accept: "application/json" };
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (err) {
    setConnection(false);
    throw new ApiError(0, `The server is unreachable (${err.message})`);
  }
  setConnection(true);
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const data = isJson ? await response.json().catch(() => null) : await response.text();
  if (response.status === 401) {
    showKeyPanel(key ? "The server refused this key." : "This server needs an API key.");
  }
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? data.detail : data || response.statusText;
    throw new ApiError(response.status, detail);
  }
  return data;
}

function setConnection(ok) {
  $("connection").hidden = ok;
}

// ---------------------------------------------------------------- API key

function showKeyPanel(message) {
  $("key-panel").hidden = false;
  $("key-message").textContent = message || "";
  $("key-input").focus();
}

function updateKeyButton() {
  const hasKey = Boolean(localStorage.getItem(KEY_STORAGE));
  $("key-button").textContent = hasKey ? "API key ✓" : "API key";
}

function setupKeyPanel() {
  $("key-button").addEventListener("click", () => {
    if ($("key-panel").hidden) showKeyPanel("");
    else $("key-panel").hidden = true;
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    updateKeyButton();
    refreshNow();
  });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    $("key-message").textContent = "Key forgotten.";
    updateKeyButton();
  });
  updateKeyButton();
}

// ---------------------------------------------------------------- formatting

function flash(message, kind = "info") {
  const el = $("flash");
  el.textContent = message;
  el.className = `flash flash-${kind}`;
  el.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => (el.hidden = true), 6000);
}

// Local time with its date, e.g. "2026-12-02 06:40:12": a job list spans days, and a time
// without a date ("6:40:12 AM") cannot be placed.
function formatTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const pad = (n) => String(n).padStart(2, "0");
  const day = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  return `${day} ${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const s = Math.round(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
}

function formatNumber(value) {
  if (typeof value !== "number") return value === null || value === undefined ? "" : value;
  return Number.isInteger(value) ? String(value) : value.toFixed(4);
}

function badge(status) {
  return h(
    "span",
    { class: `badge badge-${status.toLowerCase()}`, "data-testid": "status" },
    status,
  );
}

function progressBar(job) {
  const queued = job.status === "Queued";
  const pct = queued ? 0 : job.inference_progress_pct ?? 0;
  const p = job.progress;
  const parts = [queued ? "queued" : `${pct}%`];
  if (job.status === "Running" && p) {
    parts.push(p.phase);
    if (p.total) parts.push(`${p.done}/${p.total}`);
    if (p.eta_s !== null && p.eta_s !== undefined) parts.push(`ETA ${formatDuration(p.eta_s)}`);
  }
  // The tooltip lists each phase's own count ("loglikelihood 80/80 · generate_until 3/20").
  const title = p
    ? (p.phases || [])
        .filter((x) => x.total !== null)
        .map((x) => `${x.phase} ${x.done}/${x.total}`)
        .concat(p.rate_per_s ? [`${p.rate_per_s.toFixed(1)}/s`] : [])
        .join(" · ") || p.phase
    : "";
  const fill = h("div", { class: "progress-fill" });
  // CSSOM, not a style attribute: the page's CSP forbids inline style attributes.
  fill.style.width = `${pct}%`;
  return h(
    "div",
    {
      class: `progress progress-${job.status.toLowerCase()}`,
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": pct,
      "data-testid": "progress",
      title,
    },
    h("div", { class: "progress-track" }, fill),
    h("span", { class: "progress-label", "data-testid": "progress-label" }, parts.join(" · ")),
  );
}

// ---------------------------------------------------------------- jobs view

const jobsView = {
  total: 0,
  rows: new Map(), // job_id -> {signature, tr}

  init() {
    const filter = $("status-filter");
    filter.value = localStorage.getItem(FILTER_STORAGE) || "";
    filter.addEventListener("change", () => {
      localStorage.setItem(FILTER_STORAGE, filter.value);
      refreshNow();
    });
    $("jobs-body").addEventListener("click", (event) => {
      const row = event.target.closest("tr[data-job-id]");
      if (!row || event.target.closest("a, .pick") || String(window.getSelection())) return;
      location.hash = `#/job/${row.dataset.jobId}`;
    });
  },

  async refresh() {
    const filter = $("status-filter").value;
    // The API lists oldest first: ask for the last PAGE jobs, re-asking when the total moved.
    for (let attempt = 0; attempt < 3; attempt++) {
      const offset = Math.max(0, this.total - PAGE);
      const params = new URLSearchParams({ limit: PAGE, offset });
      if (filter) params.set("status", filter);
      for (const add of hooks.jobsParams) add(params);
      const data = await api(`jobs?${params}`);
      this.total = data.total;
      if (offset === Math.max(0, data.total - PAGE) || attempt === 2) {
        this.render(data.jobs.slice().reverse(), data.total);
        break;
      }
    }
    return true;
  },

  render(jobs, total) {
    const body = $("jobs-body");
    const seen = new Set();
    const rows = jobs.map((job) => {
      seen.add(job.job_id);
      const signature = JSON.stringify(job);
      const known = this.rows.get(job.job_id);
      if (known && known.signature === signature) return known.tr;
      const tr = jobRow(job);
      this.rows.set(job.job_id, { signature, tr });
      return tr;
    });
    for (const id of this.rows.keys()) if (!seen.has(id)) this.rows.delete(id);
    // Leave the DOM alone when nothing changed, so text selections survive a poll.
    const same =
      body.children.length === rows.length && rows.every((tr, i) => body.children[i] === tr);
    if (!same) body.replaceChildren(...rows);
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs-count").textContent =
      total > jobs.length ? `newest ${jobs.length} of ${total}` : `${total} job${total === 1 ? "" : "s"}`;
  },
};

function jobRow(job) {
  const tasks = job.tasks.join(", ");
  return h(
    "tr",
    { dataset: { jobId: job.job_id, status: job.status }, "data-testid": "job-row" },
    compareView.cell(job),
    h("td", { class: "num" }, h("a", { href: `#/job/${job.job_id}` }, `#${job.job_id}`)),
    h("td", { title: job.error ? job.error.trim().split("\n").pop() : null }, badge(job.status)),
    h("td", { class: "mono ellipsis", title: job.model || "" }, job.model || "—"),
    h("td", { class: "mono ellipsis", title: tasks }, tasks || "—"),
    h("td", { class: "progress-col" }, progressBar(job)),
    h("td", { title: job.started_at || "" }, formatTime(job.started_at)),
    h("td", { class: "num" }, formatDuration(job.duration_s)),
    hooks.jobCells.map((cell) => cell(job)),
  );
}

// ---------------------------------------------------------------- job view

const jobView = {
  id: null,
  job: null,
  stream: "stderr",
  resultsFor: null,

  init() {
    $("stop-button").addEventListener("click", () => this.stop());
    $("delete-button").addEventListener("click", () => this.remove());
    for (const tab of document.querySelectorAll(".tabs [data-stream]")) {
      tab.addEventListener("click", () => {
        this.stream = tab.dataset.stream;
        for (const t of document.querySelectorAll(".tabs [data-stream]")) {
          t.setAttribute("aria-selected", String(t === tab));
        }
        if (this.job) this.renderLog(this.job, true);
      });
    }
  },

  open(id) {
    if (id !== this.id) {
      this.id = id;
      this.job = null;
      this.resultsFor = null;
      $("job-id").textContent = `#${id}`;
      $("job-status").replaceChildren();
      $("job-progress").replaceChildren();
      $("job-facts").replaceChildren();
      $("job-argument").textContent = "";
      $("job-error").hidden = true;
      $("results-section").hidden = true;
      $("results-body").replaceChildren();
      $("log").textContent = "";
      samplesView.reset();
    }
  },

  async refresh() {
    const id = this.id;
    let job;
    try {
      job = await api(`job/${id}`);
    } catch (err) {
      if (err.status === 404 && id === this.id) {
        $("job-status").replaceChildren(badge("Deleted"));
        $("job-facts").replaceChildren();
        $("log").textContent = "";
        $("stop-button").disabled = true;
        $("delete-button").disabled = true;
        flash(`Job ${id} does not exist (deleted?).`, "error");
        return false;
      }
      throw err;
    }
    if (id !== this.id) return false;
    this.job = job;
    this.render(job);
    if (job.status === "Completed" && this.resultsFor !== id) {
      this.resultsFor = id;
      await this.loadResults(id);
      await samplesView.load(id);
    }
    return !TERMINAL.has(job.status);
  },

  render(job) {
    $("job-status").replaceChildren(badge(job.status));
    $("job-progress").replaceChildren(progressBar(job));
    const facts = [
      ["Model", job.model || "—"],
      ["Tasks", job.tasks.join(", ") || "—"],
      ["Created", formatTime(job.created_at)],
      ["Started", formatTime(job.started_at)],
      ["Finished", formatTime(job.finished_at)],
      ["Duration", formatDuration(job.duration_s)],
      ["Exit code", job.exit_code ?? "—"],
      // GPU slots: the devices the job was given; null where the server hands out none.
      ["GPUs", job.gpus == null ? "—" : job.gpus.join(", ") || "none"],
      ...hooks.jobFacts.flatMap((facts) => facts(job)),
    ];
    $("job-facts").replaceChildren(
      ...facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", { "data-fact": k }, v))),
    );
    $("job-argument").textContent = job.argument;
    $("job-error").hidden = !job.error;
    $("job-error").textContent = job.error || "";
    $("stop-button").disabled = TERMINAL.has(job.status);
    $("stop-button").hidden = TERMINAL.has(job.status);
    $("delete-button").disabled = false;
    for (const panel of hooks.jobPanels) panel(job);
    this.renderLog(job, false);
  },

  renderLog(job, force) {
    const log = $("log");
    const lines = job[this.stream] || [];
    const text = lines.map((line) => line.replace(/\r?\n$/, "")).join("\n");
    $("log-truncated").hidden = !job[`${this.stream}_truncated`];
    if (!force && log.textContent === text) return;
    log.textContent = text || (job.status === "Queued" ? "(waiting for a free slot)" : "");
    if ($("log-follow").checked) log.scrollTop = log.scrollHeight;
  },

  async loadResults(id) {
    let data;
    try {
      data = await api(`job/${id}/results`);
    } catch (err) {
      $("results-section").hidden = false;
      $("results-body").replaceChildren(
        h("tr", {}, h("td", { colspan: 5, class: "muted" }, `No results: ${err.message}`)),
      );
      return;
    }
    if (id !== this.id) return;
    $("results-body").replaceChildren(
      ...data.metrics.map((m) =>
        h(
          "tr",
          { "data-testid": "result-row", dataset: { task: m.task, metric: m.metric } },
          h("td", { class: "mono" }, m.task),
          h("td", { class: "mono" }, m.filter),
          h("td", { class: "mono" }, m.metric),
          h("td", { class: "num", "data-testid": "result-value" }, formatNumber(m.value)),
          h("td", { class: "num muted" }, formatNumber(m.stderr)),
        ),
      ),
    );
    $("results-file").textContent = data.results_file ? `Results file: ${data.results_file}` : "";
    $("results-section").hidden = false;
  },

  async stop() {
    const id = this.id;
    if (!window.confirm(`Stop job ${id}?`)) return;
    try {
      const data = await api(`job/${id}/stop`, { method: "POST" });
      flash(data.message);
    } catch (err) {
      flash(err.message, "error");
    }
    refreshNow();
  },

  async remove() {
    const id = this.id;
    if (!window.confirm(`Delete job ${id} and its files? A running job is stopped first.`)) return;
    try {
      const data = await api(`job/${id}`, { method: "DELETE" });
      flash(data.message);
      location.hash = "#/";
    } catch (err) {
      flash(err.message, "error");
    }
  },
};

// ---------------------------------------------------------------- new job form

const formView = {
  fields: [], // {name, kind, input}
  loading: null, // the one load in flight or done: route() and /me's answer both ask for it

  load() {
    // Opened directly (/#/new), the form is asked for twice at once; building it twice drew
    // every field twice and sent two POST /job per click.
    this.loading ??= this.build().then((ok) => {
      if (!ok) this.loading = null; // try again on the next visit
    });
    return this.loading;
  },

  async build() {
    let spec;
    try {
      spec = await api("openapi.json");
    } catch (err) {
      $("form-loading").textContent = `Could not load the request schema: ${err.message}`;
      return false;
    }
    const schema = spec.components.schemas.JobRequest;
    const post = spec.paths["/job"].post;
    const examples = post.requestBody.content["application/json"].examples || {};
    const example = Object.values(examples)[0]?.value || {};
    const names = Object.keys(schema.properties);
    const ordered = [
      ...FIRST_FIELDS.filter((n) => names.includes(n)),
      ...names.filter((n) => !FIRST_FIELDS.includes(n)),
    ];
    for (const name of ordered) {
      const field = makeField(name, schema.properties[name], example[name]);
      this.fields.push(field);
      const target = FIRST_FIELDS.includes(name) ? "form-basic" : "form-advanced-fields";
      $(target).append(field.row);
    }
    $("job-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    $("job-form").addEventListener("reset", () => this.showErrors(null));
    $("form-loading").hidden = true;
    $("job-form").hidden = false;
    return true;
  },

  collect() {
    const body = {};
    const problems = [];
    for (const field of this.fields) {
      try {
        const value = readField(field);
        if (value !== undefined) body[field.name] = value;
      } catch (err) {
        problems.push({ loc: [field.name], msg: err.message });
      }
    }
    return { body, problems };
  },

  async submit() {
    const { body, problems } = this.collect();
    if (problems.length) {
      this.showErrors(problems);
      return;
    }
    const button = $("submit-button");
    button.disabled = true;
    try {
      const data = await api("job", { method: "POST", json: body });
      this.showErrors(null);
      flash(data.message);
      location.hash = `#/job/${data.job_id}`;
    } catch (err) {
      this.showErrors(err.detail ?? err.message, err.status);
    } finally {
      button.disabled = false;
    }
  },

  showErrors(detail, status) {
    const box = $("form-error");
    for (const field of this.fields) field.row.classList.remove("invalid");
    if (detail === null || detail === undefined) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const heading = status ? `The server refused the job (HTTP ${status}):` : "Please fix:";
    const lines = Array.isArray(detail) ? formatDetail(detail).split("\n") : [formatDetail(detail)];
    box.replaceChildren(
      h("strong", {}, heading),
      h("ul", {}, lines.map((line) => h("li", { "data-testid": "form-error-line" }, line))),
    );
    if (Array.isArray(detail)) {
      for (const e of detail) {
        const name = (e.loc || []).filter((p) => p !== "body")[0];
        const field = this.fields.find((f) => f.name === name);
        if (field) field.row.classList.add("invalid");
      }
    }
    box.hidden = false;
  },
};

function fieldKind(name, prop) {
  const types = new Set();
  for (const s of prop.anyOf || [prop]) {
    if (s.$ref || s.type === "object") types.add("object");
    else if (s.type && s.type !== "null") types.add(s.type);
  }
  if (name === "env_vars") return "env";
  if (types.size === 1 && types.has("boolean")) return "checkbox";
  if (types.has("boolean")) return "flag_or_value"; // a bare flag or a value, e.g. a template name
  if (types.size === 1 && types.has("integer")) return "integer";
  if (types.size === 1 && types.has("number")) return "number";
  // Before "list": model_args also takes a list, but people write key=value pairs.
  if (types.has("object") && types.has("string")) return "key_value";
  if (types.has("array")) return "list";
  if (types.has("object")) return "json";
  return "text";
}

const PLACEHOLDERS = {
  flag_or_value: "blank, true, false or a value",
  key_value: "key=value,key2=value2 or a JSON object",
  json: "a JSON object",
  list: "comma-separated, e.g. arc_easy,hellaswag",
  env: "KEY=value, one per line (or a JSON object)",
};

function makeField(name, prop, example) {
  const kind = fieldKind(name, prop);
  const id = `field-${name}`;
  const help = (prop.description || "").replace(/^`(--[^`]+)`:\s*/, "$1 · ").replace(/`/g, "");
  const common = { id, name, "data-testid": id, "aria-describedby": `${id}-help` };
  let input;
  if (kind === "checkbox") {
    input = h("input", { ...common, type: "checkbox" });
  } else if (kind === "env" || kind === "json") {
    input = h("textarea", { ...common, rows: 3, spellcheck: "false", placeholder: PLACEHOLDERS[kind] });
  } else {
    const numeric = kind === "integer" || kind === "number";
    const placeholder =
      example !== undefined ? `e.g. ${typeof example === "object" ? JSON.stringify(example) : example}` : PLACEHOLDERS[kind] || "";
    input = h("input", {
      ...common,
      type: numeric ? "number" : "text",
      step: kind === "integer" ? 1 : numeric ? "any" : null,
      min: prop.anyOf?.find((s) => s.exclusiveMinimum !== undefined) ? 0 : null,
      autocomplete: "off",
      spellcheck: "false",
      placeholder,
    });
  }
  const label = h("label", { for: id, class: "mono" }, name);
  const helpText = h("small", { id: `${id}-help`, class: "muted" }, help);
  const row =
    kind === "checkbox"
      ? h("div", { class: "field field-checkbox", "data-kind": kind }, input, label, helpText)
      : h("div", { class: "field", "data-kind": kind }, label, input, helpText);
  return { name, kind, input, row };
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`not valid JSON (${err.message})`);
  }
}

// The value to send for one field, or undefined to leave the option out.
function readField({ kind, input }) {
  if (kind === "checkbox") return input.checked ? true : undefined;
  const text = input.value.trim();
  if (!text) {
    // A number input reports "" for text it cannot parse; say so rather than drop it.
    if (input.validity && input.validity.badInput) throw new Error("not a number");
    return undefined;
  }
  switch (kind) {
    case "integer":
    case "number":
      return Number(text);
    case "flag_or_value":
      if (text.toLowerCase() === "true") return true;
      if (text.toLowerCase() === "false") return false;
      return text;
    case "key_value":
      return text.startsWith("{") ? parseJson(text) : text;
    case "json":
      return parseJson(text);
    case "env":
      return text.startsWith("{") ? parseJson(text) : parseEnv(text);
    default:
      return text;
  }
}

function parseEnv(text) {
  const env = {};
  text.split("\n").forEach((raw, index) => {
    const line = raw.trim();
    if (!line || line.startsWith("#")) return;
    const eq = line.indexOf("=");
    if (eq <= 0) throw new Error(`line ${index + 1}: expected KEY=value, got ${JSON.stringify(line)}`);
    env[line.slice(0, eq).trim()] = line.slice(eq + 1);
  });
  return env;
}

// ---------------------------------------------------------------- routing and polling

const views = {
  jobs: { section: "jobs-view", refresh: () => jobsView.refresh() },
  job: { section: "job-view", refresh: () => jobView.refresh() },
  new: { section: "new-view", refresh: () => formView.load().then(() => false) },
  compare: { section: "compare-view", refresh: () => compareView.refresh() },
};

let current = null;
let generation = 0; // bumps on every navigation or forced refresh; stale polls stop themselves
let timer = null;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const match = hash.match(/^\/job\/(\d+)\/?$/);
  let name = "jobs";
  if (match) {
    name = "job";
    jobView.open(Number(match[1]));
  } else if (hash === "/new") {
    name = "new";
  } else if (/^\/compare\?jobs=\d+(,\d+)*$/.test(hash)) {
    name = "compare";
    compareView.open(hash.split("=")[1].split(",").map(Number));
  }
  current = views[name];
  for (const [key, view] of Object.entries(views)) $(view.section).hidden = key !== name;
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === name);
  }
  document.title = name === "job" ? `Job ${match[1]} · lm-eval-server` : "lm-eval-server";
  refreshNow();
}

function refreshNow() {
  clearTimeout(timer);
  poll(++generation);
}

async function poll(gen) {
  let again = true;
  try {
    again = await current.refresh();
  } catch (err) {
    // Without a valid key every poll would fail the same way: wait for the key panel instead.
    if (err.status === 401) again = false;
    else if (err.status !== 0) flash(err.message, "error");
  }
  // A background tab polls nothing; visibilitychange restarts it.
  if (gen === generation && again && !document.hidden) {
    timer = setTimeout(() => poll(gen), POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyPanel();
  jobsView.init();
  jobView.init();
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshNow();
  });
  route();
});
