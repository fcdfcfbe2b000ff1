// Pictures for verdicts: the compare view's chart (each metric per job with its 95 % interval,
// the paired significant differences marked), the compare view's warnings and gate verdicts,
// and a job page's verdict. The SVG is built here, element by element (no charting library,
// nothing from a CDN), with textContent only: task and metric names come from any submitter.
// Uses h, svg, api, $, hooks and formatNumber from app.js; samples.js's compareView calls
// compareExtras.
"use strict";

const Z95 = 1.96;

function isNumber(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function formatP(p) {
  if (!isNumber(p)) return "—";
  return p < 0.001 ? p.toExponential(1) : p.toPrecision(2);
}

const TEST_NAMES = { mcnemar: "McNemar", paired_t: "paired t", unpaired_z: "unpaired z" };

// "p = 6.1e-5 (McNemar, 15 regressed / 0 improved of 200)"
function testText(test, p, nPaired, discordant) {
  if (!test) return "";
  let detail = TEST_NAMES[test] || test;
  if (discordant) detail += `, ${discordant.regressed} regressed / ${discordant.improved} improved of ${nPaired}`;
  else if (nPaired !== null && nPaired !== undefined) detail += `, ${nPaired} paired`;
  return `p = ${formatP(p)} (${detail})`;
}

// The table's cell: "6.1e-5 McNemar 15/0 of 200" (regressed/improved of n).
function testShort(test, p, nPaired, discordant) {
  if (!test) return "";
  const counts = discordant ? ` ${discordant.regressed}/${discordant.improved} of ${nPaired}` : "";
  return `${formatP(p)} ${TEST_NAMES[test] || test}${counts}`;
}

// ---------------------------------------------------------------- the compare chart

const CHART = { width: 820, label: 70, right: 230, lane: 22, head: 26, gap: 14 };

function niceTicks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function compareChart(data) {
  const rows = data.rows.filter((row) => row.values.some(isNumber));
  if (!rows.length) return null;
  const { width, label, right, lane, head, gap } = CHART;
  const plotW = width - label - right;
  const height = rows.reduce((y, row) => y + head + lane * data.jobs.length + gap, 8);
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    className: "chart",
    "data-testid": "compare-chart-svg",
    "aria-label": "Each metric per job with its 95% interval",
  });
  let y = 4;
  for (const row of rows) {
    const spans = row.values.map((v, i) => {
      const se = row.stderrs[i];
      if (!isNumber(v)) return null;
      const half = isNumber(se) ? Z95 * se : 0;
      return { v, lo: v - half, hi: v + half };
    });
    const known = spans.filter(Boolean);
    let lo = Math.min(...known.map((s) => s.lo));
    let hi = Math.max(...known.map((s) => s.hi));
    if (hi - lo < 1e-9) [lo, hi] = [lo - 0.05, hi + 0.05];
    const pad = (hi - lo) * 0.05;
    [lo, hi] = [lo - pad, hi + pad];
    const x = (v) => label + ((v - lo) / (hi - lo)) * plotW;
    const group = svg("g", {
      "data-testid": "chart-metric",
      "data-task": row.task,
      "data-metric": row.metric,
    });
    const filter = row.filter && row.filter !== "none" ? ` (${row.filter})` : "";
    group.append(svg("text", { x: 0, y: y + 14, className: "chart-title" }, `${row.task} · ${row.metric}${filter}`));
    const top = y + head;
    const bottom = top + lane * data.jobs.length;
    for (const t of niceTicks(lo, hi)) {
      group.append(
        svg("line", { x1: x(t), x2: x(t), y1: top - 4, y2: bottom, className: "chart-grid" }),
        svg("text", { x: x(t), y: top - 7, className: "chart-tick", "text-anchor": "middle" }, formatNumber(t)),
      );
    }
    if (spans[0]) {
      // The base's value, carried down the lanes: where "no difference" lies.
      group.append(svg("line", { x1: x(spans[0].v), x2: x(spans[0].v), y1: top, y2: bottom, className: "chart-base" }));
    }
    data.jobs.forEach((job, i) => {
      const cy = top + lane * i + lane / 2;
      const span = spans[i];
      const point = svg("g", { "data-testid": "chart-point", "data-job": job });
      point.append(svg("text", { x: label - 8, y: cy + 4, className: "chart-job", "text-anchor": "end" }, `#${job}`));
      if (span) {
        const significant = i > 0 && row.significant[i] === true;
        const up = (row.deltas[i] ?? 0) > 0;
        const kind = significant ? (up ? "sig-up" : "sig-down") : i === 0 ? "base" : "plain";
        const title = [
          `#${job}: ${formatNumber(span.v)}` + (span.hi > span.v ? ` [${formatNumber(span.lo)}, ${formatNumber(span.hi)}]` : ""),
          i > 0 ? testText(row.tests[i], row.p_values[i], row.n_paired[i], row.discordant[i]) : "base",
        ].join("\n");
        point.append(
          svg("title", {}, title),
          svg("line", { x1: x(span.lo), x2: x(span.hi), y1: cy, y2: cy, className: `chart-ci ${kind}` }),
          svg("line", { x1: x(span.lo), x2: x(span.lo), y1: cy - 5, y2: cy + 5, className: `chart-ci ${kind}` }),
          svg("line", { x1: x(span.hi), x2: x(span.hi), y1: cy - 5, y2: cy + 5, className: `chart-ci ${kind}` }),
          svg("circle", { cx: x(span.v), cy, r: significant ? 6 : 4.5, className: `chart-dot ${kind}` }),
        );
        if (i > 0) {
          const mark = significant ? `${up ? "▲" : "▼"} ` : "";
          const note = `${mark}${row.deltas[i] === null ? "" : (row.deltas[i] >= 0 ? "+" : "") + row.deltas[i].toFixed(4)}  p ${formatP(row.p_values[i])}`;
          point.append(
            svg(
              "text",
              {
                x: label + plotW + 12,
                y: cy + 4,
                className: `chart-note ${kind}`,
                "data-testid": significant ? "chart-significant" : "chart-note",
              },
              note + (row.tests[i] ? ` ${TEST_NAMES[row.tests[i]] || row.tests[i]}` : ""),
            ),
          );
        }
      }
      group.append(point);
    });
    chart.append(group);
    y = bottom + gap;
  }
  return chart;
}

// ---------------------------------------------------------------- verdicts

function verdictPanel(verdict, caption) {
  const passed = verdict.passed === true;
  const head = h(
    "div",
    { class: "verdict-head" },
    h(
      "span",
      { class: `badge badge-${passed ? "completed" : "failed"}`, "data-testid": "verdict-badge" },
      passed ? "✓ gate passed" : "✗ gate failed",
    ),
    h("span", { class: "muted" }, caption || (verdict.baseline ? `against job #${verdict.baseline}` : "")),
  );
  const rows = verdict.rules.map((c) =>
    h(
      "tr",
      { "data-testid": "verdict-rule", dataset: { passed: String(c.passed), kind: c.kind } },
      h("td", {}, h("span", { class: `badge badge-${c.passed ? "completed" : "failed"}` }, c.passed ? "pass" : "fail")),
      h("td", { class: "mono" }, c.kind),
      h("td", {}, c.reason),
      h("td", { class: "num mono small" }, c.test ? testText(c.test, c.p_value, c.n_paired, c.discordant) : ""),
    ),
  );
  return h(
    "div",
    { class: `verdict ${passed ? "passed" : "failed"}`, "data-testid": "verdict", dataset: { passed: String(passed) } },
    head,
    verdict.error ? h("pre", { class: "error-box", "data-testid": "verdict-error" }, verdict.error) : null,
    rows.length
      ? h(
          "table",
          { class: "results verdict-rules" },
          h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "Rule"), h("th", {}, "Check"), h("th", { class: "num" }, "Test"))),
          h("tbody", {}, rows),
        )
      : null,
    ...(verdict.warnings || []).map((w) => h("p", { class: "warning small" }, `⚠ ${w.message}`)),
  );
}

function showJobVerdict(job) {
  const section = $("verdict-section");
  if (!job.verdict) {
    section.hidden = true;
    $("verdict-body").replaceChildren();
    return;
  }
  $("verdict-body").replaceChildren(verdictPanel(job.verdict));
  section.hidden = false;
}

// The compare view's chart, warnings and the verdicts of gates taken against its first job.
async function compareExtras(data) {
  const chart = compareChart(data);
  $("compare-chart").replaceChildren(...(chart ? [chart] : []));
  $("compare-warnings").replaceChildren(
    ...(data.warnings || []).map((w) => h("li", { "data-testid": "compare-warning" }, w.message)),
  );
  $("compare-warnings").hidden = !(data.warnings || []).length;
  const base = data.jobs[0];
  const panels = [];
  for (const id of data.jobs.slice(1)) {
    let job;
    try {
      job = await api(`job/${id}`);
    } catch (err) {
      continue;
    }
    if (job.verdict && job.verdict.baseline === base) {
      panels.push(verdictPanel(job.verdict, `job #${id}'s gate, against job #${base}`));
    }
  }
  $("compare-verdicts").replaceChildren(...panels);
}

hooks.jobPanels.push(showJobVerdict);
