// #/new: create a job from a form (or from the spec as JSON). Hints, defaults and choices come from the
// JSON Schema the API publishes (OpenAPI `JobCreate`); the browser checks nothing itself (novalidate):
// the API validates, and each error is shown next to the field its `param` names (or the closest section).

import { api, ApiError } from "../api.js";
import { fmtBytes, h, notice, replaceChildren } from "../dom.js";
import { loadOpenApi } from "../states.js";

// The fields the form offers; anything else goes through the JSON editor below it.
const SECTIONS = [
  ["teacher", "Teacher", [["teacher.model", "text", "Model", "a folder under the model roots, e.g. tiny-teacher"]]],
  [
    "student",
    "Student (one of the two)",
    [
      ["student.from_teacher_layers", "list", "Teacher layers to keep", "e.g. 0,2"],
      ["student.model", "text", "…or a pretrained student model", ""],
    ],
  ],
  [
    "data",
    "Data",
    [
      ["data.train", "file", "Training file", ""],
      ["data.eval", "file", "Evaluation file (optional)", ""],
      ["data.format", "enum", "Format", ""],
      ["data.max_length", "number", "Max length (tokens)", ""],
      ["data.max_prompt_length", "number", "Max prompt length", ""],
    ],
  ],
  [
    "loss",
    "Loss",
    [
      ["loss.name", "enum", "Loss", ""],
      ["loss.alpha", "number", "α (AMiD mixture)", ""],
      ["loss.lam", "number", "λ (weight on the teacher)", ""],
      ["loss.divergence", "enum", "Divergence", ""],
      ["loss.order", "enum", "Order", ""],
      ["kd_ratio", "number", "KD ratio", ""],
    ],
  ],
  [
    "training",
    "Training",
    [
      ["training.max_steps", "number", "Steps", ""],
      ["training.batch_size", "number", "Batch size", ""],
      ["training.learning_rate", "number", "Learning rate", ""],
      ["training.checkpoint_every", "number", "Checkpoint every", ""],
      ["training.eval_every", "number", "Evaluate every", ""],
      ["training.seed", "number", "Seed", ""],
    ],
  ],
  [
    "evaluation",
    "Evaluation",
    [
      ["evaluation.max_records", "number", "Records per evaluation", ""],
      ["evaluation.max_new_tokens", "number", "New tokens per sample", ""],
    ],
  ],
];
// Choices when the server publishes no OpenAPI document.
const FALLBACK_ENUMS = {
  "data.format": ["instruction", "chat", "text"],
  "loss.name": ["amid", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "ab", "taid"],
  "loss.divergence": ["kl", "ab"],
  "loss.order": ["pr", "qr", "rp", "rq"],
};

/** The JSON Schema of the dotted `path` under `root`, following $ref and nullable anyOf. */
export function schemaAt(doc, root, path) {
  const schemas = doc?.components?.schemas || {};
  const resolve = (node) => {
    let current = node;
    for (let i = 0; current && i < 8; i++) {
      if (current.$ref) current = schemas[current.$ref.split("/").pop()];
      else if (current.anyOf) current = current.anyOf.find((s) => s.type !== "null") || current.anyOf[0];
      else if (current.allOf?.length === 1) current = current.allOf[0];
      else break;
    }
    return current || null;
  };
  let node = resolve(schemas[root]);
  for (const part of path.split(".")) {
    node = resolve(node?.properties?.[part]);
    if (!node) return null;
  }
  return node;
}

function setPath(target, path, value) {
  const parts = path.split(".");
  let node = target;
  for (const part of parts.slice(0, -1)) node = node[part] ??= {};
  node[parts[parts.length - 1]] = value;
}

function parseNumber(text) {
  const value = Number(text);
  return text.trim() !== "" && Number.isFinite(value) ? value : text; // the API names what is not a number
}

/** "loss.lam: Input should be ...; data.train: ..." -> [["loss.lam", "Input should be ..."], ...] */
export function splitMessages(error) {
  const found = [];
  for (const part of error.message.split("; ")) {
    const match = /^([A-Za-z0-9_.]+): (.+)$/.exec(part);
    if (match) found.push([match[1], match[2]]);
    else if (found.length) found[found.length - 1][1] += `; ${part}`;
  }
  if (!found.length && error.param) found.push([error.param, error.message]);
  return found;
}

export function renderCreate(main) {
  const form = h("form", { id: "create-form", class: "create", novalidate: true });
  const formMessage = h("div", { class: "page-message", id: "create-message" });
  const inputs = new Map(); // param -> input element
  const fieldBoxes = new Map(); // param or section -> element that holds a .field-error
  const submit = h("button", { type: "submit", class: "primary", id: "create-submit" }, "Create job");
  const editor = h("textarea", { id: "spec-json", rows: 18, spellcheck: "false", "aria-label": "spec as JSON" });
  const fromForm = h("button", { type: "button", id: "json-from-form" }, "Copy the form into the editor");
  const submitJson = h("button", { type: "button", id: "create-from-json" }, "Create from JSON");
  const metadataInput = h("textarea", { id: "field-metadata", rows: 2, placeholder: "team=nlp" });
  let root = "JobSpec";
  let hasMetadata = false;

  function errorSlot(param, box) {
    const slot = h("div", { class: "field-error", role: "alert", "aria-live": "polite" });
    box.append(slot);
    fieldBoxes.set(param, box);
    return box;
  }

  function fileSelect(param, purpose) {
    const select = h("select", { id: `field-${param}`, name: param }, h("option", { value: "" }, "—"));
    const upload = h("input", { type: "file", id: `upload-${param}`, accept: ".jsonl,.json,.txt", "aria-label": `upload a file for ${param}` });
    upload.addEventListener("change", async () => {
      const file = upload.files?.[0];
      if (!file) return;
      const body = new FormData();
      body.append("file", file);
      body.append("purpose", purpose);
      showErrors(null);
      try {
        const row = await api("/v1/files", { method: "POST", body });
        select.append(h("option", { value: row.id }, `${row.filename} (${row.records} records, ${fmtBytes(row.size_bytes)})`));
        select.value = row.id;
        upload.value = "";
      } catch (error) {
        showErrors(error, param);
      }
    });
    api("/v1/files", { query: { limit: 100 } })
      .then((page) => {
        for (const row of page.data) {
          select.append(h("option", { value: row.id }, `${row.filename} (${row.records} records, ${row.purpose})`));
        }
      })
      .catch(() => {});
    return [select, h("span", { class: "upload" }, "or upload ", upload)];
  }

  function field([param, kind, label, placeholder], doc) {
    const schema = schemaAt(doc, root, param);
    const id = `field-${param}`;
    let control;
    let extra = null;
    if (kind === "enum") {
      const choices = schema?.enum || FALLBACK_ENUMS[param] || [];
      control = h("select", { id, name: param }, h("option", { value: "" }, `default${schema?.default !== undefined ? ` (${schema.default})` : ""}`), choices.map((c) => h("option", { value: c }, c)));
    } else if (kind === "file") {
      [control, extra] = fileSelect(param, param === "data.eval" ? "eval" : "train");
    } else {
      const hint = schema?.default !== undefined && schema.default !== null ? `default ${schema.default}` : placeholder;
      control = h("input", {
        id,
        name: param,
        type: "text",
        inputmode: kind === "number" ? "decimal" : undefined,
        placeholder: hint || placeholder,
        autocomplete: "off",
      });
    }
    control.dataset.kind = kind;
    inputs.set(param, control);
    const low = schema?.minimum ?? schema?.exclusiveMinimum;
    const high = schema?.maximum ?? schema?.exclusiveMaximum;
    const bounds =
      low !== undefined || high !== undefined
        ? ` ${schema.minimum === undefined && low !== undefined ? "(" : "["}${low ?? "…"}, ${high ?? "…"}${schema.maximum === undefined && high !== undefined ? ")" : "]"}`
        : "";
    const box = h(
      "div",
      { class: "field", dataset: { param } },
      h("label", { for: id }, label, bounds ? h("span", { class: "muted" }, bounds) : null),
      control,
      extra,
      schema?.description ? h("small", { class: "hint" }, schema.description) : null,
    );
    return errorSlot(param, box);
  }

  function collect() {
    const spec = {};
    for (const [param, control] of inputs) {
      const text = control.value.trim();
      if (!text) continue;
      const kind = control.dataset.kind;
      if (kind === "number") setPath(spec, param, parseNumber(text));
      else if (kind === "list") setPath(spec, param, text.split(/[\s,]+/).filter(Boolean).map(parseNumber));
      else setPath(spec, param, text);
    }
    if (hasMetadata) {
      const pairs = metadataInput.value.split("\n").map((l) => l.trim()).filter(Boolean);
      if (pairs.length) {
        spec.metadata = Object.fromEntries(
          pairs.map((line) => {
            const eq = line.indexOf("=");
            return eq < 0 ? [line, ""] : [line.slice(0, eq).trim(), line.slice(eq + 1).trim()];
          }),
        );
      }
    }
    return spec;
  }

  /** Clear old errors; show `error`'s messages next to their fields (or the closest section). */
  function showErrors(error, fallbackParam = null) {
    for (const box of form.querySelectorAll(".field-error")) box.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    replaceChildren(formMessage);
    if (!error) return;
    if (!(error instanceof ApiError)) {
      replaceChildren(formMessage, notice("error", error.message || "The API did not answer."));
      return;
    }
    const placed = [];
    const messages = splitMessages(error);
    if (!messages.length && fallbackParam) messages.push([fallbackParam, error.message]);
    for (const [param, text] of messages) {
      let path = param;
      while (path && !fieldBoxes.has(path)) path = path.includes(".") ? path.slice(0, path.lastIndexOf(".")) : "";
      const box = path ? fieldBoxes.get(path) : null;
      if (!box) continue;
      const slot = box.querySelector(".field-error");
      slot.textContent = slot.textContent ? `${slot.textContent}; ${text}` : text;
      inputs.get(path)?.setAttribute("aria-invalid", "true");
      placed.push(box);
    }
    const text = placed.length ? `Fix the marked fields. ${error.message}` : `${error.message}${error.param ? ` (${error.param})` : ""}`;
    replaceChildren(formMessage, notice("error", text));
    (placed[0] || formMessage).scrollIntoView({ block: "center" });
    placed[0]?.querySelector("input, select, textarea")?.focus();
  }

  async function create(body, button) {
    button.disabled = true;
    showErrors(null);
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      showErrors(error);
    } finally {
      button.disabled = false;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    create(collect(), submit);
  });
  fromForm.addEventListener("click", () => {
    editor.value = JSON.stringify(collect(), null, 2);
  });
  submitJson.addEventListener("click", () => {
    let body;
    try {
      body = JSON.parse(editor.value);
    } catch (error) {
      showErrors(null);
      replaceChildren(formMessage, notice("error", `The editor does not hold valid JSON: ${error.message}`));
      return;
    }
    create(body, submitJson);
  });

  replaceChildren(main, h("div", { class: "page-head" }, h("h1", {}, "New job")), formMessage, form);
  loadOpenApi().then((doc) => {
    if (doc?.components?.schemas?.JobCreate) root = "JobCreate";
    hasMetadata = Boolean(schemaAt(doc, root, "metadata"));
    for (const [section, title, fields] of SECTIONS) {
      const fieldset = h("fieldset", { dataset: { param: section } }, h("legend", {}, title));
      errorSlot(section, fieldset);
      for (const def of fields) fieldset.append(field(def, doc));
      form.append(fieldset);
    }
    if (hasMetadata) {
      const box = h("div", { class: "field", dataset: { param: "metadata" } }, h("label", { for: "field-metadata" }, "Labels, one key=value a line"), metadataInput);
      form.append(h("fieldset", {}, h("legend", {}, "Metadata"), errorSlot("metadata", box)));
    }
    form.append(
      h("div", { class: "actions" }, submit),
      h(
        "details",
        { class: "json-editor" },
        h("summary", {}, "Edit the spec as JSON (every field of the schema)"),
        h("p", { class: "muted" }, doc ? h("a", { href: "/docs#/jobs/create_job_v1_jobs_post", target: "_blank", rel: "noopener" }, "The schema in the API docs") : "The server publishes no schema."),
        editor,
        h("div", { class: "actions" }, fromForm, submitJson),
      ),
    );
    editor.value = JSON.stringify(collect(), null, 2);
  });
  return null;
}
