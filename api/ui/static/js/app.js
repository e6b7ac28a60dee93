// The dashboard's shell: the login, the header and the hash router (#/jobs, #/jobs/{id}, #/compare,
// #/sweeps/{id}, #/new). Each page's render(main, params, query) returns a cleanup function that stops its
// timers and streams when the user leaves it.

import { ApiError, checkKey, session } from "./api.js";
import { h, notice, replaceChildren } from "./dom.js";
import { renderCompare, renderSweep } from "./pages/compare.js";
import { renderCreate } from "./pages/create.js";
import { renderJob } from "./pages/job.js";
import { renderJobs } from "./pages/jobs.js";

const ROUTES = [
  [/^\/jobs$/, renderJobs, "jobs"],
  [/^\/jobs\/([A-Za-z0-9_-]+)$/, renderJob, "jobs"],
  [/^\/compare$/, renderCompare, "compare"],
  [/^\/sweeps\/([A-Za-z0-9_-]+)$/, renderSweep, "compare"],
  [/^\/new$/, renderCreate, "new"],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let cleanup = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/jobs";
  const [path, search = ""] = raw.split("?");
  return { path, query: new URLSearchParams(search) };
}

function renderLogin(query) {
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    placeholder: "dk_...",
    required: true,
  });
  const message = h("div", { class: "form-message" });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "card login", id: "login-form", novalidate: true },
    h("h1", {}, "Distillery"),
    h("p", {}, "Paste an API key. It stays in this browser tab only (session storage)."),
    h("label", { for: "api-key" }, "API key"),
    input,
    message,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      replaceChildren(message, notice("error", "Paste the API key that `distill serve` printed."));
      return;
    }
    button.disabled = true;
    try {
      await checkKey(key);
      session.set(key);
      location.hash = `#${query.get("next") || "/jobs"}`;
    } catch (error) {
      const text = error instanceof ApiError ? error.message : "The API did not answer.";
      replaceChildren(message, notice("error", text));
    } finally {
      button.disabled = false;
    }
  });
  replaceChildren(main, form);
  input.focus();
  return null;
}

function renderNav(active) {
  const link = (href, text, name) =>
    h("a", { href, class: name === active ? "active" : "", "aria-current": name === active ? "page" : false }, text);
  const signOut = h("button", { type: "button", class: "link", id: "sign-out" }, "Sign out");
  signOut.addEventListener("click", () => {
    session.clear();
    location.hash = "#/login";
  });
  replaceChildren(
    nav,
    session.key
      ? [link("#/jobs", "Jobs", "jobs"), link("#/compare", "Compare", "compare"), link("#/new", "New job", "new"), signOut]
      : [],
  );
}

function route() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  const { path, query } = parseHash();
  if (path === "/login" || !session.key) {
    renderNav(null);
    if (path !== "/login") {
      location.hash = `#/login?next=${encodeURIComponent(path + (query.toString() ? `?${query}` : ""))}`;
      return;
    }
    cleanup = renderLogin(query);
    return;
  }
  for (const [pattern, render, name] of ROUTES) {
    const match = pattern.exec(path);
    if (match) {
      renderNav(name);
      main.replaceChildren();
      cleanup = render(main, match.slice(1), query) || null;
      window.scrollTo(0, 0);
      return;
    }
  }
  renderNav(null);
  replaceChildren(main, notice("error", `No page at ${path}.`), h("a", { href: "#/jobs" }, "Back to the jobs"));
}

window.addEventListener("hashchange", route);
route();
