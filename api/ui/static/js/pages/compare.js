// #/compare?jobs=a,b,c overlays the curves of several jobs; #/sweeps/{id} those of a sweep's children, with
// the sweep's table ranked by its metric and, for a 2-D grid, a heat-map of the metric over the grid.

import { api, ApiError } from "../api.js";
import { LineChart } from "../charts.js";
import { fmtNumber, fmtTime, h, notice, progressBar, replaceChildren, statusBadge } from "../dom.js";
import { MOVING } from "../states.js";

const REFRESH_MS = 4000;
const METRICS = [
  ["loss", "Training loss"],
  ["kd_loss", "KD loss"],
  ["ce_loss", "CE loss"],
  ["eval_loss", "Eval loss"],
  ["eval_kd_loss", "Eval KD loss"],
  ["eval_ce_loss", "Eval CE loss"],
  ["eval_rouge_l", "Eval ROUGE-L"],
];
const PARAM_SYMBOLS = { "loss.alpha": "α", "loss.lam": "λ" };

function errorText(error) {
  if (error instanceof ApiError) return `${error.message}${error.param ? ` (${error.param})` : ""}`;
  return "The API did not answer.";
}

export function paramLabel(params) {
  return Object.entries(params || {})
    .map(([path, value]) => `${PARAM_SYMBOLS[path] ?? path}=${value}`)
    .join(" ");
}

/**
 * Overlaid curves of `runs` ([{id, label}]), one chart per metric any of them has (`first` leads, e.g. a
 * sweep's ranking metric). Returns {refresh(), destroy()}; refresh fetches each job's points after the
 * last step it holds.
 */
function overlay(parent, runs, first = null) {
  const metrics = first ? [[first, `${first} (ranking)`], ...METRICS.filter(([n]) => n !== first)] : METRICS;
  const box = h("div", { class: "charts", id: "compare-charts" });
  parent.append(box);
  const state = new Map(runs.map((run) => [run.id, { series: {}, maxStep: 0 }]));
  let charts = new Map(); // metric -> LineChart

  function draw() {
    const present = metrics.filter(([name]) => runs.some((run) => (state.get(run.id).series[name] || []).length));
    if (present.map(([n]) => n).join() !== [...charts.keys()].join()) {
      for (const chart of charts.values()) chart.destroy();
      charts = new Map(
        present.map(([name, title]) => [
          name,
          new LineChart(box, {
            id: `compare-${name}`,
            title,
            series: runs.map((run) => ({ key: run.id, label: run.label })),
          }),
        ]),
      );
    }
    for (const [name, chart] of charts) {
      chart.setData(Object.fromEntries(runs.map((run) => [run.id, state.get(run.id).series[name] || []])));
    }
    box.dataset.runs = String(runs.length);
  }

  async function refresh(signal) {
    const names = metrics.map(([n]) => n).join(",");
    await Promise.all(
      runs.map(async (run) => {
        const s = state.get(run.id);
        const { series } = await api(`/v1/jobs/${run.id}/metrics`, { query: { names, from_step: s.maxStep }, signal });
        for (const [name, points] of Object.entries(series)) {
          s.series[name] = (s.series[name] || []).filter((p) => p.step < s.maxStep).concat(points);
        }
        for (const points of Object.values(series)) for (const p of points) s.maxStep = Math.max(s.maxStep, p.step);
      }),
    );
    draw();
  }

  return {
    refresh,
    destroy() {
      for (const chart of charts.values()) chart.destroy();
    },
  };
}

/** Run `work` now and every REFRESH_MS while `moving()` says a job still changes; returns a stop function. */
function live(work, moving, onError) {
  let timer = null;
  let stopped = false;
  const controller = new AbortController();
  async function tick() {
    try {
      await work(controller.signal);
    } catch (error) {
      if (stopped || error.name === "AbortError") return;
      onError(error);
    }
    if (!stopped && moving()) timer = setTimeout(tick, REFRESH_MS);
  }
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
    controller.abort();
  };
}

function picker(selected) {
  const input = h("input", {
    id: "compare-ids",
    name: "jobs",
    placeholder: "job ids, separated by commas",
    value: selected.join(","),
  });
  const list = h("div", { class: "pick-list", id: "pick-list" });
  const sweeps = h("div", { id: "sweep-list" });
  const form = h(
    "form",
    { class: "filters", id: "compare-form" },
    h("label", { for: "compare-ids" }, "Jobs"),
    input,
    h("button", { type: "submit", class: "primary" }, "Compare"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const ids = input.value.split(",").map((s) => s.trim()).filter(Boolean);
    location.hash = `#/compare?jobs=${ids.join(",")}`;
  });
  api("/v1/jobs", { query: { limit: 20 } })
    .then((page) => {
      replaceChildren(
        list,
        page.data.map((job) => {
          const box = h("input", { type: "checkbox", value: job.id, checked: selected.includes(job.id) });
          box.addEventListener("change", () => {
            const ids = input.value.split(",").map((s) => s.trim()).filter(Boolean);
            const next = box.checked ? [...new Set([...ids, job.id])] : ids.filter((id) => id !== job.id);
            input.value = next.join(",");
          });
          return h("label", { class: "pick" }, box, h("span", { class: "mono" }, job.id), statusBadge(job.status));
        }),
      );
    })
    .catch(() => {});
  api("/v1/sweeps", { query: { limit: 20 } })
    .then((page) => {
      replaceChildren(
        sweeps,
        h("h2", {}, "Sweeps"),
        page.data.length
          ? h(
              "ul",
              { class: "plain" },
              page.data.map((sweep) =>
                h(
                  "li",
                  {},
                  h("a", { href: `#/sweeps/${sweep.id}`, class: "mono" }, sweep.id),
                  ` ${sweep.status ?? ""} · ${sweep.metric ?? ""} (${sweep.mode ?? ""}) · ${fmtTime(sweep.created_at)}`,
                ),
              ),
            )
          : h("p", { class: "muted" }, "No sweeps yet."),
      );
    })
    .catch(() => {}); // a server without sweeps shows no sweep list
  return h("section", { class: "card" }, form, list, sweeps);
}

export function renderCompare(main, _params, query) {
  const ids = (query.get("jobs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  const message = h("div", { class: "page-message" });
  const tableBody = h("tbody");
  replaceChildren(main, h("div", { class: "page-head" }, h("h1", {}, "Compare")), picker(ids), message);
  if (!ids.length) {
    main.append(h("p", { class: "muted" }, "Choose jobs above, or open a sweep."));
    return null;
  }
  main.append(
    h(
      "div",
      { class: "table-scroll" },
      h(
        "table",
        { id: "compare-table", class: "cards-on-narrow" },
        h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Loss", "Settings"].map((t) => h("th", {}, t)))),
        tableBody,
      ),
    ),
  );
  const runs = ids.map((id) => ({ id, label: id }));
  const view = overlay(main, runs);
  let jobs = [];
  const stop = live(
    async (signal) => {
      jobs = await Promise.all(ids.map((id) => api(`/v1/jobs/${id}`, { signal })));
      jobs.forEach((job, i) => {
        const loss = job.spec?.loss || {};
        runs[i].label = `${job.id.slice(-6)} ${loss.name ?? ""} α=${loss.alpha ?? "-"} λ=${loss.lam ?? "-"}`;
      });
      replaceChildren(
        tableBody,
        jobs.map((job, i) =>
          h(
            "tr",
            {},
            h("td", { dataset: { label: "Job" } }, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
            h("td", { dataset: { label: "Status" } }, statusBadge(job.status)),
            h("td", { dataset: { label: "Progress" } }, progressBar(job.progress)),
            h("td", { dataset: { label: "Loss" } }, fmtNumber(job.latest_metrics?.loss)),
            h("td", { dataset: { label: "Settings" } }, runs[i].label),
          ),
        ),
      );
      await view.refresh(signal);
      replaceChildren(message);
    },
    () => jobs.some((job) => MOVING.has(job.status)),
    (error) => replaceChildren(message, notice("error", errorText(error))),
  );
  return () => {
    stop();
    view.destroy();
  };
}

/** Children sorted best first by the sweep's metric (`mode` min or max); those without a value last. */
export function rankChildren(sweep) {
  const value = (job) => job.metrics?.[sweep.metric];
  const known = (job) => typeof value(job) === "number";
  const sign = sweep.mode === "max" ? -1 : 1;
  return [...(sweep.jobs || [])].sort((a, b) => {
    if (known(a) !== known(b)) return known(a) ? -1 : 1;
    return known(a) ? sign * (value(a) - value(b)) : 0;
  });
}

function heatMap(sweep) {
  const keys = Object.keys(sweep.grid || {});
  if (keys.length !== 2) return null;
  const [rowKey, colKey] = keys;
  const values = (sweep.jobs || []).map((job) => job.metrics?.[sweep.metric]).filter((v) => typeof v === "number");
  const low = Math.min(...values);
  const high = Math.max(...values);
  const cellOf = (rowValue, colValue) =>
    (sweep.jobs || []).find((job) => job.params?.[rowKey] === rowValue && job.params?.[colKey] === colValue);
  const label = (key) => PARAM_SYMBOLS[key] ?? key;
  return h(
    "div",
    { class: "table-scroll" },
    h(
      "table",
      { class: "heatmap", id: "sweep-heatmap" },
      h("caption", {}, `${sweep.metric} over ${label(rowKey)} (rows) × ${label(colKey)} (columns); darker is better`),
      h("thead", {}, h("tr", {}, h("th", {}, `${label(rowKey)} \\ ${label(colKey)}`), sweep.grid[colKey].map((v) => h("th", {}, v)))),
      h(
        "tbody",
        {},
        sweep.grid[rowKey].map((rowValue) =>
          h(
            "tr",
            {},
            h("th", {}, rowValue),
            sweep.grid[colKey].map((colValue) => {
              const job = cellOf(rowValue, colValue);
              const v = job?.metrics?.[sweep.metric];
              const td = h("td", { title: job?.id ?? "" }, job ? h("a", { href: `#/jobs/${job.id}` }, typeof v === "number" ? fmtNumber(v) : job.status) : "—");
              if (typeof v === "number") {
                const t = high > low ? (v - low) / (high - low) : 1;
                const goodness = sweep.mode === "max" ? t : 1 - t;
                td.style.backgroundColor = `hsl(150 60% ${Math.round(92 - goodness * 55)}%)`;
                if (goodness > 0.6) td.classList.add("dark");
              }
              return td;
            }),
          ),
        ),
      ),
    ),
  );
}

export function renderSweep(main, [sweepId]) {
  const message = h("div", { class: "page-message" });
  const head = h("div", { id: "sweep-head" });
  const tableBox = h("div", { id: "sweep-table-box" });
  const heatBox = h("div", { id: "sweep-heatmap-box" });
  replaceChildren(main, h("div", { class: "page-head" }, h("h1", {}, "Sweep ", h("span", { class: "mono" }, sweepId))), message, head, tableBox, heatBox);
  let view = null;
  let sweep = null;
  const stop = live(
    async (signal) => {
      sweep = await api(`/v1/sweeps/${sweepId}`, { signal });
      const keys = Object.keys(sweep.grid || {});
      const counts = Object.entries(sweep.counts || {})
        .filter(([, n]) => n > 0)
        .map(([k, n]) => `${n} ${k}`)
        .join(", ");
      replaceChildren(
        head,
        h(
          "p",
          {},
          statusBadge(sweep.status),
          ` ${(sweep.jobs || []).length} jobs (${counts || "none yet"}); ranked by ${sweep.metric} (${sweep.mode})`,
          sweep.best ? ` · best ${paramLabel(sweep.best.params)} = ${fmtNumber(sweep.best.value)}` : "",
        ),
      );
      const ranked = rankChildren(sweep);
      replaceChildren(
        tableBox,
        h(
          "div",
          { class: "table-scroll" },
          h(
            "table",
            { id: "sweep-table", class: "cards-on-narrow" },
            h("thead", {}, h("tr", {}, ["#", "Job", "Status", ...keys.map((k) => PARAM_SYMBOLS[k] ?? k), sweep.metric].map((t) => h("th", {}, t)))),
            h(
              "tbody",
              {},
              ranked.map((job, i) =>
                h(
                  "tr",
                  { class: sweep.best?.job_id === job.id ? "best" : "", dataset: { jobId: job.id } },
                  h("td", { dataset: { label: "#" } }, i + 1),
                  h("td", { dataset: { label: "Job" } }, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
                  h("td", { dataset: { label: "Status" } }, statusBadge(job.status)),
                  keys.map((k) => h("td", { dataset: { label: PARAM_SYMBOLS[k] ?? k } }, job.params?.[k] ?? "—")),
                  h("td", { dataset: { label: sweep.metric } }, fmtNumber(job.metrics?.[sweep.metric])),
                ),
              ),
            ),
          ),
        ),
      );
      replaceChildren(heatBox, heatMap(sweep));
      if (!view) {
        view = overlay(
          main,
          (sweep.jobs || []).map((job) => ({ id: job.id, label: paramLabel(job.params) || job.id })),
          sweep.metric,
        );
      }
      await view.refresh(signal);
      replaceChildren(message);
    },
    () => (sweep?.jobs || []).some((job) => MOVING.has(job.status)) || MOVING.has(sweep?.status),
    (error) => replaceChildren(message, notice("error", errorText(error))),
  );
  return () => {
    stop();
    view?.destroy();
  };
}
