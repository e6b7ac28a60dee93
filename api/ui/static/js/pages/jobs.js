// #/jobs: the live table of jobs (refreshed every few seconds), filtered by status and metadata, in cursor
// pages. The best evaluation of each job is read from its metric series, again only when the job changed.

import { api, ApiError } from "../api.js";
import {
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
import { stateSelect } from "../states.js";

const REFRESH_MS = 3000;
const PAGE_SIZE = 20;
const bestCache = new Map(); // job id -> {updatedAt, best}

/** "team=nlp, run=3" -> [["team", "nlp"], ["run", "3"]]; null when a part is not key=value. */
export function parseMetadataFilter(text) {
  const pairs = [];
  for (const part of (text || "").split(",")) {
    const item = part.trim();
    if (!item) continue;
    const eq = item.indexOf("=");
    if (eq <= 0) return null;
    pairs.push([item.slice(0, eq).trim(), item.slice(eq + 1).trim()]);
  }
  return pairs;
}

/** The list's query for a metadata filter: `metadata[key]=value` per pair. */
export function metadataQuery(pairs) {
  return Object.fromEntries(pairs.map(([key, value]) => [`metadata[${key}]`, value]));
}

async function bestEval(job) {
  if (job.status === "queued") return null;
  const cached = bestCache.get(job.id);
  if (cached && cached.updatedAt === job.updated_at) return cached.best;
  const { series } = await api(`/v1/jobs/${job.id}/metrics`, { query: { names: "eval_rouge_l,eval_loss" } });
  let best = null;
  const rouge = (series.eval_rouge_l || []).filter((p) => p.value !== null);
  const loss = (series.eval_loss || []).filter((p) => p.value !== null);
  if (rouge.length) {
    const top = rouge.reduce((a, b) => (b.value > a.value ? b : a));
    best = { name: "ROUGE-L", value: top.value, step: top.step };
  } else if (loss.length) {
    const top = loss.reduce((a, b) => (b.value < a.value ? b : a));
    best = { name: "eval loss", value: top.value, step: top.step };
  }
  bestCache.set(job.id, { updatedAt: job.updated_at, best });
  return best;
}

function cell(label, ...children) {
  return h("td", { dataset: { label } }, ...children);
}

function jobRow(job, best) {
  const spec = job.spec || {};
  const metadata = Object.entries(job.metadata || {});
  return h(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    cell(
      "Job",
      h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id),
      metadata.length ? h("div", { class: "tags" }, metadata.map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))) : null,
    ),
    cell("Status", statusBadge(job.status)),
    cell("Progress", progressBar(job.progress)),
    cell("ETA", fmtDuration(job.progress?.eta_seconds)),
    cell("Loss", fmtNumber(job.latest_metrics?.loss)),
    cell("Best eval", best ? h("span", { title: `step ${best.step}` }, `${best.name} ${fmtNumber(best.value)}`) : "—"),
    cell("Teacher → student", `${modelName(spec.teacher?.model)} → ${studentLabel(spec.student)}`),
    cell("Created", fmtTime(job.created_at)),
  );
}

export function renderJobs(main, _params, query) {
  const status = query.get("status") || "";
  const metadataText = query.get("metadata") || "";
  const after = query.get("after") || "";
  const previous = (query.get("prev") || "").split(",").filter(Boolean);

  const statusInput = stateSelect("filter-status", status);
  const metadataInput = h("input", {
    id: "filter-metadata",
    name: "metadata",
    placeholder: "metadata: key=value, ...",
    value: metadataText,
  });
  const filters = h(
    "form",
    { class: "filters", id: "job-filters" },
    h("label", { for: "filter-status" }, "Status"),
    statusInput,
    h("label", { for: "filter-metadata" }, "Metadata"),
    metadataInput,
    h("button", { type: "submit" }, "Filter"),
  );
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    if (statusInput.value) next.set("status", statusInput.value);
    if (metadataInput.value.trim()) next.set("metadata", metadataInput.value.trim());
    location.hash = `#/jobs${next.toString() ? `?${next}` : ""}`;
  });
  statusInput.addEventListener("change", () => filters.requestSubmit());

  const message = h("div", { class: "page-message" });
  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "jobs-table cards-on-narrow", id: "jobs-table" },
    h(
      "thead",
      {},
      h("tr", {}, ["Job", "Status", "Progress", "ETA", "Loss", "Best eval", "Teacher → student", "Created"].map((t) => h("th", {}, t))),
    ),
    tbody,
  );
  const pager = h("nav", { class: "pager", "aria-label": "pages" });
  const updated = h("span", { class: "muted", id: "jobs-updated" });
  replaceChildren(
    main,
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"), updated, h("a", { href: "#/new", class: "button primary" }, "New job")),
    filters,
    message,
    h("div", { class: "table-scroll" }, table),
    pager,
  );

  const pairs = parseMetadataFilter(metadataText);
  if (pairs === null) {
    replaceChildren(message, notice("error", "Write the metadata filter as key=value pairs separated by commas."));
    return null;
  }

  function pageLink(text, afterId, prev) {
    const next = new URLSearchParams();
    if (status) next.set("status", status);
    if (metadataText) next.set("metadata", metadataText);
    if (afterId) next.set("after", afterId);
    if (prev.length) next.set("prev", prev.join(","));
    return h("a", { href: `#/jobs${next.toString() ? `?${next}` : ""}`, class: "button" }, text);
  }

  let timer = null;
  let stopped = false;
  const controller = new AbortController();

  async function refresh() {
    try {
      const page = await api("/v1/jobs", {
        query: { limit: PAGE_SIZE, status, after, ...metadataQuery(pairs) },
        signal: controller.signal,
      });
      if (stopped) return;
      const bests = await Promise.all(page.data.map((job) => bestEval(job).catch(() => null)));
      if (stopped) return;
      replaceChildren(
        tbody,
        page.data.length
          ? page.data.map((job, i) => jobRow(job, bests[i]))
          : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs here yet. Create one with New job.")),
      );
      table.dataset.rows = String(page.data.length);
      replaceChildren(
        pager,
        after ? pageLink("← Newer", previous[previous.length - 1] || "", previous.slice(0, -1)) : null,
        page.has_more ? pageLink("Older →", page.next_cursor, after ? [...previous, after] : previous) : null,
      );
      replaceChildren(message);
      updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      if (stopped || error.name === "AbortError") return;
      const text = error instanceof ApiError ? `${error.message}${error.param ? ` (${error.param})` : ""}` : "The API did not answer; retrying.";
      replaceChildren(message, notice("error", text));
    }
    if (!stopped) timer = setTimeout(refresh, document.hidden ? REFRESH_MS * 5 : REFRESH_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    controller.abort();
  };
}
