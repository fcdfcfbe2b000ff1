// Samples you can read (the job page's sample browser) and comparing runs (tick jobs, then
// Compare). Uses h, api, $, flash and formatNumber from app.js; app.js calls samplesView and
// compareView from the job page, the jobs table and the router.
"use strict";

const SAMPLES_PAGE = 20;
const TEXT_MAX = 600; // characters of a prompt or document shown before "…"

function clip(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  if (text === undefined) return "";
  return text.length > TEXT_MAX ? `${text.slice(0, TEXT_MAX)}…` : text;
}

function verdictBadge(correct) {
  const [label, kind] =
    correct === true ? ["✓ right", "completed"] : correct === false ? ["✗ wrong", "failed"] : ["?", "queued"];
  return h("span", { class: `badge badge-${kind}`, "data-testid": "sample-verdict" }, label);
}

// ---------------------------------------------------------------- sample browser (job page)

const samplesView = {
  jobId: null,
  offset: 0,
  total: 0,
  loading: 0, // bumps per request, so a slow old page never overwrites a newer one

  init() {
    $("samples-task").addEventListener("change", () => this.show(0));
    $("samples-wrong").addEventListener("change", () => this.show(0));
    $("samples-prev").addEventListener("click", () => this.show(Math.max(0, this.offset - SAMPLES_PAGE)));
    $("samples-next").addEventListener("click", () => this.show(this.offset + SAMPLES_PAGE));
  },

  reset() {
    this.jobId = null;
    this.loading++;
    $("samples-section").hidden = true;
    $("samples-task").replaceChildren();
    $("samples-body").replaceChildren();
    $("samples-wrong").checked = false;
  },

  // Called once a job is Completed: shows the browser when the job logged samples.
  async load(jobId) {
    this.jobId = jobId;
    let data;
    try {
      data = await api(`job/${jobId}/samples`);
    } catch (err) {
      return; // no results (e.g. --predict_only): the results section says why
    }
    if (jobId !== this.jobId || !data.tasks.length) return;
    $("samples-task").replaceChildren(...data.tasks.map((t) => h("option", { value: t }, t)));
    $("samples-section").hidden = false;
    await this.show(0);
  },

  async show(offset) {
    const jobId = this.jobId;
    const task = $("samples-task").value;
    if (jobId === null || !task) return;
    const ticket = ++this.loading;
    const params = new URLSearchParams({ task, offset, limit: SAMPLES_PAGE, format: "json" });
    if ($("samples-wrong").checked) params.set("incorrect", "true");
    let page;
    try {
      page = await api(`job/${jobId}/samples?${params}`);
    } catch (err) {
      flash(err.message, "error");
      return;
    }
    if (ticket !== this.loading) return;
    this.offset = page.offset;
    this.total = page.total;
    $("samples-body").replaceChildren(...page.samples.map(sampleRow));
    const end = page.offset + page.samples.length;
    const what = $("samples-wrong").checked ? "wrong answers" : "samples";
    $("samples-range").textContent = page.total
      ? `${page.offset + 1}–${end} of ${page.total} ${what}`
      : `no ${what}`;
    $("samples-prev").disabled = page.offset === 0;
    $("samples-next").disabled = page.next_offset === null;
  },
};

function sampleRow(s) {
  const metrics = Object.entries(s.metrics)
    .map(([name, value]) => `${name}=${typeof value === "number" ? formatNumber(value) : clip(value)}`)
    .join(" ");
  const mc = s.multiple_choice;
  return h(
    "tr",
    { "data-testid": "sample-row", dataset: { docId: s.doc_id ?? "", correct: String(s.correct) } },
    h("td", { class: "num mono" }, s.doc_id ?? "—"),
    h("td", {}, h("pre", { class: "sample-text", title: clip(s.doc) }, clip(s.prompt ?? s.doc ?? s.error))),
    h("td", { class: "mono", "data-testid": "sample-target" }, mc ? mcTarget(mc, s.target) : clip(s.target)),
    h("td", { class: "mono", "data-testid": "sample-response" }, mc ? mcChoices(mc) : clip(s.responses)),
    h("td", { class: "mono small" }, metrics),
    h("td", {}, verdictBadge(s.correct)),
  );
}

// A multiple-choice sample: lm-eval scored each choice by its log-likelihood; its pick is the
// highest (acc), the target is the right one.
function mcTarget(mc, target) {
  if (mc.target === null) return clip(target);
  return h(
    "span",
    { title: `lm-eval's target: ${clip(target)}` },
    h("strong", {}, clip(mc.choices[mc.target].text.trim())),
    h("span", { class: "muted" }, ` (choice ${mc.target})`),
  );
}

function mcChoices(mc) {
  const items = mc.choices.map((choice, i) => {
    const marks = [];
    if (i === mc.pick) marks.push("picked");
    if (i === mc.pick_norm && mc.pick_norm !== mc.pick) marks.push("picked by acc_norm");
    if (i === mc.target) marks.push("right");
    const kind = i === mc.pick ? (i === mc.target ? "mc-hit" : "mc-miss") : i === mc.target ? "mc-right" : "";
    return h(
      "li",
      {
        class: `mc-choice ${kind}`,
        "data-testid": "mc-choice",
        dataset: { pick: String(i === mc.pick), target: String(i === mc.target) },
      },
      h("span", { class: "mc-text" }, clip(choice.text.trim()) || "␣"),
      h("span", { class: "mc-ll num", "data-testid": "mc-ll" }, choice.loglikelihood.toFixed(3)),
      marks.length ? h("span", { class: "mc-mark" }, marks.join(", ")) : null,
    );
  });
  return h("ol", { class: "mc-choices", start: 0, title: "log-likelihood of each choice" }, items);
}

// ---------------------------------------------------------------- compare (jobs table + view)

const compareView = {
  picked: new Set(), // job ids ticked in the jobs table, in the order they were ticked
  jobs: [],

  init() {
    $("compare-button").addEventListener("click", () => {
      location.hash = `#/compare?jobs=${[...this.picked].join(",")}`;
    });
    this.updateButton();
  },

  // The jobs table's first cell: a tick box that survives the table's re-renders.
  cell(job) {
    const box = h("input", {
      type: "checkbox",
      "data-testid": "compare-pick",
      "aria-label": `compare job ${job.job_id}`,
      title: job.status === "Completed" ? "Tick to compare" : "Only Completed jobs compare",
      disabled: job.status !== "Completed",
      checked: this.picked.has(job.job_id),
      onchange: (event) => {
        if (event.target.checked) this.picked.add(job.job_id);
        else this.picked.delete(job.job_id);
        this.updateButton();
      },
    });
    return h("td", { class: "pick" }, box);
  },

  updateButton() {
    const n = this.picked.size;
    $("compare-button").disabled = n < 2;
    $("compare-button").textContent = n ? `Compare (${n})` : "Compare";
  },

  open(ids) {
    this.jobs = ids;
    $("compare-title").textContent = ids.map((id) => `#${id}`).join(" · ");
    $("compare-body").replaceChildren();
    $("compare-head").replaceChildren();
    $("compare-markdown").textContent = "";
    $("compare-chart").replaceChildren();
    $("compare-verdicts").replaceChildren();
    $("compare-warnings").hidden = true;
    $("compare-error").hidden = true;
  },

  async refresh() {
    const jobs = this.jobs.join(",");
    let data, markdown;
    try {
      data = await api(`compare?jobs=${jobs}`);
      markdown = await api(`compare?jobs=${jobs}&format=markdown`);
    } catch (err) {
      $("compare-error").textContent = err.message;
      $("compare-error").hidden = false;
      return false;
    }
    const head = ["Task", "Filter", "Metric"];
    data.jobs.forEach((id, i) => head.push(`#${id}`, ...(i ? [`Δ #${id}`, `p #${id}`] : [])));
    $("compare-head").replaceChildren(
      h("tr", {}, head.map((label, i) => h("th", { class: i > 2 ? "num" : null }, label))),
    );
    $("compare-body").replaceChildren(...data.rows.map((row) => compareRow(data.jobs, row)));
    $("compare-markdown").textContent = markdown;
    await compareExtras(data); // gates.js: the chart, warnings and verdicts
    return false; // Completed jobs do not change: nothing to poll
  },
};

function compareRow(jobs, row) {
  const cells = [
    h("td", { class: "mono" }, row.task),
    h("td", { class: "mono" }, row.filter),
    h("td", { class: "mono" }, row.metric),
  ];
  jobs.forEach((id, i) => {
    const value = row.values[i];
    const stderr = row.stderrs[i];
    const text =
      value === null ? "—" : typeof stderr === "number" ? `${formatNumber(value)} ± ${formatNumber(stderr)}` : formatNumber(value);
    cells.push(h("td", { class: "num", "data-testid": "compare-value" }, text));
    if (i) {
      const delta = row.deltas[i];
      const significant = row.significant[i];
      cells.push(
        h(
          "td",
          {
            class: `num${significant ? " significant" : ""}`,
            "data-testid": "compare-delta",
            dataset: { significant: String(significant) },
            title: significant ? testText(row.tests[i], row.p_values[i], row.n_paired[i], row.discordant[i]) : null,
          },
          delta === null ? "—" : `${delta >= 0 ? "+" : ""}${delta.toFixed(4)}${significant ? " *" : ""}`,
        ),
        h(
          "td",
          {
            class: "num small nowrap",
            "data-testid": "compare-test",
            dataset: { test: row.tests[i] ?? "" },
            title: testText(row.tests[i], row.p_values[i], row.n_paired[i], row.discordant[i]) || null,
          },
          testShort(row.tests[i], row.p_values[i], row.n_paired[i], row.discordant[i]) || "—",
        ),
      );
    }
  });
  return h("tr", { "data-testid": "compare-row", dataset: { task: row.task, metric: row.metric } }, cells);
}

document.addEventListener("DOMContentLoaded", () => {
  samplesView.init();
  compareView.init();
});
