// The job page's reproduction: a Reproduce button on finished jobs, and on a reproduction its
// per-sample diff against the original (a bar of identical / differing / unpaired samples, the
// metric deltas and the first differing samples). Uses h, svg, api, $, flash, formatNumber, hooks,
// TERMINAL and jobView from app.js.
"use strict";

function shown(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text === undefined ? "" : text;
}

const reproduceView = {
  shownFor: null, // the reproduction last drawn, so a poll does not redraw an unchanged diff

  init() {
    $("reproduce-button").addEventListener("click", () => this.reproduce());
    hooks.jobPanels.push((job) => this.render(job));
  },

  async reproduce() {
    const id = jobView.id;
    try {
      const data = await api(`job/${id}/reproduce`, { method: "POST" });
      flash(data.message);
      location.hash = `#/job/${data.job_id}`;
    } catch (err) {
      flash(err.message, "error");
    }
  },

  render(job) {
    $("reproduce-button").hidden = !TERMINAL.has(job.status);
    const section = $("reproduction-section");
    const rep = job.reproduction;
    const key = rep ? `${job.job_id}:${JSON.stringify(rep)}` : null;
    if (key === this.shownFor) return;
    this.shownFor = key;
    section.hidden = !rep;
    section.replaceChildren(...(rep ? this.content(rep) : []));
  },

  content(rep) {
    const title = h(
      "h2",
      {},
      "Reproduction of ",
      h("a", { href: `#/job/${rep.of}`, "data-testid": "reproduction-of" }, `job ${rep.of}`),
    );
    if (rep.state === "pending") {
      return [title, h("p", { class: "muted" }, "The answers are compared when this job ends.")];
    }
    if (rep.state === "unavailable") {
      return [title, h("p", { class: "muted", "data-testid": "reproduction-note" }, rep.note)];
    }
    const unpaired = rep.only_original + rep.only_reproduction;
    const same = rep.differing === 0 && unpaired === 0;
    title.append(
      h(
        "span",
        { class: `badge badge-${same ? "completed" : "failed"}`, "data-testid": "reproduction-verdict" },
        same ? "identical" : "differs",
      ),
    );
    const parts = [title, this.bar(rep)];
    parts.push(
      h(
        "p",
        { "data-testid": "reproduction-counts" },
        `${rep.identical} identical · ${rep.differing} differing`,
        unpaired ? ` · ${rep.only_original} only in the original · ${rep.only_reproduction} only here` : "",
      ),
    );
    if (rep.note) parts.push(h("p", { class: "muted" }, rep.note));
    if (rep.metric_deltas.length) parts.push(this.deltas(rep.metric_deltas));
    if (rep.examples.length) parts.push(this.examples(rep.examples));
    return parts;
  },

  // One bar, drawn as SVG rects (no inline style: the page's CSP forbids it).
  bar(rep) {
    const counts = [
      ["identical", rep.identical],
      ["differing", rep.differing],
      ["unpaired", rep.only_original + rep.only_reproduction],
    ];
    const total = counts.reduce((sum, [, n]) => sum + n, 0) || 1;
    let x = 0;
    const rects = counts.map(([kind, n]) => {
      const width = (100 * n) / total;
      const rect = svg("rect", { class: kind, x: `${x}%`, y: 0, width: `${width}%`, height: 14 });
      rect.append(svg("title", {}, `${n} ${kind}`));
      x += width;
      return rect;
    });
    return svg(
      "svg",
      { class: "repro-bar", role: "img", "aria-label": `${rep.identical} identical, ${rep.differing} differing`, "data-testid": "reproduction-bar" },
      ...rects,
    );
  },

  deltas(rows) {
    return h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { "data-testid": "reproduction-deltas" },
        h(
          "thead",
          {},
          h("tr", {}, ...["Task", "Filter", "Metric"].map((t) => h("th", {}, t)),
            ...["Original", "Reproduction", "Δ", "Samples changed"].map((t) => h("th", { class: "num" }, t))),
        ),
        h(
          "tbody",
          {},
          ...rows.map((d) =>
            h(
              "tr",
              { "data-testid": "reproduction-delta" },
              h("td", { class: "mono" }, d.task),
              h("td", { class: "mono" }, d.filter),
              h("td", { class: "mono" }, d.metric),
              h("td", { class: "num" }, formatNumber(d.original)),
              h("td", { class: "num" }, formatNumber(d.reproduction)),
              h("td", { class: d.delta ? "num changed" : "num" }, formatNumber(d.delta)),
              h("td", { class: "num" }, formatNumber(d.samples_differing ?? 0)),
            ),
          ),
        ),
      ),
    );
  },

  examples(examples) {
    return h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { "data-testid": "reproduction-examples" },
        h(
          "thead",
          {},
          h("tr", {}, h("th", {}, "Task"), h("th", { class: "num" }, "Doc"),
            h("th", {}, "Original answer"), h("th", {}, "This run's answer"), h("th", {}, "Metrics (original → this run)")),
        ),
        h(
          "tbody",
          {},
          ...examples.map((e) =>
            h(
              "tr",
              { "data-testid": "reproduction-example" },
              h("td", { class: "mono" }, e.task),
              h("td", { class: "num" }, String(e.doc_id)),
              h("td", { class: "mono" }, shown(e.original.responses)),
              h("td", { class: "mono changed" }, shown(e.reproduction.responses)),
              h("td", { class: "mono" }, `${shown(e.original.metrics)} → ${shown(e.reproduction.metrics)}`),
            ),
          ),
        ),
      ),
    );
  },
};

document.addEventListener("DOMContentLoaded", () => reproduceView.init());
