// Job states as the API names them (core/jobs/states.py); the filter reads the list from the OpenAPI
// document when the server publishes it, so a state added there shows up here without an edit.

import { h } from "./dom.js";

export const KNOWN_STATES = [
  "queued", "running", "cancelling", "pausing", "paused", "succeeded", "failed", "cancelled",
];
export const ENDED = new Set(["succeeded", "failed", "cancelled"]);
// States in which a job changes by itself (a worker holds it or will take it): poll and stream these.
export const MOVING = new Set(["queued", "running", "cancelling", "pausing"]);

let openapi = null;

/** The server's OpenAPI document, or null when it is not published (DISTILL_DOCS_ENABLED off). */
export async function loadOpenApi() {
  if (openapi === null) {
    openapi = fetch("/openapi.json")
      .then((response) => (response.ok ? response.json() : null))
      .catch(() => null);
  }
  return openapi;
}

export async function jobStates() {
  const doc = await loadOpenApi();
  const states = doc?.components?.schemas?.JobStatus?.enum;
  return Array.isArray(states) && states.length ? states : KNOWN_STATES;
}

export function stateSelect(id, selected) {
  const select = h("select", { id, name: "status" }, h("option", { value: "" }, "any status"));
  jobStates().then((states) => {
    for (const state of states) select.append(h("option", { value: state, selected: state === selected }, state));
    if (selected) select.value = selected;
  });
  return select;
}
