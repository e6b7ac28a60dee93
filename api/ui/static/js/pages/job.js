// #/jobs/{id}: one job, live. The event log comes from the SSE stream (resumed with Last-Event-ID); each
// event of note (status, checkpoint, evaluation, a resumed start) refreshes what it concerns, and while the
// job moves a timer fetches its progress and the metric points after the last step plotted.

import { api, ApiError, download, streamEvents } from "../api.js";
import { LineChart } from "../charts.js";
import {
  fmtBytes,
  fmtDuration,
  fmtNumber,
  fmtTime,
  h,
  modelName,
  notice,
  progressBar,
  replaceChildren,
  statusBadge,
  studentLabel,
} from "../dom.js";
import { ENDED, MOVING } from "../states.js";

const POLL_MS = 2000;
const PAUSED_POLL_MS = 10000;

export const JOB_CHARTS = [
  {
    id: "chart-loss",
    title: "Training loss",
    series: [{ key: "loss" }, { key: "kd_loss" }, { key: "ce_loss" }],
  },
  { id: "chart-lr", title: "Learning rate", series: [{ key: "lr" }] },
  { id: "chart-grad-norm", title: "Gradient norm", series: [{ key: "grad_norm" }] },
  { id: "chart-tokens", title: "Tokens per second", series: [{ key: "tokens_per_s", label: "tokens/s" }] },
  {
    id: "chart-eval",
    title: "Evaluation",
    scales: { loss: { label: "loss" }, score: { label: "ROUGE-L", side: 1 } },
    series: [
      { key: "eval_loss", scale: "loss" },
      { key: "eval_kd_loss", scale: "loss" },
      { key: "eval_ce_loss", scale: "loss" },
      { key: "eval_rouge_l", scale: "score", label: "ROUGE-L" },
    ],
  },
];

function errorText(error) {
  if (error instanceof ApiError) return `${error.message}${error.param ? ` (${error.param})` : ""}`;
  return "The API did not answer.";
}

function summary(job) {
  const spec = job.spec || {};
  const loss = spec.loss || {};
  const rows = [
    ["Teacher", modelName(spec.teacher?.model)],
    ["Student", studentLabel(spec.student)],
    ["Loss", `${loss.name ?? "amid"}${loss.alpha !== undefined ? ` α=${loss.alpha}` : ""}${loss.lam !== undefined ? ` λ=${loss.lam}` : ""}`],
    ["Data", `${spec.data?.train ?? "—"}${spec.data?.eval ? ` / eval ${spec.data.eval}` : ""}`],
    ["Created", fmtTime(job.created_at)],
    ["Started", fmtTime(job.started_at)],
    ["Finished", fmtTime(job.finished_at)],
    ["Attempts", `${job.attempts} of ${job.max_attempts}`],
  ];
  if (job.sweep_id) rows.push(["Sweep", h("a", { href: `#/sweeps/${job.sweep_id}` }, job.sweep_id)]);
  for (const [key, value] of Object.entries(job.metadata || {})) rows.push([`metadata ${key}`, value]);
  return h("dl", { class: "summary" }, rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

export function renderJob(main, [jobId]) {
  const controller = new AbortController();
  const state = { job: null, series: {}, maxStep: 0, samples: new Map(), events: 0, stopped: false };
  let timer = null;

  const title = h("h1", { class: "mono" }, jobId);
  const badge = h("span", { id: "job-status" });
  const actionMessage = h("div", { class: "page-message", id: "action-message" });
  const buttons = {
    cancel: h("button", { type: "button", id: "cancel-job" }, "Cancel"),
    pause: h("button", { type: "button", id: "pause-job" }, "Pause"),
    resume: h("button", { type: "button", id: "resume-job" }, "Resume"),
    student: h("button", { type: "button", id: "download-student", class: "primary" }, "Download student"),
  };
  const progress = h("div", { class: "job-progress", id: "job-progress" });
  const summaryBox = h("div", { id: "job-summary" });
  const errorBox = h("div", { id: "job-error" });
  const chartsBox = h("div", { class: "charts", id: "job-charts" });
  const eventsList = h("ol", { class: "event-log", id: "event-log", dataset: { count: "0" }, reversed: true });
  const streamState = h("span", { class: "muted", id: "stream-state" }, "connecting…");
  const checkpointsBody = h("tbody");
  const samplesBox = h("div", { id: "samples" }, h("p", { class: "muted" }, "No evaluation yet."));
  const specBox = h("pre", { class: "spec", id: "job-spec" });

  replaceChildren(
    main,
    h(
      "div",
      { class: "page-head" },
      title,
      badge,
      h(
        "div",
        { class: "actions" },
        Object.values(buttons),
        h("a", { href: `#/compare?jobs=${jobId}`, class: "button" }, "Compare"),
      ),
    ),
    actionMessage,
    progress,
    errorBox,
    summaryBox,
    h("section", {}, h("h2", {}, "Curves"), chartsBox),
    h(
      "div",
      { class: "columns" },
      h("section", {}, h("h2", {}, "Events ", streamState), h("div", { class: "scroll-box" }, eventsList)),
      h(
        "section",
        {},
        h("h2", {}, "Checkpoints"),
        h(
          "div",
          { class: "table-scroll" },
          h(
            "table",
            { id: "checkpoints-table" },
            h("thead", {}, h("tr", {}, ["Step", "Size", "Loss", "Saved", ""].map((t) => h("th", {}, t)))),
            checkpointsBody,
          ),
        ),
      ),
    ),
    h("section", {}, h("h2", {}, "Sample generations"), samplesBox),
    h("details", { class: "spec-box" }, h("summary", {}, "Spec"), specBox),
  );
  const charts = JOB_CHARTS.map((def) => new LineChart(chartsBox, def));

  function showJob(job) {
    state.job = job;
    replaceChildren(badge, statusBadge(job.status));
    replaceChildren(
      progress,
      progressBar(job.progress),
      h("span", { class: "muted" }, `ETA ${fmtDuration(job.progress?.eta_seconds)}`),
      h("span", { class: "muted" }, `loss ${fmtNumber(job.latest_metrics?.loss)}`),
    );
    replaceChildren(errorBox, job.error ? notice("error", `${job.error.code}: ${job.error.message}`) : null);
    replaceChildren(summaryBox, summary(job));
    const text = JSON.stringify(job.spec, null, 2);
    if (specBox.textContent !== text) specBox.textContent = text;
    buttons.cancel.disabled = ENDED.has(job.status) || job.status === "cancelling";
    buttons.pause.disabled = !["queued", "running"].includes(job.status);
    buttons.resume.disabled = !["failed", "cancelled", "paused"].includes(job.status);
    buttons.student.disabled = job.status !== "succeeded";
  }

  async function loadJob() {
    showJob(await api(`/v1/jobs/${jobId}`, { signal: controller.signal }));
  }

  async function loadMetrics(fromScratch = false) {
    const from = fromScratch ? 0 : state.maxStep;
    const { series } = await api(`/v1/jobs/${jobId}/metrics`, { query: { from_step: from }, signal: controller.signal });
    if (fromScratch) state.series = {};
    // Points at `from` and after are replaced: the step last seen may have gained its evaluation since.
    for (const [name, points] of Object.entries(series)) {
      const kept = (state.series[name] || []).filter((p) => p.step < from);
      state.series[name] = kept.concat(points);
      for (const point of points) state.maxStep = Math.max(state.maxStep, point.step);
    }
    for (const chart of charts) chart.setData(state.series);
  }

  async function loadCheckpoints() {
    const page = await api(`/v1/jobs/${jobId}/checkpoints`, { signal: controller.signal });
    replaceChildren(
      checkpointsBody,
      page.data.length
        ? page.data.map((c) => {
            const button = h("button", { type: "button", class: "small", dataset: { step: c.step } }, "Download");
            button.addEventListener("click", () => act(button, () => download(c.download_url, `${jobId}-step-${c.step}.tar.gz`)));
            return h(
              "tr",
              {},
              h("td", {}, c.step),
              h("td", {}, fmtBytes(c.size_bytes)),
              h("td", {}, fmtNumber(c.metrics?.loss)),
              h("td", {}, fmtTime(c.created_at)),
              h("td", {}, button),
            );
          })
        : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No checkpoint yet.")),
    );
  }

  function showSamples(step) {
    const steps = [...state.samples.keys()].sort((a, b) => a - b);
    if (!steps.length) return;
    const selected = step ?? steps[steps.length - 1];
    const select = h(
      "select",
      { id: "samples-step", "aria-label": "evaluation step" },
      steps.map((s) => h("option", { value: s, selected: s === selected }, `step ${s}`)),
    );
    select.addEventListener("change", () => showSamples(Number(select.value)));
    const samples = state.samples.get(selected) || [];
    replaceChildren(
      samplesBox,
      h("label", { for: "samples-step" }, "Evaluation at "),
      select,
      samples.length
        ? samples.map((s) =>
            h(
              "article",
              { class: "sample" },
              h("h3", {}, "Prompt"),
              h("p", {}, s.prompt),
              h("h3", {}, "Reference"),
              h("p", {}, s.reference),
              h("h3", {}, "Student"),
              h("p", { class: "generated" }, s.generated),
            ),
          )
        : h("p", { class: "muted" }, "This evaluation logged no samples."),
    );
  }

  function onEvent({ data }) {
    if (!data || typeof data !== "object") return;
    state.events += 1;
    eventsList.dataset.count = String(state.events);
    eventsList.prepend(
      h(
        "li",
        { dataset: { kind: data.kind, id: data.id } },
        h("time", { datetime: data.created_at }, new Date(data.created_at).toLocaleTimeString()),
        h("span", { class: `kind kind-${data.kind}` }, data.kind),
        data.step !== null && data.step !== undefined ? h("span", { class: "muted" }, `step ${data.step}`) : null,
        h("span", { class: "message" }, data.message),
      ),
    );
    const quiet = (promise) => promise.catch(() => {});
    if (data.kind === "status") quiet(loadJob());
    if (data.kind === "checkpoint" || data.kind === "resume") quiet(loadCheckpoints());
    if (data.kind === "eval" && data.data) {
      state.samples.set(data.data.step, data.data.samples || []);
      showSamples();
      quiet(loadMetrics());
    }
    if (data.kind === "start" && data.data?.start_step > 0) quiet(loadMetrics(true));
  }

  function stream() {
    streamEvents(`/v1/jobs/${jobId}/events?stream=true`, {
      signal: controller.signal,
      onEvent,
      onState: (s) => {
        streamState.textContent = { open: "live", reconnecting: "reconnecting…", closed: "ended" }[s] || s;
        streamState.dataset.state = s;
      },
      reconnect: async () => {
        await loadJob().catch(() => {});
        return !ENDED.has(state.job?.status);
      },
    });
  }

  async function tick() {
    timer = null;
    if (state.stopped) return;
    const before = state.job?.status;
    try {
      await loadJob();
      if (MOVING.has(state.job.status) || MOVING.has(before)) await loadMetrics();
      if (ENDED.has(state.job.status) && !ENDED.has(before)) {
        await Promise.all([loadMetrics(), loadCheckpoints()]);
      }
    } catch (error) {
      if (error.name === "AbortError" || state.stopped) return;
    }
    schedule();
  }

  function schedule() {
    if (state.stopped || timer || !state.job || ENDED.has(state.job.status)) return;
    timer = setTimeout(tick, MOVING.has(state.job.status) ? POLL_MS : PAUSED_POLL_MS);
  }

  async function act(button, work, after) {
    button.disabled = true;
    replaceChildren(actionMessage);
    try {
      const result = await work();
      if (after) await after(result);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404 && error.code === "not_found") {
        replaceChildren(actionMessage, notice("error", "This server does not offer that action."));
      } else {
        replaceChildren(actionMessage, notice("error", errorText(error)));
      }
    } finally {
      if (state.job) showJob(state.job);
    }
  }

  const changeStatus = (action) => () =>
    act(
      buttons[action],
      () => api(`/v1/jobs/${jobId}/${action}`, { method: "POST" }),
      (job) => {
        const wasEnded = ENDED.has(state.job?.status);
        showJob(job);
        replaceChildren(actionMessage, notice("info", `${action}: the job is ${job.status}.`));
        if (wasEnded && !ENDED.has(job.status)) stream(); // a resumed job streams again
        schedule();
      },
    );
  buttons.cancel.addEventListener("click", changeStatus("cancel"));
  buttons.pause.addEventListener("click", changeStatus("pause"));
  buttons.resume.addEventListener("click", changeStatus("resume"));
  buttons.student.addEventListener("click", () =>
    act(buttons.student, () => download(`/v1/jobs/${jobId}/student`, `${jobId}-student.tar.gz`)),
  );

  (async () => {
    try {
      await loadJob();
      await Promise.all([loadMetrics(true), loadCheckpoints()]);
    } catch (error) {
      if (error.name === "AbortError") return;
      replaceChildren(main, notice("error", errorText(error)), h("a", { href: "#/jobs" }, "Back to the jobs"));
      state.stopped = true;
      return;
    }
    stream();
    schedule();
  })();

  return () => {
    state.stopped = true;
    clearTimeout(timer);
    controller.abort();
    for (const chart of charts) chart.destroy();
  };
}
