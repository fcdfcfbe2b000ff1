// Task discovery and uploads on the new-job page: autocomplete for the tasks field (GET /tasks)
// and a form that uploads a task YAML with its data files (POST /tasks).
// Uses app.js's helpers (api, h, flash, formatDetail, KEY_STORAGE); loaded after it.
"use strict";

const TASK_SUGGEST_DELAY_MS = 250; // debounce: one request per pause in typing
const TASK_SUGGEST_LIMIT = 20; // suggestions per request (the server caps a page at 500)
const TASK_SUGGEST_MIN_CHARS = 2;

const taskSuggest = {
  input: null,
  list: null,
  timer: null,
  asked: 0, // the latest request's number: older answers are dropped
  active: -1,

  attach(input) {
    if (this.input === input) return;
    this.input = input;
    input.setAttribute("autocomplete", "off");
    input.setAttribute("role", "combobox");
    input.setAttribute("aria-autocomplete", "list");
    input.setAttribute("aria-controls", "task-suggestions");
    this.list = h("ul", {
      id: "task-suggestions",
      class: "suggestions",
      role: "listbox",
      "data-testid": "task-suggestions",
      hidden: true,
    });
    input.insertAdjacentElement("afterend", this.list);
    input.addEventListener("input", () => this.schedule());
    input.addEventListener("keydown", (event) => this.key(event));
    input.addEventListener("blur", () => setTimeout(() => this.hide(), 150));
  },

  // The entry being typed: tasks is a list split at commas (or lines), so the text after the
  // last separator.
  cut() {
    const value = this.input.value;
    return Math.max(value.lastIndexOf(","), value.lastIndexOf("\n")) + 1;
  },

  current() {
    return this.input.value.slice(this.cut()).trim();
  },

  schedule() {
    clearTimeout(this.timer);
    const query = this.current();
    if (query.length < TASK_SUGGEST_MIN_CHARS) {
      this.hide();
      return;
    }
    this.timer = setTimeout(() => this.fetch(query), TASK_SUGGEST_DELAY_MS);
  },

  async fetch(query) {
    const number = ++this.asked;
    const params = new URLSearchParams({ search: query, limit: String(TASK_SUGGEST_LIMIT) });
    let data;
    try {
      data = await api(`tasks?${params}`);
    } catch (err) {
      if (number === this.asked) this.show([], err.status === 503 ? err.message : null);
      return;
    }
    if (number !== this.asked || this.current() !== query) return;
    this.show(data.tasks, data.total > data.tasks.length ? `${data.total} match` : null);
  },

  show(tasks, note) {
    this.active = -1;
    const items = tasks.map((task) =>
      h(
        "li",
        {
          role: "option",
          "data-testid": "task-suggestion",
          "data-name": task.name,
          onmousedown: (event) => {
            event.preventDefault(); // keep focus in the input
            this.choose(task.name);
          },
        },
        h("span", { class: "mono" }, task.name),
        h(
          "span",
          { class: "muted small" },
          [task.kind, task.output_type, task.source === "upload" ? "uploaded" : null]
            .filter(Boolean)
            .join(" · "),
        ),
      ),
    );
    if (note) items.push(h("li", { class: "muted small note" }, note));
    this.list.replaceChildren(...items);
    // Just below the input (the field also holds its label and help text).
    this.list.style.top = `${this.input.offsetTop + this.input.offsetHeight}px`;
    this.list.hidden = items.length === 0;
    this.input.setAttribute("aria-expanded", String(!this.list.hidden));
  },

  hide() {
    if (!this.list) return;
    this.list.hidden = true;
    this.input.setAttribute("aria-expanded", "false");
  },

  choose(name) {
    const head = this.input.value.slice(0, this.cut());
    this.input.value = `${head}${head && !head.endsWith("\n") ? " " : ""}${name}`;
    this.hide();
    this.input.dispatchEvent(new Event("change", { bubbles: true }));
    this.input.focus();
  },

  key(event) {
    if (this.list.hidden) return;
    const options = [...this.list.querySelectorAll("[role=option]")];
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const step = event.key === "ArrowDown" ? 1 : -1;
      this.active = (this.active + step + options.length) % options.length;
      options.forEach((o, i) => o.setAttribute("aria-selected", String(i === this.active)));
    } else if (event.key === "Enter" && this.active >= 0) {
      event.preventDefault();
      this.choose(options[this.active].dataset.name);
    } else if (event.key === "Escape") {
      this.hide();
    }
  },
};

const taskUpload = {
  built: false,

  build() {
    if (this.built) return;
    this.built = true;
    const files = h("input", {
      id: "task-files",
      type: "file",
      multiple: true,
      accept: ".yaml,.yml,.jsonl,.json,.csv",
      "data-testid": "task-files",
    });
    const message = h("div", { id: "task-upload-message", role: "status", "data-testid": "task-upload-message" });
    const form = h(
      "form",
      { id: "task-upload-form", class: "task-upload", "data-testid": "task-upload-form" },
      h(
        "p",
        { class: "muted small" },
        "One task YAML and the data files it names in dataset_kwargs.data_files ",
        "(.jsonl, .json, .csv). lm-eval loads it before it is stored; jobs then run it by its ",
        "task: name. Only you (and admins) see your uploads.",
      ),
      h("label", { for: "task-files" }, "Files"),
      files,
      h("button", { type: "submit", "data-testid": "task-upload-submit" }, "Upload task"),
      message,
      h("h3", {}, "Your uploaded tasks"),
      h("ul", { id: "task-uploads", class: "uploads", "data-testid": "task-uploads" }),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit(files, message);
    });
    const panel = h(
      "details",
      { id: "task-upload", class: "advanced", "data-testid": "task-upload" },
      h("summary", {}, "Upload a task"),
      form,
    );
    panel.addEventListener("toggle", () => panel.open && this.refresh());
    $("new-view").append(panel);
  },

  async submit(files, message) {
    if (!files.files.length) {
      this.say(message, "Choose a task YAML and its data files first.", true);
      return;
    }
    const body = new FormData();
    for (const file of files.files) body.append("files", file, file.name);
    const headers = { Accept: "application/json" };
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    let response, data;
    try {
      response = await fetch("tasks", { method: "POST", headers, body, cache: "no-store" });
      data = await response.json().catch(() => null);
    } catch (err) {
      this.say(message, `The server is unreachable (${err.message})`, true);
      return;
    }
    if (!response.ok) {
      const detail = data && data.detail !== undefined ? formatDetail(data.detail) : response.statusText;
      this.say(message, `Upload refused (HTTP ${response.status}): ${detail}`, true);
      return;
    }
    const verb = data.replaced ? "Replaced" : "Uploaded";
    this.say(message, `${verb} task ${data.name} (${data.docs} documents).`, false);
    files.value = "";
    const tasksField = $("field-tasks");
    if (tasksField && !tasksField.value.trim()) tasksField.value = data.name;
    this.refresh();
  },

  say(element, text, error) {
    element.textContent = text;
    element.className = error ? "error-box" : "ok-box";
  },

  async refresh() {
    const list = $("task-uploads");
    let data;
    try {
      data = await api(`tasks?${new URLSearchParams({ source: "upload", limit: "500" })}`);
    } catch (err) {
      list.replaceChildren(h("li", { class: "muted" }, err.message));
      return;
    }
    if (!data.tasks.length) {
      list.replaceChildren(h("li", { class: "muted" }, "None yet."));
      return;
    }
    list.replaceChildren(
      ...data.tasks.map((task) =>
        h(
          "li",
          { "data-testid": "task-upload-item", "data-name": task.name },
          h("span", { class: "mono" }, task.name),
          " ",
          h("span", { class: "muted small" }, [task.output_type, task.owner].filter(Boolean).join(" · ")),
          " ",
          h(
            "button",
            {
              type: "button",
              class: "ghost small",
              "data-testid": "task-upload-delete",
              onclick: () => this.remove(task),
            },
            "Delete",
          ),
        ),
      ),
    );
  },

  async remove(task) {
    if (!confirm(`Delete the uploaded task ${task.name}?`)) return;
    const params = new URLSearchParams({ owner: task.owner });
    try {
      await api(`tasks/${encodeURIComponent(task.name)}?${params}`, { method: "DELETE" });
      flash(`Uploaded task ${task.name} deleted.`);
    } catch (err) {
      flash(err.message, "error");
    }
    this.refresh();
  },
};

// The job form is built by app.js from the OpenAPI schema once the page is first opened:
// attach to its tasks field when it appears.
function attachTaskTools() {
  const input = $("field-tasks");
  if (input) taskSuggest.attach(input);
  if (!$("new-view").hidden || input) taskUpload.build();
}

document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(attachTaskTools).observe($("new-view"), {
    childList: true,
    subtree: true,
    attributes: true,
    attributeFilter: ["hidden"],
  });
  attachTaskTools();
});
