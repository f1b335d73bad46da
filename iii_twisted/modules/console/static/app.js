// The console's shell: session (CSRF token, optional login), navigation, the live
// stream of the open page (Server-Sent Events), and function calls (POST + CSRF).
import { h, replace } from "./dom.js";
import { PAGES } from "./pages.js";

const main = document.getElementById("main");
const statusEl = document.getElementById("status");
const session = { csrf: null, authenticated: false };
let current = null; // {name, page, params, source}
const paramsByPage = {};

function setStatus(text, kind) {
  statusEl.textContent = text;
  statusEl.className = "status" + (kind ? " " + kind : "");
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf },
    body: JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = (data && data.error) || { code: "http_" + response.status, message: response.statusText };
    return { ok: false, error };
  }
  return data;
}

// Call any engine function as this console session: {ok, result} or {ok: false, error}.
export function callFunction(functionId, payload) {
  return post("/api/call", { function_id: functionId, payload });
}

// Ask before an action that changes data: resolves to true on "Confirm".
export function confirmAction(text, detail) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-detail").textContent = detail || "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

function openStream() {
  if (current.source) current.source.close();
  const query = new URLSearchParams({ page: current.name, params: JSON.stringify(current.params) });
  const source = new EventSource("/api/events?" + query.toString());
  current.source = source;
  source.onopen = () => setStatus("live", "live");
  source.onerror = () => {
    setStatus("reconnecting…", "down");
    // The browser retries a dropped stream by itself; a refused one (the engine
    // restarted and forgot this session) needs a new session first.
    if (source.readyState === EventSource.CLOSED && current.source === source) {
      setTimeout(() => { if (current.source === source) start().catch(() => openStream()); }, 2000);
    }
  };
  source.onmessage = (event) => {
    if (current.source !== source) return;
    const message = JSON.parse(event.data);
    setStatus("live · " + new Date().toLocaleTimeString(), "live");
    if (message.error) {
      current.view.failed(message.error);
    } else {
      current.view.update(message.data);
    }
  };
}

function show(name) {
  if (!PAGES[name]) name = "overview";
  if (current && current.source) current.source.close();
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === name);
  }
  const params = paramsByPage[name] || {};
  const root = replace(main);
  current = { name, params, source: null, view: null };
  const ctx = {
    get params() { return current.params; },
    setParams(next) {
      paramsByPage[name] = next;
      current.params = next;
      openStream();
    },
    call: callFunction,
    confirm: confirmAction,
  };
  current.view = PAGES[name](root, ctx);
  openStream();
}

function login(message) {
  const token = h("input", { type: "password", id: "token", autocomplete: "off", size: 40 });
  const note = h("div.error-text", { id: "login-error" }, message || "");
  const form = h("form.panel", {
    onsubmit: async (event) => {
      event.preventDefault();
      const answer = await post("/api/login", { token: token.value });
      if (answer && answer.authenticated) {
        await start();
      } else {
        note.textContent = (answer && answer.error && answer.error.message) || "refused";
      }
    },
  }, h("h1", null, "Sign in"),
  h("p", null, "This engine has authentication configured: enter a token. The console " +
    "can see and do what the token's grants allow."),
  h("label", null, "Token", token), h("p", null, h("button", { type: "submit" }, "Sign in")), note);
  replace(main, form);
  setStatus("sign in", "down");
}

async function start() {
  const response = await fetch("/api/session", { credentials: "same-origin" });
  const info = await response.json();
  session.csrf = info.csrf_token;
  session.authenticated = info.authenticated;
  if (!info.authenticated) {
    if (current && current.source) current.source.close();
    login();
    return;
  }
  show(location.hash.slice(1) || "overview");
}

window.addEventListener("hashchange", () => {
  if (session.authenticated) show(location.hash.slice(1));
});

start().catch((error) => {
  setStatus("offline", "down");
  replace(main, h("div.notice.error-text", null, "Cannot reach the engine: " + error));
});
