// fedllm console: sign-in and the /v1 API calls behind each page (no library, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);

function say(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function token() {
  return sessionStorage.getItem("fedllm-token") || "";
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
  }
  return data;
}

function showUser() {
  const user = sessionStorage.getItem("fedllm-user");
  $("who").textContent = user ? "Signed in as " + user : "Not signed in";
}

function setupLogin(onSignedIn) {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const username = $("username").value;
      const data = await api("POST", "/v1/auth/token", { username, password: $("password").value });
      sessionStorage.setItem("fedllm-token", data.access_token);
      sessionStorage.setItem("fedllm-user", username);
      $("password").value = "";
      showUser();
      say("Signed in.");
      if (onSignedIn) await onSignedIn();
    } catch (err) {
      say("Sign-in failed: " + err.message, true);
    }
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.clear();
    showUser();
    say("Signed out.");
  });
  showUser();
}

// -- clinician --------------------------------------------------------------------------
async function refreshBudget() {
  const user = sessionStorage.getItem("fedllm-user");
  if (!user || !token()) return;
  const budget = await api("GET", "/v1/privacy/budget/" + encodeURIComponent(user));
  $("budget-left").textContent = budget.remaining.toFixed(2) + " of " + budget.limit.toFixed(2);
}

function clinician() {
  setupLogin(() => refreshBudget().catch((err) => say(err.message, true)));
  $("ask-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    say("Asking…");
    try {
      const result = await api("POST", "/v1/inference", {
        prompt: $("prompt").value,
        privacy_budget: Number($("epsilon").value),
      });
      $("answer").textContent = result.response;
      $("eps-spent").textContent = result.privacy_cost.toFixed(2);
      $("budget-left").textContent = result.remaining_budget.toFixed(2);
      $("answered-by").textContent = result.node_id || "—";
      say("Answered.");
    } catch (err) {
      say("Not answered: " + err.message, true);
    }
  });
}

// -- privacy officer --------------------------------------------------------------------
async function refreshPlots() {
  try {
    $("plots").innerHTML = await api("GET", "/v1/console/ledgers");  // SVG escaped server-side
    say("Plots updated.");
  } catch (err) {
    say("No plots: " + err.message, true);
  }
}

function privacy() {
  setupLogin(refreshPlots);
  $("refresh-plots").addEventListener("click", refreshPlots);
}

// -- admin ------------------------------------------------------------------------------
function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

async function refreshNodes() {
  try {
    const [beats, admission, emergency] = await Promise.all([
      api("GET", "/v1/admin/nodes"),
      api("GET", "/v1/admin/nodes/admission"),
      api("GET", "/v1/admin/emergency"),
    ]);
    const byId = {};
    for (const a of admission) byId[a.hospital_id] = { admission: a.status };
    for (const b of beats) byId[b.hospital_id] = Object.assign(byId[b.hospital_id] || {}, b);
    const body = $("nodes-table").querySelector("tbody");
    body.textContent = "";
    for (const id of Object.keys(byId).sort()) {
      const n = byId[id];
      const row = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = id;
      row.appendChild(th);
      cell(row, n.admission || "unknown");
      cell(row, n.alive === undefined ? "—" : n.alive ? "yes" : "no");
      cell(row, n.queue_depth === undefined ? "—" : String(n.queue_depth));
      cell(row, n.error_rate === undefined ? "—" : n.error_rate.toFixed(2));
      cell(row, n.ewma_latency_ms === undefined ? "—" : n.ewma_latency_ms.toFixed(0));
      cell(row, emergency.open_breakers[id] ? "open: " + emergency.open_breakers[id] : "closed");
      body.appendChild(row);
    }
    showEmergency(emergency);
  } catch (err) {
    say("Nodes not loaded: " + err.message, true);
  }
}

function showEmergency(state) {
  const parts = [
    state.lockdown ? "LOCKDOWN: " + state.lockdown_reason : "no lockdown",
    state.halted ? "HALTED: " + state.halted_reason : "processing running",
  ];
  $("emergency-state").textContent = parts.join(" · ");
}

function onSubmit(formId, handler) {
  $(formId).addEventListener("submit", async (event) => {
    event.preventDefault();
    const which = event.submitter ? event.submitter.value : "";
    try {
      await handler(which);
      await refreshNodes();
    } catch (err) {
      say(err.message, true);
    }
  });
}

function admin() {
  setupLogin(refreshNodes);
  $("refresh-nodes").addEventListener("click", refreshNodes);
  onSubmit("lockdown-form", async (which) => {
    const state = await api("POST", "/v1/admin/emergency/lockdown", {
      enabled: which === "on",
      reason: $("lockdown-reason").value,
    });
    say(state.lockdown ? "Lockdown on." : "Lockdown lifted.");
  });
  onSubmit("halt-form", async (which) => {
    const state = await api("POST", "/v1/admin/emergency/halt", {
      enabled: which === "on",
      reason: $("halt-reason").value,
    });
    say(state.halted ? "Processing halted." : "Processing resumed.");
  });
  onSubmit("breaker-form", async (which) => {
    const node = $("breaker-node").value;
    await api("POST", "/v1/admin/nodes/" + encodeURIComponent(node) + "/breaker", {
      open: which === "open",
      reason: $("breaker-reason").value,
    });
    say("Breaker of " + node + (which === "open" ? " opened." : " closed."));
  });
  onSubmit("node-form", async () => {
    const action = $("node-action").value;
    const departments = $("node-departments").value.split(",").map((d) => d.trim()).filter(Boolean);
    const body = { action, hospital_id: $("node-id").value, reason: $("node-reason").value };
    if (action === "register") body.departments = departments;
    const node = await api("POST", "/v1/admin/nodes", body);
    say(node.hospital_id + " is now " + node.status + ".");
  });
  if (token()) refreshNodes();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "clinician") clinician();
  else if (page === "privacy") privacy();
  else if (page === "admin") admin();
});
