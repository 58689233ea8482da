// The web view: a hash-routed page per resource (#/runs, #/run/<id>, #/registry, #/machines),
// built from the REST API's answers and kept current from its SSE stream. No framework and no
// build step: what runs in the browser is this file as it is in the repository.

import { ApiError, AuthError, blob, call, clearToken, follow, pathOf, setToken, token } from "./api.js";
import { drawLineage } from "./graph.js";

const main = document.getElementById("main");
const noticeBox = document.getElementById("notice");
const signOut = document.getElementById("sign-out");

const RUN_STATUSES = ["created", "running", "complete", "terminated"];
// the run events that change what the runs list shows
const LIST_EVENTS = ["RunCreated", "RunStarted", "StepScheduled", "StepStarted", "StepSucceeded", "StepFailed",
  "StepCancelled", "RunTerminationRequested", "RunTerminated", "RunCompleted", "RunDeleted"];

let leave = []; // what to stop when the page changes (event streams, timers)

// ---------------------------------------------------------------- small DOM helpers

/** h("a", {href, class, onclick, dataset: {...}}, child, …): an element; null children are skipped. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

const badge = (status) => h("span", { class: `badge status-${status}`, dataset: { status } }, status);
const shortId = (id) => id.slice(0, 8);
const plural = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;

function ago(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  const text = seconds < 60 ? `${Math.round(seconds)} s ago`
    : seconds < 3600 ? `${Math.round(seconds / 60)} min ago`
      : seconds < 86400 ? `${Math.round(seconds / 3600)} h ago` : `${Math.round(seconds / 86400)} d ago`;
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString() }, text);
}

function duration(step) {
  if (!step.startedAt) return "–";
  const end = step.finishedAt ? Date.parse(step.finishedAt) : Date.now();
  const s = (end - Date.parse(step.startedAt)) / 1000;
  const text = s < 60 ? `${s.toFixed(2)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return step.finishedAt ? text : `${text} so far`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(1)} GiB`;
}

function stepCounts(c) {
  const parts = [["succeeded", "success"], ["failed", "failure"], ["cancelled", "cancelled"], ["active", "running"]]
    .filter(([k]) => c[k] > 0)
    .map(([k, status]) => h("span", { class: `count status-${status}` }, `${c[k]} ${k}`));
  return h("span", { class: "counts" }, plural(c.total, "step"), parts.length ? ": " : "", parts);
}

function notice(text) {
  noticeBox.replaceChildren(h("span", {}, text),
    h("button", { type: "button", class: "link", onclick: () => { noticeBox.hidden = true; } }, "Dismiss"));
  noticeBox.hidden = false;
}

function clearNotice() {
  noticeBox.hidden = true;
}

/** Run an action of a button or form, showing the API's error instead of failing silently. */
async function act(fn) {
  clearNotice();
  try {
    await fn();
  } catch (e) {
    if (e instanceof AuthError) showLogin(e.message);
    else notice(e instanceof ApiError ? `${e.message} (HTTP ${e.status})` : String(e));
  }
}

/** Call `fn` at most once per `ms`, after the last of a burst (events come in bursts). */
function debounced(fn, ms = 120) {
  let timer = null;
  let running = false;
  let again = false;
  const run = async () => {
    timer = null;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await fn();
    } finally {
      running = false;
      if (again) {
        again = false;
        run();
      }
    }
  };
  const trigger = () => {
    if (timer === null) timer = setTimeout(run, ms);
  };
  leave.push(() => timer !== null && clearTimeout(timer));
  return trigger;
}

/** A download link for an API URL: a plain link when no token is needed, a fetch with the
 * token (then a local Blob URL) when one is, since a link cannot send a header. */
function download(url, filename, text) {
  const path = pathOf(url);
  return h("a", {
    href: path, download: filename,
    onclick: (ev) => {
      if (!token()) return;
      ev.preventDefault();
      act(async () => {
        const local = URL.createObjectURL(await blob(path));
        const a = h("a", { href: local, download: filename });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(local), 10000);
      });
    },
  }, text);
}

function table(caption, head, rows, attrs = {}) {
  return h("table", attrs, h("caption", {}, caption),
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows));
}

// ---------------------------------------------------------------- sign-in

function showLogin(message) {
  stopPage();
  const refused = Boolean(message) && Boolean(token());
  clearToken();
  signOut.hidden = true;
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true });
  const error = h("p", { id: "login-error", class: "error", role: "alert", hidden: !refused },
    refused ? `The token was refused: ${message}` : "");
  const form = h("form", {
    id: "login", class: "card narrow",
    onsubmit: async (ev) => {
      ev.preventDefault();
      setToken(input.value.trim());
      try {
        await call("GET", "/api/runs?limit=1");
      } catch (e) {
        clearToken();
        error.textContent = e instanceof AuthError ? `The token was refused: ${e.message}` : String(e.message || e);
        error.hidden = false;
        input.select();
        return;
      }
      route();
    },
  },
  h("h1", {}, "Sign in"),
  h("p", {}, "This service requires an API token (the contents of its ",
    h("code", {}, "--api-token-file"), "). It is kept for this browser tab only."),
  h("label", { for: "token" }, "API token"), input, error,
  h("button", { type: "submit" }, "Sign in"));
  main.replaceChildren(form);
  input.focus();
}

signOut.addEventListener("click", () => {
  clearToken();
  route();
});

// ---------------------------------------------------------------- runs list

async function runsPage(query) {
  const filter = query.get("status") || "";
  const select = h("select", {
    id: "status-filter",
    onchange: () => { location.hash = select.value ? `#/runs?status=${select.value}` : "#/runs"; },
  }, h("option", { value: "" }, "all"), RUN_STATUSES.map((s) => h("option", { value: s, selected: s === filter }, s)));
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  main.replaceChildren(
    h("h1", {}, "Runs"),
    h("div", { class: "toolbar" },
      h("button", {
        type: "button", id: "create-run",
        onclick: () => act(async () => {
          const run = await call("POST", "/api/run");
          location.hash = `#/run/${run.id}`;
        }),
      }, "Create run"),
      h("label", { for: "status-filter" }, "Status"), select),
    body);

  const render = async () => {
    const runs = await call("GET", "/api/runs?limit=500");
    const shown = filter ? runs.filter((r) => r.status === filter) : runs;
    const withOwner = runs.some((r) => r.owner);
    if (!shown.length) {
      body.replaceChildren(h("p", { id: "no-runs" }, filter ? `No ${filter} runs.` : "No runs yet: create one."));
      return;
    }
    body.replaceChildren(table(`${shown.length} of ${plural(runs.length, "run")}${filter ? ` (${filter})` : ""}, newest first`,
      ["Run", "Status", withOwner ? "Owner" : null, "Steps", "Created", "Updated"].filter(Boolean),
      shown.map((r) => h("tr", { dataset: { runId: r.id, status: r.status } },
        h("td", {}, h("a", { href: `#/run/${r.id}`, title: r.id }, h("code", {}, shortId(r.id)))),
        h("td", {}, badge(r.status)),
        withOwner ? h("td", {}, r.owner || "–") : null,
        h("td", {}, stepCounts(r.stepCounts)),
        h("td", {}, ago(r.createdAt)),
        h("td", {}, ago(r.updatedAt)))),
      { id: "runs" }));
  };
  // the position first: whatever happens after it is either in the list or comes as an event
  const position = await streamPosition();
  await render();
  const refresh = debounced(() => render().catch(() => {}), 500);
  if (position !== null) {
    leave.push(follow(`/api/events?${LIST_EVENTS.map((t) => `type=${t}`).join("&")}`, refresh, { after: position }));
  }
}

/** Where the stream is now (the projection's position): live updates start after it. */
async function streamPosition() {
  try {
    const health = await call("GET", "/healthz");
    return health.position;
  } catch {
    return null; // no live updates then; the page still works
  }
}

// ---------------------------------------------------------------- run page

async function runPage(runId) {
  const [run, kinds] = await Promise.all([call("GET", `/api/run/${runId}`), call("GET", "/api/data-kinds")]);
  const title = h("h1", {}, "Run ", h("code", { title: run.id }, run.id));
  const summary = h("div", { id: "run-summary", class: "summary" });
  const graph = h("div", { id: "lineage", class: "graph" });
  const steps = h("div", { id: "steps" });
  const pool = h("div", { id: "pool" });
  const paramsBox = h("div", { id: "params" });
  const logs = h("aside", { id: "logs-panel", class: "panel", hidden: true, "aria-labelledby": "logs-title" });
  let openStep = null; // the step whose logs the panel shows
  let paramsKey = null;
  let current = run;

  const kindSelect = h("select", { id: "upload-kind", name: "kind", required: true },
    kinds.map((k) => h("option", { value: k.metadata.name },
      k.spec.displayName ? `${k.metadata.name} (${k.spec.displayName})` : k.metadata.name)));
  const fileInput = h("input", { id: "upload-file", name: "file", type: "file", required: true });
  const uploadForm = h("form", {
    id: "upload-form", class: "card",
    onsubmit: (ev) => {
      ev.preventDefault();
      act(async () => {
        const form = new FormData();
        form.append("file", fileInput.files[0]);
        const kind = encodeURIComponent(kindSelect.value);
        const unit = await call("POST", `/api/run/${runId}/upload/${kind}`, { form });
        uploadForm.reset();
        status(`Uploaded ${unit.filename} as ${unit.dataKind}.`);
        await refresh(true);
      });
    },
  }, h("h3", {}, "Upload a file"),
  h("label", { for: "upload-kind" }, "Data kind"), kindSelect,
  h("label", { for: "upload-file" }, "File"), fileInput,
  h("button", { type: "submit" }, "Upload"));

  const cancelBox = h("input", { id: "terminate-cancel", type: "checkbox" });
  const terminateButton = h("button", {
    type: "button", id: "terminate", class: "danger",
    onclick: () => act(async () => {
      await call("POST", `/api/run/${runId}/terminate${cancelBox.checked ? "?cancel=true" : ""}`);
      status("Termination requested.");
      await refresh();
    }),
  }, "Terminate");
  const terminateBox = h("div", { class: "card" }, h("h3", {}, "Terminate"),
    h("p", {}, "Nothing new is scheduled; running steps finish unless cancelled."),
    h("div", { class: "check" }, cancelBox, h("label", { for: "terminate-cancel" }, "also cancel running steps")),
    terminateButton);
  const statusLine = h("p", { id: "action-status", class: "muted", role: "status" });
  const status = (text) => { statusLine.textContent = text; };

  main.replaceChildren(title, summary,
    h("section", { "aria-labelledby": "actions-title" }, h("h2", { id: "actions-title" }, "Actions"),
      h("div", { class: "cards" }, uploadForm, paramsBox, terminateBox), statusLine),
    h("section", { "aria-labelledby": "lineage-title" }, h("h2", { id: "lineage-title" }, "Lineage"),
      h("figure", {}, graph, h("figcaption", { class: "legend" }, "Data units (rounded) flow into steps (square) ",
        "that produce new units. Steps: ", ["created", "running", "success", "failure", "cancelled"].map(badge),
        " Units: ", h("span", { class: "badge status-upload" }, "uploaded"), " ",
        h("span", { class: "badge status-output" }, "output"), ". Select a step to see its logs."))),
    h("section", { "aria-labelledby": "steps-title" }, h("h2", { id: "steps-title" }, "Steps"), steps),
    h("section", { "aria-labelledby": "pool-title" }, h("h2", { id: "pool-title" }, "Data pool"), pool),
    logs);

  const stepById = (id) => current.steps.find((s) => s.id === id);

  // focus: move the keyboard focus to the panel (when the user opened it, not on a live update)
  async function showLogs(stepId, focus = true) {
    const step = stepById(stepId);
    if (!step) return;
    openStep = stepId;
    const pre = h("pre", { id: "logs-text", tabindex: "0" }, "Loading…");
    const close = h("button", { type: "button", class: "link", id: "logs-close",
      onclick: () => { logs.hidden = true; openStep = null; } }, "Close");
    logs.replaceChildren(...[
      h("header", {}, h("h2", { id: "logs-title" }, `Logs of ${step.operator}`), close),
      h("p", { class: "muted" }, h("code", {}, step.id), " · ", badge(step.status), ` · attempt ${step.attempt}`),
      step.error ? h("p", { class: "error" }, step.error) : null,
      pre].filter(Boolean));
    logs.hidden = false;
    try {
      const text = await call("GET", pathOf(step.logsUrl), { text: true });
      pre.textContent = text || "(empty)";
    } catch (e) {
      if (e instanceof AuthError) throw e;
      pre.textContent = e instanceof ApiError && e.status === 404
        ? `No logs yet (${e.message}).` : `Could not read the logs: ${e.message}`;
    }
    if (focus) close.focus();
  }

  function renderSummary(r) {
    summary.replaceChildren(
      h("p", {}, badge(r.status), " ", stepCounts(r.stepCounts)),
      h("dl", {},
        h("dt", {}, "Created"), h("dd", {}, ago(r.createdAt)),
        h("dt", {}, "Updated"), h("dd", {}, ago(r.updatedAt)),
        r.maxParallel ? [h("dt", {}, "Max parallel"), h("dd", {}, String(r.maxParallel))] : null,
        r.terminationReason ? [h("dt", {}, "Termination"), h("dd", {}, r.terminationReason)] : null));
    terminateButton.disabled = r.status === "terminated";
  }

  function renderSteps(r) {
    if (!r.steps.length) {
      steps.replaceChildren(h("p", { class: "muted" }, "No steps yet."));
      return;
    }
    steps.replaceChildren(table(plural(r.steps.length, "step"),
      ["Operator", "Status", "Revision", "Attempts", "Runs on", "Duration", "Error", "Logs"],
      r.steps.map((s) => h("tr", { dataset: { stepId: s.id, operator: s.operator, status: s.status } },
        h("td", {}, s.operator, " ", h("code", { class: "muted", title: s.id }, shortId(s.id))),
        h("td", { class: "status" }, badge(s.status)),
        h("td", {}, String(s.revision)),
        h("td", {}, String(s.attempt)),
        h("td", {}, s.target || "–"),
        h("td", { class: "duration" }, duration(s)),
        h("td", { class: "error" }, s.error || ""),
        h("td", {}, h("button", { type: "button", class: "logs", onclick: () => act(() => showLogs(s.id)) }, "Logs")))),
      { id: "steps-table" }));
  }

  function renderPool(r) {
    if (!r.dataPool.length) {
      pool.replaceChildren(h("p", { class: "muted" }, "The pool is empty: upload a file."));
      return;
    }
    const operatorOf = Object.fromEntries(r.steps.map((s) => [s.id, s.operator]));
    pool.replaceChildren(table(plural(r.dataPool.length, "data unit"),
      ["Kind", "File", "Size", "From", "SHA-256"],
      r.dataPool.map((u) => h("tr", { dataset: { unitId: u.id, kind: u.dataKind } },
        h("td", {}, u.dataKind),
        h("td", {}, download(u.url, u.filename, u.filename)),
        h("td", {}, bytes(u.size)),
        h("td", {}, u.stepId ? `${operatorOf[u.stepId] || "step"} (${shortId(u.stepId)})` : "upload"),
        h("td", {}, h("code", { title: u.sha256 }, u.sha256.slice(0, 12))))),
      { id: "pool-table" }));
  }

  async function renderParams() {
    const params = await call("GET", `/api/run/${runId}/params`);
    const key = JSON.stringify(params);
    if (key === paramsKey) return; // keep what the user typed
    paramsKey = key;
    const operators = Object.keys(params).sort();
    // a started run's form shows the values it was started with (its param pool)
    const ranWith = (op, name) => ((current.paramPool || {})[op] || []).find((p) => p.name === name)?.value;
    const maxParallel = h("input", { id: "max-parallel", type: "number", min: 1, inputmode: "numeric" });
    const fields = operators.map((op) => h("fieldset", { dataset: { operator: op } }, h("legend", {}, op),
      params[op].length ? params[op].map((p) => {
        const id = `param-${op}-${p.name}`;
        return h("div", { class: "field" }, h("label", { for: id }, p.name),
          h("input", { id, name: id, value: ranWith(op, p.name) ?? p.value ?? p.defaultValue, placeholder: p.defaultValue,
            dataset: { operator: op, param: p.name } }));
      }) : h("p", { class: "muted" }, "no parameters")));
    const form = h("form", {
      id: "start-form", class: "card",
      onsubmit: (ev) => {
        ev.preventDefault();
        act(async () => {
          const body = Object.fromEntries(operators.map((op) => [op, params[op].map((p) => ({
            name: p.name,
            value: form.querySelector(`[data-operator="${op}"][data-param="${p.name}"]`).value,
          }))]));
          const q = maxParallel.value ? `?maxParallel=${encodeURIComponent(maxParallel.value)}` : "";
          await call("POST", `/api/run/${runId}/run${q}`, { json: body });
          status("Started.");
          await refresh();
        });
      },
    }, h("h3", {}, "Start with parameters"),
    operators.length ? h("div", { class: "ops" }, fields)
      : h("p", { class: "muted" }, "No parameters to set for what can run on this pool."),
    h("div", { class: "field" }, h("label", { for: "max-parallel" }, "Max parallel steps (optional)"), maxParallel),
    h("button", { type: "submit" }, "Start"));
    paramsBox.replaceChildren(form);
  }

  function renderAll(r, lineage) {
    current = r;
    renderSummary(r);
    renderSteps(r);
    renderPool(r);
    drawLineage(graph, lineage, { onStep: (id) => act(() => showLogs(id)) });
  }

  // one load at a time, in order: an older answer must never be drawn over a newer one
  let queue = Promise.resolve();
  async function load(withParams) {
    const [r, lineage] = await Promise.all([call("GET", `/api/run/${runId}`), call("GET", `/api/run/${runId}/lineage`)]);
    const before = openStep && stepById(openStep);
    renderAll(r, lineage);
    if (withParams) await renderParams();
    const after = openStep && stepById(openStep);
    if (before && after && before.status !== after.status) await showLogs(openStep, false);
  }
  function refresh(withParams = false) {
    const done = queue.then(() => load(withParams));
    queue = done.catch(() => {});
    return done;
  }

  await Promise.all([refresh(), renderParams()]);
  let poolChanged = false;
  const live = debounced(async () => {
    const withParams = poolChanged;
    poolChanged = false;
    try {
      await refresh(withParams);
    } catch (e) {
      if (e instanceof AuthError) showLogin(e.message);
    }
  });
  // every event of this run after the version just rendered; /api/events (not the run's own
  // stream, which ends with the run) so a later upload that reopens the run is seen too
  leave.push(follow(`/api/events?run=${runId}`, (msg) => {
    if (msg.event === "DataUnitAdded") poolChanged = true;
    if (msg.event === "RunDeleted") {
      notice("This run was deleted.");
      location.hash = "#/runs";
      return;
    }
    live();
  }, { after: current.version }));
  // a running step's duration keeps counting (only that cell changes: a button being clicked stays)
  const tick = setInterval(() => {
    for (const s of current.steps.filter((x) => x.status === "running")) {
      const cell = steps.querySelector(`tr[data-step-id="${s.id}"] td.duration`);
      if (cell) cell.textContent = duration(s);
    }
  }, 1000);
  leave.push(() => clearInterval(tick));
}

// ---------------------------------------------------------------- registry

async function registryPage() {
  const [kinds, operators] = await Promise.all([call("GET", "/api/data-kinds"), call("GET", "/api/operators")]);
  const consumers = {};
  const producers = {};
  for (const op of operators) {
    for (const input of op.spec.inputs || []) (consumers[input.dataKind] ||= []).push(op.metadata.name);
    for (const kind of op.spec.possibleOutputKinds || []) (producers[kind] ||= []).push(op.metadata.name);
  }
  const list = (names) => (names && names.length ? names.join(", ") : "–");
  main.replaceChildren(h("h1", {}, "Registry"),
    h("section", { "aria-labelledby": "kinds-title" }, h("h2", { id: "kinds-title" }, "Data kinds"),
      table(plural(kinds.length, "data kind"), ["Name", "Display name", "Consumed by", "Produced by"],
        kinds.map((k) => h("tr", { dataset: { kind: k.metadata.name } },
          h("th", { scope: "row" }, k.metadata.name),
          h("td", {}, k.spec.displayName || "–"),
          h("td", { class: "consumers" }, list(consumers[k.metadata.name])),
          h("td", { class: "producers" }, list(producers[k.metadata.name])))),
        { id: "kinds-table" })),
    h("section", { "aria-labelledby": "operators-title" }, h("h2", { id: "operators-title" }, "Operators"),
      table(plural(operators.length, "operator"), ["Name", "Revision", "Runs on", "Inputs", "Outputs", "Parameters", "Limits"],
        operators.map((op) => {
          const s = op.spec;
          return h("tr", { dataset: { operator: op.metadata.name } },
            h("th", { scope: "row" }, op.metadata.name),
            h("td", {}, String(op.revision)),
            h("td", {}, s.machine ? `machine ${s.machine}` : `Kubernetes Job (${s.image || "no image"})`),
            h("td", { class: "inputs" }, (s.inputs || []).length
              ? h("ul", {}, s.inputs.map((i) => h("li", {}, h("code", {}, i.fileLocationEnv), " ← ", i.dataKind)))
              : "none (runs once per start)"),
            h("td", { class: "outputs" }, list(s.possibleOutputKinds)),
            h("td", {}, (s.configurableEnv || []).length
              ? h("ul", {}, s.configurableEnv.map((c) => h("li", {}, h("code", {}, c.name), ` (default ${c.defaultValue ?? "–"})`)))
              : "–"),
            h("td", {}, [s.timeoutSeconds ? `timeout ${s.timeoutSeconds} s` : null,
              s.retries ? `${s.retries} retries` : null].filter(Boolean).join(", ") || "–"));
        }),
        { id: "operators-table" })));
}

// ---------------------------------------------------------------- machines

async function machinesPage() {
  const machines = await call("GET", "/api/machines");
  const health = {};
  const check = async (name) => {
    const cell = health[name];
    cell.replaceChildren(h("span", { class: "muted" }, "checking…"));
    try {
      const c = await call("POST", `/api/machines/${encodeURIComponent(name)}/check`);
      cell.dataset.ok = String(c.ok);
      cell.replaceChildren(h("span", { class: `badge ${c.ok ? "status-success" : "status-failure"}` },
        c.ok ? "healthy" : "unhealthy"), " ", c.detail,
      c.latencyMs !== null && c.latencyMs !== undefined ? ` (${c.latencyMs} ms)` : "");
    } catch (e) {
      if (e instanceof AuthError) throw e;
      cell.dataset.ok = "false";
      cell.replaceChildren(h("span", { class: "badge status-failure" }, "error"), ` ${e.message}`);
    }
  };
  main.replaceChildren(h("h1", {}, "Machines"),
    machines.length ? table(`${plural(machines.length, "machine")} (health checked when this page opened)`,
      ["Name", "URL", "Labels", "Token", "Owner", "Shared with", "Registered", "Health", ""],
      machines.map((m) => {
        health[m.name] = h("td", { class: "health" });
        return h("tr", { dataset: { machine: m.name } },
          h("th", { scope: "row" }, m.name),
          h("td", {}, h("code", {}, m.url)),
          h("td", {}, Object.entries(m.labels).map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`))),
          h("td", {}, m.hasToken ? "yes" : "no"),
          h("td", { class: "owner" }, m.owner || "–"),
          h("td", { class: "shared" }, (m.sharedWith || []).map((p) => (p === "*" ? "everyone" : p)).join(", ") || "–"),
          h("td", {}, ago(m.registeredAt)),
          health[m.name],
          h("td", {}, h("button", { type: "button", onclick: () => act(() => check(m.name)) }, "Check")));
      }), { id: "machines-table" })
      : h("p", {}, "No machines registered."));
  await Promise.all(machines.map((m) => check(m.name)));
}

// ---------------------------------------------------------------- routing

function stopPage() {
  for (const stop of leave) stop();
  leave = [];
}

async function route() {
  stopPage();
  clearNotice();
  signOut.hidden = !token();
  const [path, q = ""] = (location.hash.replace(/^#/, "") || "/runs").split("?");
  const query = new URLSearchParams(q);
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === (parts[0] === "run" ? "runs" : parts[0])) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    if (parts[0] === "run" && parts[1]) await runPage(decodeURIComponent(parts[1]));
    else if (parts[0] === "registry") await registryPage();
    else if (parts[0] === "machines") await machinesPage();
    else await runsPage(query);
    document.title = `${main.querySelector("h1")?.textContent || "Mlynar"} · Mlynar Events`;
  } catch (e) {
    if (e instanceof AuthError) {
      showLogin(e.message);
      return;
    }
    main.replaceChildren(h("h1", {}, "Something went wrong"),
      h("p", { class: "error", role: "alert" }, e instanceof ApiError ? `${e.message} (HTTP ${e.status})` : String(e)),
      h("p", {}, h("a", { href: "#/runs" }, "Back to the runs")));
  }
}

window.addEventListener("hashchange", route);
route();
