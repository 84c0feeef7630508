"use strict";
// loraft ui: the page over the REST API of docs/ui.md, and nothing else. Plain script, no framework, no build
// step. Each hash route is a view {mount, unmount, relabel} cloned from a <template> of index.html; every visible
// string comes from the catalogs in i18n/ (static elements carry data-i18n*, dynamic text goes through t()).

const $ = (id) => document.getElementById(id);
const LANGUAGES = ["en", "zh-CN"];
const LANG_STORAGE = "loraft-ui-lang";
const TOKEN_STORAGE = "loraft-ui-token";
const POLL_MS = 2000;
const RECONNECT_MS = 1500;
const PLAN_DEBOUNCE_MS = 400;

// ============================================================ i18n

const catalogs = {};
let lang = initialLanguage();

function initialLanguage() {
  const saved = localStorage.getItem(LANG_STORAGE);
  if (LANGUAGES.includes(saved)) return saved;
  const browser = (navigator.languages && navigator.languages[0]) || navigator.language || "";
  return browser.toLowerCase().startsWith("zh") ? "zh-CN" : "en";
}

/** The catalog text for `key` in the current language, with `{name}` placeholders filled from `params`. */
function t(key, params) {
  const own = catalogs[lang] && catalogs[lang][key];
  const text = own !== undefined ? own : (catalogs.en && catalogs.en[key]) || key;
  if (!params) return text;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in params ? String(params[name]) : whole));
}

function applyI18n(root) {
  root.querySelectorAll("[data-i18n]").forEach((node) => { node.textContent = t(node.dataset.i18n); });
  root.querySelectorAll("[data-i18n-placeholder]").forEach((node) => { node.placeholder = t(node.dataset.i18nPlaceholder); });
  root.querySelectorAll("[data-i18n-title]").forEach((node) => { node.title = t(node.dataset.i18nTitle); });
}

async function loadCatalogs() {
  await Promise.all(LANGUAGES.map(async (code) => {
    const response = await fetch(`/static/i18n/${code}.json`);
    if (!response.ok) throw new Error(`/static/i18n/${code}.json: ${response.status} ${response.statusText}`);
    catalogs[code] = await response.json();
  }));
}

/** Switch the language without a reload: static text through data-i18n*, the current view re-renders its own. */
function setLang(code) {
  if (!LANGUAGES.includes(code)) return;
  lang = code;
  localStorage.setItem(LANG_STORAGE, code);
  document.documentElement.lang = code;
  $("lang").value = code;
  applyI18n(document);
  if (currentView) currentView.relabel();
}

const STATUS_KEYS = {
  starting: "status.starting", running: "status.running", "running?": "status.running_elsewhere",
  interrupted: "status.interrupted", stopped: "status.stopped", failed: "status.failed",
  finished: "status.finished", unreadable: "status.unreadable",
};
const ACTIVE_STATUSES = ["starting", "running"];

function statusText(status) {
  return STATUS_KEYS[status] ? t(STATUS_KEYS[status]) : (status || t("status.unknown"));
}

function setStatus(node, status) {
  node.dataset.status = status || "";
  node.textContent = status ? statusText(status) : "";
}

// ============================================================ formatting and DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "i18n") { node.dataset.i18n = value; node.textContent = t(value); }
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined && child !== false) node.append(child);
  return node;
}

const DASH = "–";
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const formatInteger = (value) => (isNumber(value) ? new Intl.NumberFormat(lang).format(value) : DASH);
const formatLoss = (value) => (isNumber(value) ? value.toFixed(4) : DASH);
const formatDecimal = (value, digits) => (isNumber(value) ? value.toFixed(digits) : DASH);
const formatRate = (value) => (isNumber(value) ? value.toExponential(2) : DASH);

function formatDuration(seconds) {
  if (!isNumber(seconds) || seconds < 0) return DASH;
  const total = Math.round(seconds);
  const hours = Math.floor(total / 3600), minutes = Math.floor((total % 3600) / 60), rest = total % 60;
  if (hours) return t("time.hours_minutes", { hours, minutes });
  if (minutes) return t("time.minutes_seconds", { minutes, seconds: rest });
  return t("time.seconds", { seconds: rest });
}

/** A recorded time (ISO 8601, as loraft records it) in the reader's language; the raw text when unparsable. */
function formatTime(text) {
  if (!text) return DASH;
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return String(text);
  return new Intl.DateTimeFormat(lang, { dateStyle: "medium", timeStyle: "medium" }).format(date);
}

function formatValue(value) {
  if (value === null || value === undefined) return DASH;
  if (value === true) return t("common.yes");
  if (value === false) return t("common.no");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** An argv as one shell line (what a user can paste), quoting only what needs it. */
function shellLine(argv) {
  if (!Array.isArray(argv)) return argv ? String(argv) : "";
  return argv.map((arg) => (/^[\w@%+=:,./-]+$/.test(arg) ? arg : "'" + String(arg).replace(/'/g, "'\\''") + "'")).join(" ");
}

function showError(node, error) {
  node.textContent = error && error.message !== undefined ? error.message : String(error);
  node.hidden = false;
}

function clearError(node) {
  node.textContent = "";
  node.hidden = true;
}

/** A definition list of [label, value] rows (values may be nodes). */
function factList(rows) {
  const list = el("dl", { class: "facts" });
  for (const [label, value] of rows) {
    if (value === undefined) continue;
    list.append(el("dt", { text: label }), el("dd", {}, value instanceof Node ? value : formatValue(value)));
  }
  return list;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Run `task` now and again `ms` after each run ends (never two at once) until stop(). */
function poller(task, ms) {
  let timer = null, stopped = false;
  async function tick() {
    if (stopped) return;
    try { await task(); } catch (error) { console.error(error); }
    if (!stopped) timer = setTimeout(tick, ms);
  }
  tick();
  return { stop() { stopped = true; clearTimeout(timer); } };
}

// ============================================================ API

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const token = localStorage.getItem(TOKEN_STORAGE);
  if (token) headers["X-Loraft-Token"] = token;
  return headers;
}

async function errorSentence(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (error) { /* not JSON: say the HTTP status */ }
  return t("error.http", { status: response.status, text: response.statusText });
}

/** Call the REST API; answers the parsed JSON, or throws ApiError carrying the server's one sentence. */
async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: authHeaders(), cache: "no-store" };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(t("error.unreachable"), 0);
  }
  if (response.status === 401) askForToken();
  else $("token-box").hidden = true; // the token (or none) is accepted
  if (!response.ok) throw new ApiError(await errorSentence(response), response.status);
  return response.status === 204 ? null : response.json();
}

function askForToken() {
  const box = $("token-box");
  if (box.hidden) {
    box.hidden = false;
    $("token").focus();
  }
}

const runPath = (name) => "/api/runs/" + encodeURIComponent(name);

// ============================================================ router

const ROUTES = { runs: runsView, new: newRunView, run: runView, data: dataView, chat: chatView };
let currentView = null;

function route() {
  if (currentView) currentView.unmount();
  currentView = null;
  clearError($("error"));
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const page = parts[0] || "runs";
  const param = decodeURIComponent(parts.slice(1).join("/"));
  const factory = ROUTES[page];
  const needsName = page === "run" || page === "chat";
  const template = factory && !(needsName && !param) ? "tpl-" + page : "tpl-not-found";
  const root = $("view");
  root.replaceChildren($(template).content.cloneNode(true));
  window.scrollTo(0, 0);
  applyI18n(root);
  document.querySelectorAll("header nav a").forEach((link) => {
    link.classList.toggle("active", link.dataset.nav === page);
  });
  if (template === "tpl-not-found") return;
  currentView = factory();
  currentView.mount(root, param);
}

// ============================================================ #/runs

function runsView() {
  let root, runs = null, poll = null;

  function render() {
    const body = root.querySelector("#runs tbody");
    body.replaceChildren(...runs.map((run) => {
      const link = el("a", { href: "#/run/" + encodeURIComponent(run.name), text: run.name });
      const fraction = isNumber(run.step) && isNumber(run.total_steps) && run.total_steps > 0 ? run.step / run.total_steps : null;
      const status = el("td", { class: "status" });
      setStatus(status, run.status);
      // a run the UI cannot read (a bad name, a folder it may not open) says why, and the others still show
      if (run.error) status.append(el("div", { class: "muted small run-error", text: run.error }));
      return el("tr", { dataset: { run: run.name } },
        el("td", { class: "name" }, link),
        status,
        el("td", { class: "progress" },
          el("span", { class: "step", text: `${formatInteger(run.step)} / ${formatInteger(run.total_steps)}` }),
          fraction === null ? null : el("span", { class: "bar" }, el("span", { style: `width:${Math.min(100, fraction * 100).toFixed(1)}%` }))),
        el("td", { class: "loss", text: formatLoss(run.loss) }),
        el("td", { class: "started", title: run.started_at || "", text: formatTime(run.started_at) }),
        el("td", { class: "base-model", text: run.base_model || DASH }),
        el("td", { class: "actions" },
          el("a", { href: "#/run/" + encodeURIComponent(run.name), class: "button small", i18n: "runs.open" })));
    }));
    $("runs-empty").hidden = runs.length > 0;
  }

  async function refresh() {
    const error = root.querySelector(".error");
    try {
      runs = await api("/api/runs");
      clearError(error);
      render();
    } catch (failure) {
      showError(error, failure);
    }
  }

  return {
    mount(viewRoot) {
      root = viewRoot;
      api("/api/info").then((info) => { $("workspace").textContent = info.workspace || ""; }).catch(() => {});
      poll = poller(refresh, POLL_MS);
    },
    unmount() { if (poll) poll.stop(); },
    relabel() { if (runs) render(); },
  };
}

// ============================================================ #/new

const SECTION_KEYS = {
  run: "section.run", model: "section.model", data: "section.data", adapter: "section.adapter",
  train: "section.train", preference: "section.preference", generation: "section.generation",
};
const SECTION_ORDER = ["model", "data", "adapter", "train", "preference", "generation", "run"];
const SET_BY_THE_UI = ["output_dir"]; // the run's name decides output_dir (WORKSPACE/NAME)

/** A property that is a string or null (Optional[str]: a path, a name, a loss variant). */
function isOptionalString(property) {
  const types = (property.anyOf || []).map((option) => option.type).sort();
  return types.length === 2 && types[0] === "null" && types[1] === "string";
}

/** How a schema property is edited: enum/bool as a select, numbers as number inputs, the rest as YAML text. */
function widgetFor(property) {
  if (Array.isArray(property.enum)) return { kind: "choice", options: property.enum.map(String) };
  if (property.type === "boolean") return { kind: "choice", options: ["true", "false"] };
  if (property.type === "integer") return { kind: "number", step: "1" };
  if (property.type === "number") return { kind: "number", step: "any" };
  if (property.type === "string") return { kind: "string" };
  if (isOptionalString(property)) return { kind: "optional_string" }; // text, or null to unset it
  return { kind: "yaml" }; // unions (str or list, int or "auto", optional values) and lists are typed as YAML
}

function typeName(property) {
  if (Array.isArray(property.enum)) return property.enum.join(" | ");
  if (property.const !== undefined) return JSON.stringify(property.const);
  if (property.anyOf) return property.anyOf.map(typeName).join(" | ");
  if (property.type === "array") return `list[${property.items ? typeName(property.items) : "any"}]`;
  return { integer: "int", number: "float", string: "str", boolean: "bool", null: "null" }[property.type] || "any";
}

function defaultText(value) {
  if (value === undefined) return "";
  if (value === null) return "null";
  return typeof value === "string" ? value : JSON.stringify(value);
}

// A value the server parses as YAML; a plain string that YAML would read as something else is quoted.
const YAML_AMBIGUOUS = /^(?:true|false|yes|no|on|off|y|n|null|~)$|^[-+.]?\d|^[\s[\]{}&*!|>'"%@`#,?:-]|:\s|\s#|\s$/i;

function overrideValue(raw, kind) {
  if (kind === "optional_string" && /^(?:null|~)$/i.test(raw)) return raw; // unset it
  return (kind === "string" || kind === "optional_string") && YAML_AMBIGUOUS.test(raw) ? JSON.stringify(raw) : raw;
}

function buildSchemaForm(container, schema) {
  const defs = schema.$defs || {};
  const resolve = (property) => (property.$ref ? defs[property.$ref.split("/").pop()] || {} : property);
  const sections = {};
  for (const [name, property] of Object.entries(schema.properties || {})) {
    const resolved = resolve(property);
    if (resolved.type === "object" && resolved.properties) sections[name] = { fields: resolved.properties, prefix: name + "." };
    else if (!SET_BY_THE_UI.includes(name)) (sections.run = sections.run || { fields: {}, prefix: "" }).fields[name] = property;
  }
  const names = Object.keys(sections).sort((a, b) => {
    const rank = (name) => (SECTION_ORDER.includes(name) ? SECTION_ORDER.indexOf(name) : SECTION_ORDER.length);
    return rank(a) - rank(b);
  });
  container.replaceChildren(...names.map((section) => {
    const { fields, prefix } = sections[section];
    const heading = el("summary", {},
      SECTION_KEYS[section] ? el("span", { i18n: SECTION_KEYS[section] }) : el("span", { text: section }),
      section === "run" ? null : el("code", { class: "muted", text: section }));
    const grid = el("div", { class: "field-grid" });
    for (const [field, raw] of Object.entries(fields)) {
      const property = resolve(raw);
      const key = prefix + field;
      const widget = widgetFor(property);
      const description = property.description || raw.description || "";
      const id = "field-" + key.replace(/\W/g, "-");
      let input;
      if (widget.kind === "choice") {
        input = el("select", { id, dataset: { key, kind: widget.kind } },
          el("option", { value: "", i18n: "new.unchanged" }),
          ...widget.options.map((option) => el("option", { value: option, text: option })));
      } else {
        input = el("input", {
          id, type: widget.kind === "number" ? "number" : "text", step: widget.step, spellcheck: "false",
          dataset: { key, kind: widget.kind },
        });
      }
      input.title = description;
      grid.append(el("div", { class: "field", dataset: { field: key } },
        el("label", { for: id }, el("code", { text: field }), " ", el("span", { class: "type", text: typeName(property) })),
        input,
        el("p", { class: "help" }, description, " ",
          el("span", { class: "default", dataset: { value: defaultText(property.default) },
                       text: t("new.default_value", { value: defaultText(property.default) }) }))));
    }
    return el("details", { class: "section panel", open: true, dataset: { section } }, heading, grid);
  }));
}

function newRunView() {
  let root, info = null, lastAnswer = null, planTimer = null, planSequence = 0, copiedTimer = null;

  const configSelect = () => $("run-config");
  const usesYamlText = () => (configSelect().selectedOptions[0] || {}).dataset?.kind === "yaml";
  const config = () => (usesYamlText() ? $("run-yaml").value : configSelect().value);

  function overrides() {
    const fromFields = [...root.querySelectorAll("#schema-form [data-key]")]
      .filter((input) => input.value.trim() !== "")
      .map((input) => `${input.dataset.key}=${overrideValue(input.value.trim(), input.dataset.kind)}`);
    const typed = $("run-overrides").value.split("\n").map((line) => line.trim())
      .filter((line) => line && !line.startsWith("#"));
    return fromFields.concat(typed);
  }

  // the model field suggests the workspace's GGUF files and model folders (typing a path or hub id still works)
  function offerModels(paths) {
    const input = root.querySelector('#schema-form [data-key="model.name_or_path"]');
    if (!input || !paths.length) return;
    const list = el("datalist", { id: "model-files" }, ...paths.map((path) => el("option", { value: path })));
    input.setAttribute("list", "model-files");
    input.after(list);
  }

  function fillConfigSelect() {
    const select = configSelect();
    const presets = el("optgroup", { dataset: { group: "presets" } },
      ...(info.presets || []).map((name) => el("option", { value: name, text: name })));
    const files = el("optgroup", { dataset: { group: "files" } },
      ...(info.yaml_files || []).map((path) => el("option", { value: path, text: path })));
    const text = el("option", { value: "", dataset: { kind: "yaml" }, i18n: "new.yaml_option" });
    select.replaceChildren(presets, ...(files.children.length ? [files] : []), text);
    select.value = (info.presets || []).includes("demo") ? "demo" : select.options[0].value;
    labelGroups();
  }

  function labelGroups() {
    root.querySelectorAll("#run-config optgroup").forEach((group) => {
      group.label = t(group.dataset.group === "presets" ? "new.presets" : "new.workspace_files");
    });
  }

  function schedulePlan() {
    clearTimeout(planTimer);
    root.querySelectorAll("#schema-form .field").forEach((field) => {
      const input = field.querySelector("[data-key]");
      field.classList.toggle("changed", input.value.trim() !== "");
    });
    planTimer = setTimeout(updatePlan, PLAN_DEBOUNCE_MS);
  }

  async function updatePlan() {
    const sequence = ++planSequence;
    const name = $("run-name").value.trim();
    $("plan-busy").hidden = false;
    try {
      const answer = await api("/api/plan", { method: "POST", body: { config: config(), overrides: overrides(), ...(name ? { name } : {}) } });
      if (sequence !== planSequence) return; // a later change already asked again
      lastAnswer = answer;
      clearError($("plan-error"));
      renderAnswer();
    } catch (failure) {
      if (sequence !== planSequence) return;
      showError($("plan-error"), failure);
      $("plan").classList.add("stale");
      $("plan-command").classList.add("stale");
    } finally {
      if (sequence === planSequence && $("plan-busy")) $("plan-busy").hidden = true;
    }
  }

  function renderAnswer() {
    if (!lastAnswer) return;
    $("plan-command").textContent = lastAnswer.command_text || shellLine(lastAnswer.command);
    $("plan").replaceChildren(renderPlan(lastAnswer.plan));
    $("plan").classList.remove("stale");
    $("plan-command").classList.remove("stale");
  }

  async function copyCommand() {
    const text = $("plan-command").textContent;
    if (!text) return;
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) { // no clipboard API outside a secure context: select it for Ctrl+C instead
      const range = document.createRange();
      range.selectNodeContents($("plan-command"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      document.execCommand("copy");
    }
    const button = $("copy-command");
    button.dataset.i18n = "new.copied";
    button.textContent = t("new.copied");
    clearTimeout(copiedTimer);
    copiedTimer = setTimeout(() => { button.dataset.i18n = "new.copy"; button.textContent = t("new.copy"); }, 1500);
  }

  async function startRun(event) {
    event.preventDefault();
    const error = $("new-run-error");
    const name = $("run-name").value.trim();
    if (!name) {
      showError(error, t("new.name_required"));
      $("run-name").focus();
      return;
    }
    $("start-run").disabled = true;
    try {
      const answer = await api("/api/runs", { method: "POST", body: { name, config: config(), overrides: overrides() } });
      location.hash = "#/run/" + encodeURIComponent(answer.name || name);
    } catch (failure) {
      showError(error, failure);
    } finally {
      if ($("start-run")) $("start-run").disabled = false;
    }
  }

  return {
    async mount(viewRoot) {
      root = viewRoot;
      const form = $("new-run-form");
      form.addEventListener("input", schedulePlan);
      form.addEventListener("change", schedulePlan);
      form.addEventListener("submit", startRun);
      configSelect().addEventListener("change", () => { $("run-yaml-field").hidden = !usesYamlText(); });
      $("copy-command").addEventListener("click", copyCommand);
      try {
        const [infoAnswer, schema] = await Promise.all([api("/api/info"), api("/api/schema")]);
        info = infoAnswer;
        fillConfigSelect();
        buildSchemaForm($("schema-form"), schema);
        offerModels(info.model_files || []);
        updatePlan();
      } catch (failure) {
        showError($("new-run-error"), failure);
      }
    },
    unmount() { clearTimeout(planTimer); clearTimeout(copiedTimer); planSequence++; },
    relabel() {
      labelGroups();
      root.querySelectorAll("#schema-form .default").forEach((node) => {
        node.textContent = t("new.default_value", { value: node.dataset.value });
      });
      renderAnswer();
    },
  };
}

// ============================================================ plan and data report (new run, run view, data view)

// [label key, value from the plan, reason key]
const PLAN_ROWS = [
  ["plan.device", (p) => p.device, "device"],
  ["plan.precision", (p) => p.precision, "precision"],
  ["plan.weights", (p) => p.weights, "weights"],
  ["plan.sub_batches", (p) => (isNumber(p.micro_batch_tokens) && p.micro_batch_tokens > 0
    ? t("plan.sub_batches_value", { tokens: p.micro_batch_tokens }) : formatValue(p.micro_batch_tokens)), "micro_batch_tokens"],
  ["plan.batch", (p) => t("plan.batch_value", { samples: formatValue(p.samples_per_batch), accumulation: formatValue(p.accumulation) }), "batch"],
  ["plan.sampler", (p) => p.sampler, "sampler"],
  ["plan.packing", (p) => p.packing, "packing"],
  ["plan.fused_loss", (p) => p.fused_loss, "fused_loss"],
  ["plan.speed_path", (p) => p.speed_path || t("plan.none"), "speed_path"],
  ["plan.attention", (p) => p.attention || t("plan.library_default"), "attention"],
  ["plan.optimizer", (p) => p.optimizer, "optimizer"],
  ["plan.gradient_checkpointing", (p) => p.gradient_checkpointing, "gradient_checkpointing"],
  ["plan.generation_dtype", (p) => p.generation_dtype, "generation_dtype"],
  ["plan.world_size", (p) => p.world_size, "world_size"],
];

/** `loraft plan --json`'s report, readably: the model, each decision with its reason, parameters, memory. */
function renderPlan(report) {
  if (!report || typeof report !== "object") return el("p", { class: "muted", i18n: "plan.missing" });
  // a run directory may keep the whole report or only its "plan" part
  const plan = report.plan && typeof report.plan === "object" ? report.plan : report;
  const reasons = plan.reasons || {};
  const box = el("div", { class: "plan" });
  const facts = [];
  if (report.model) facts.push([t("plan.model"), report.model]);
  if (report.parameters) {
    const { trainable, total } = report.parameters;
    const percent = isNumber(trainable) && isNumber(total) && total > 0 ? (100 * trainable / total).toFixed(2) : DASH;
    facts.push([t("plan.parameters"), t("plan.parameters_value", { trainable: formatInteger(trainable), total: formatInteger(total), percent })]);
  }
  if (report.memory) {
    const parts = Object.entries(report.memory.parts_gib || {}).map(([part, gib]) => `${part} ${gib}`).join(" + ");
    facts.push([t("plan.memory"), el("span", { title: report.memory.how || "" },
      t("plan.memory_value", { peak: formatValue(report.memory.peak_gib) }), parts ? el("div", { class: "muted small", text: "= " + parts }) : null)]);
  }
  if (report.autotune) facts.push([t("plan.autotune"), report.autotune]);
  if (facts.length) box.append(factList(facts));
  const table = el("table", { class: "grid plan-table" });
  for (const [labelKey, value, reasonKey] of PLAN_ROWS) {
    const shown = value(plan);
    if (reasonKey === "world_size" && !(plan.world_size > 1)) continue;
    table.append(el("tr", { dataset: { row: reasonKey } },
      el("th", { text: t(labelKey) }),
      el("td", {}, el("code", { class: "value", text: formatValue(shown) }),
        reasons[reasonKey] ? el("div", { class: "reason", text: reasons[reasonKey] }) : null)));
  }
  box.append(table);
  // autotune's measurement: what it chose, and how long measuring took (the raw timings stay in the file)
  const tuning = plan.tuning;
  if (tuning && typeof tuning === "object" && tuning.choice && typeof tuning.choice === "object") {
    const rows = Object.entries(tuning.choice);
    if (isNumber(tuning.seconds)) rows.push([t("plan.tuning_seconds"), formatDuration(tuning.seconds)]);
    box.append(el("h4", { i18n: "plan.tuning" }), factList(rows));
  }
  return box;
}

/** `loraft data check --json`'s report, readably. */
function renderDataReport(report) {
  if (!report || typeof report !== "object") return el("p", { class: "muted", i18n: "report.missing" });
  if (report.prompt_roles) return renderPreferenceReport(report);
  const rows = [
    [t("report.source"), t("report.source_value", { path: report.path, kind: formatValue(report.source_kind), format: formatValue(report.format) })],
    [t("report.records"), formatInteger(report.records_read)],
  ];
  if (report.roles) {
    rows.push([t("report.turns"), t("report.turns_value", {
      system: formatInteger(report.roles.system), user: formatInteger(report.roles.user), assistant: formatInteger(report.roles.assistant) })]);
  }
  rows.push([t("report.empty_outputs"), formatInteger(report.empty_outputs)],
            [t("report.multi_turn"), formatInteger(report.multi_turn_records)]);
  if ("samples_kept" in report) {
    const dropped = Object.entries(report.dropped || {}).map(([reason, count]) => `${formatInteger(count)} ${reason.replace(/_/g, " ")}`);
    const tokens = report.tokens || {};
    const percent = isNumber(tokens.supervised) && tokens.total ? Math.round(100 * tokens.supervised / tokens.total) : DASH;
    const lengths = report.length_percentiles || {};
    rows.push(
      [t("report.tokenizer"), t("report.tokenizer_value", { tokenizer: formatValue(report.tokenizer), template: formatValue(report.template), max_length: formatValue(report.max_length) })],
      [t("report.samples"), t("report.samples_value", { kept: formatInteger(report.samples_kept), dropped: dropped.join(", ") || t("report.none") })],
      [t("report.truncated"), formatInteger(report.truncated_samples)],
      [t("report.tokens"), t("report.tokens_value", { total: formatInteger(tokens.total), supervised: formatInteger(tokens.supervised), percent, prompt: formatInteger(tokens.prompt) })],
      [t("report.lengths"), `p50 ${formatValue(lengths.p50)} · p90 ${formatValue(lengths.p90)} · p99 ${formatValue(lengths.p99)} · max ${formatValue(lengths.max)}`]);
  }
  if (report.eval) {
    const origin = report.eval.path || t("report.eval_fraction", { fraction: formatValue(report.eval.eval_fraction) });
    rows.push([t("report.eval"), t("report.eval_value", { kept: formatInteger(report.eval.samples_kept), origin })]);
  }
  if ("cache_hit" in report) rows.push([t("report.cache"), report.cache_hit ? t("report.cache_hit") : t("report.cache_miss")]);
  return factList(rows);
}

/** check_preferences' report (preference records), readably: records, prompts, and with a tokenizer the cuts,
 * the tokens per part and the lengths of prompt + longest completion. */
function renderPreferenceReport(report) {
  const labels = report.labels;
  const rows = [
    [t("report.source"), t("report.source_value", { path: report.path, kind: formatValue(report.source_kind), format: formatValue(report.format) })],
    [t("report.records"), labels
      ? t("report.unpaired_value", { records: formatInteger(report.records_read), desirable: formatInteger(labels.desirable), undesirable: formatInteger(labels.undesirable) })
      : t("report.pairs_value", { records: formatInteger(report.records_read) })],
    [t("report.prompt_turns"), t("report.turns_value", {
      system: formatInteger(report.prompt_roles.system), user: formatInteger(report.prompt_roles.user), assistant: formatInteger(report.prompt_roles.assistant) })],
    [t("report.multi_turn"), formatInteger(report.multi_turn_records)],
  ];
  if ("samples" in report) {
    const limit = (value) => (value === null || value === undefined ? t("report.off") : formatValue(value));
    const part = ([name, count]) => `${SIDE_KEYS[name] ? t(SIDE_KEYS[name]) : name} ${formatInteger(count)}`;
    const lengths = report.length_percentiles || {};
    rows.push(
      [t("report.tokenizer"), t("report.preference_tokenizer_value", { tokenizer: formatValue(report.tokenizer), template: formatValue(report.template),
        max_length: formatValue(report.max_length), max_prompt_length: limit(report.max_prompt_length), max_completion_length: limit(report.max_completion_length) })],
      [t("report.truncated_prompts"), formatInteger(report.truncated_prompts)],
      [t("report.truncated_completions"), Object.entries(report.truncated_completions || {}).map(part).join(" · ")],
      [t("report.tokens"), Object.entries(report.tokens || {}).map(part).join(" · ")],
      [t("report.preference_lengths"), `p50 ${formatValue(lengths.p50)} · p90 ${formatValue(lengths.p90)} · p99 ${formatValue(lengths.p99)} · max ${formatValue(lengths.max)}`]);
  }
  return factList(rows);
}

// ============================================================ #/run/NAME

const SERIES = ["loss", "eval_loss", "learning_rate", "grad_norm"];
const SERIES_KEYS = { loss: "series.loss", eval_loss: "series.eval_loss", learning_rate: "series.learning_rate", grad_norm: "series.grad_norm" };
const SERIES_STYLE = {
  loss: { stroke: "#2f6fec", width: 2, scale: "loss" },
  eval_loss: { stroke: "#e8590c", width: 2, scale: "loss", spanGaps: true, points: { show: true, size: 7 } },
  learning_rate: { stroke: "#2b8a3e", width: 1.5, scale: "lr", dash: [6, 4] },
  grad_norm: { stroke: "#9c36b5", width: 1, scale: "loss" },
};
// a preference run (DPO, KTO, ORPO) logs TRL's implicit rewards too: two more charts, shown once one is logged
const REWARD_SERIES = ["rewards/chosen", "rewards/rejected", "rewards/margins"];
const ACCURACY_SERIES = ["rewards/accuracies"]; // DPO and ORPO; KTO logs none
const REWARD_KEYS = {
  "rewards/chosen": "series.rewards_chosen", "rewards/rejected": "series.rewards_rejected",
  "rewards/margins": "series.rewards_margins", "rewards/accuracies": "series.reward_accuracy",
};
const REWARD_STYLE = {
  "rewards/chosen": { stroke: "#2b8a3e", width: 2 },
  "rewards/rejected": { stroke: "#c92a2a", width: 2 },
  "rewards/margins": { stroke: "#2f6fec", width: 1.5, dash: [6, 4] },
  "rewards/accuracies": { stroke: "#9c36b5", width: 2 },
};
const ALL_SERIES = [...SERIES, ...REWARD_SERIES, ...ACCURACY_SERIES];
const ETA_WINDOW = 6; // logged steps the speed is measured over

let points = emptyPoints();

function emptyPoints() {
  return Object.fromEntries(ALL_SERIES.map((series) => [series, []]));
}

/** JSON as Python writes it: a non-finite loss is written as a bare NaN/Infinity, which JSON.parse refuses. */
function parseMetricJson(text) {
  try { return JSON.parse(text); } catch (error) {
    return JSON.parse(text.replace(/-?\bInfinity\b|\bNaN\b/g, "null"));
  }
}

function runView() {
  let root, name, closed = false, detail = null, state = null, jobs = [];
  let byStep = Object.fromEntries(ALL_SERIES.map((series) => [series, new Map()]));
  let times = new Map(); // step -> wall time of the training log lines, for the ETA
  let speed = null; // {step, value}: the newest tokens-per-second figure
  let lastEventId = null, streaming = false, controller = new AbortController();
  let chart = null, chartTimer = null, resizeObserver = null, shown = { loss: true, eval_loss: true, learning_rate: true, grad_norm: false };
  let poll = null, tick = 0, stopping = false;
  let rewardCharts = null; // {rewards, accuracy}: uPlot charts, made when the first reward arrives

  // ---------- points and chart

  function clearPoints() {
    byStep = Object.fromEntries(ALL_SERIES.map((series) => [series, new Map()]));
    times = new Map();
    speed = null;
    points = emptyPoints();
  }

  function addMetric(line) {
    if (!line || !isNumber(line.step)) return;
    const step = line.step;
    // the end-of-training summary has train_loss and no loss: it is not a point of the curve
    if ("loss" in line) {
      byStep.loss.set(step, line.loss);
      if (isNumber(line.time)) times.set(step, line.time);
    }
    for (const series of ["eval_loss", "learning_rate", "grad_norm", ...REWARD_SERIES, ...ACCURACY_SERIES]) {
      if (series in line) byStep[series].set(step, line[series]);
    }
    const tokensPerSecond = isNumber(line.supervised_tokens_per_second) ? line.supervised_tokens_per_second : line.train_tokens_per_second;
    if (isNumber(tokensPerSecond) && (!speed || step >= speed.step)) speed = { step, value: tokensPerSecond };
  }

  function rebuildPoints() {
    points = Object.fromEntries(ALL_SERIES.map((series) => [series, [...byStep[series].entries()].sort((a, b) => a[0] - b[0])]));
  }

  function chartData() {
    const steps = [...new Set(SERIES.flatMap((series) => [...byStep[series].keys()]))].sort((a, b) => a - b);
    const logY = $("log-y").checked;
    return [steps, ...SERIES.map((series) => steps.map((step) => {
      const value = byStep[series].get(step);
      if (!isNumber(value)) return null;
      return logY && series !== "learning_rate" && value <= 0 ? null : value;
    }))];
  }

  function buildChart() {
    if (chart) chart.destroy();
    const container = $("chart");
    const logY = $("log-y").checked;
    chart = new uPlot({
      width: Math.max(300, container.clientWidth), height: 280,
      scales: { x: { time: false }, loss: { distr: logY ? 3 : 1 }, lr: {} },
      series: [
        { label: t("run.step_axis"), value: (u, v) => (v === null ? DASH : formatInteger(v)) },
        ...SERIES.map((series) => Object.assign({ label: t(SERIES_KEYS[series]), show: shown[series],
          value: (u, v) => (v === null ? DASH : series === "learning_rate" ? formatRate(v) : formatDecimal(v, 4)) }, SERIES_STYLE[series])),
      ],
      axes: [
        { label: t("run.step_axis"), labelSize: 18 },
        { scale: "loss", label: t("run.loss_axis"), labelSize: 18 },
        { scale: "lr", side: 1, label: t("run.lr_axis"), labelSize: 18, size: 70, grid: { show: false },
          values: (u, values) => values.map((v) => (v === null ? "" : v.toExponential(1))) },
      ],
      legend: { live: true },
      hooks: {
        setSeries: [(u, index) => { // the legend can toggle a series too: keep the checkboxes in step
          if (!index) return;
          const series = SERIES[index - 1];
          shown[series] = u.series[index].show;
          const box = root.querySelector(`#series-toggles [data-series="${series}"]`);
          if (box) box.checked = shown[series];
        }],
      },
    }, chartData(), container);
  }

  // ---------- reward charts (preference runs): their panel is made here, after the curves' panel

  function rewardPanel() {
    const box = (id, title) => el("div", { class: "reward-chart", id: id + "-box" }, el("h3", { i18n: title }), el("div", { id: id + "-chart" }));
    return el("div", { class: "panel", id: "reward-panel", hidden: true },
      el("div", { class: "reward-charts" }, box("rewards", "run.rewards_chart"), box("accuracy", "run.accuracy_chart")));
  }

  function seriesData(names) {
    const steps = [...new Set(names.flatMap((series) => [...byStep[series].keys()]))].sort((a, b) => a - b);
    return [steps, ...names.map((series) => steps.map((step) => (isNumber(byStep[series].get(step)) ? byStep[series].get(step) : null)))];
  }

  function rewardChart(container, names, axisKey, range) {
    const digits = range ? 3 : 4;
    return new uPlot({
      width: Math.max(240, container.clientWidth), height: 220,
      scales: { x: { time: false }, y: range ? { range } : {} },
      series: [
        { label: t("run.step_axis"), value: (u, v) => (v === null ? DASH : formatInteger(v)) },
        ...names.map((series) => Object.assign({ label: t(REWARD_KEYS[series]), spanGaps: true,
          value: (u, v) => (v === null ? DASH : formatDecimal(v, digits)) }, REWARD_STYLE[series])),
      ],
      axes: [{ label: t("run.step_axis"), labelSize: 18 }, { label: t(axisKey), labelSize: 18 }],
      legend: { live: true },
    }, seriesData(names), container);
  }

  function destroyRewardCharts() {
    if (!rewardCharts) return;
    rewardCharts.rewards.destroy();
    rewardCharts.accuracy.destroy();
    rewardCharts = null;
  }

  /** Show the reward charts when a reward is logged (an SFT run logs none: the page is as it was), and draw them. */
  function drawRewards(rebuild) {
    const panel = $("reward-panel");
    if (!panel) return;
    const hasRewards = [...REWARD_SERIES, ...ACCURACY_SERIES].some((series) => byStep[series].size > 0);
    panel.hidden = !hasRewards;
    $("accuracy-box").hidden = !ACCURACY_SERIES.some((series) => byStep[series].size > 0);
    if (rebuild || !hasRewards) destroyRewardCharts();
    if (!hasRewards) return;
    if (!rewardCharts) {
      rewardCharts = {
        rewards: rewardChart($("rewards-chart"), REWARD_SERIES, "run.reward_axis"),
        accuracy: rewardChart($("accuracy-chart"), ACCURACY_SERIES, "run.accuracy_axis", [0, 1]),
      };
    } else {
      rewardCharts.rewards.setData(seriesData(REWARD_SERIES));
      rewardCharts.accuracy.setData(seriesData(ACCURACY_SERIES));
    }
  }

  // events come in bursts (a replay sends the whole file): draw once per burst; a timer, not an animation frame,
  // so a background tab still keeps its points
  function scheduleChart() {
    if (chartTimer) return;
    chartTimer = setTimeout(() => {
      chartTimer = null;
      if (closed) return;
      rebuildPoints();
      if (chart) chart.setData(chartData());
      drawRewards(false);
      $("chart-empty").hidden = points.loss.length + points.eval_loss.length > 0;
      renderProgress();
    }, 50);
  }

  // ---------- state, progress, details

  function currentStep() {
    const logged = points.loss.length ? points.loss[points.loss.length - 1][0] : null;
    return state && isNumber(state.step) ? state.step : logged;
  }

  function eta(step, total) {
    const status = state && state.status;
    if (status === "finished") return t("run.eta_done");
    if (!ACTIVE_STATUSES.includes(status) || !isNumber(step) || !isNumber(total)) return DASH;
    const recent = [...times.entries()].sort((a, b) => a[0] - b[0]).slice(-ETA_WINDOW);
    if (recent.length < 2) return DASH;
    const [first, last] = [recent[0], recent[recent.length - 1]];
    const secondsPerStep = (last[1] - first[1]) / (last[0] - first[0]);
    return isNumber(secondsPerStep) && secondsPerStep > 0 ? formatDuration((total - step) * secondsPerStep) : DASH;
  }

  function renderProgress() {
    const step = currentStep();
    const total = state ? state.total_steps : null;
    $("step").textContent = formatInteger(step);
    $("total-steps").textContent = formatInteger(total);
    const progress = $("progress");
    progress.value = isNumber(step) && isNumber(total) && total > 0 ? Math.min(1, step / total) : 0;
    $("eta").textContent = eta(step, total);
    $("tokens-per-second").textContent = speed ? formatInteger(Math.round(speed.value)) : DASH;
    const lastLoss = points.loss.length ? points.loss[points.loss.length - 1][1] : state && state.loss;
    $("last-loss").textContent = formatLoss(lastLoss);
  }

  function applyState(next, fromDetail) {
    if (!next || typeof next !== "object") return;
    const changed = !state || state.status !== next.status;
    state = Object.assign({}, state, next);
    setStatus($("run-status"), state.status);
    const active = ACTIVE_STATUSES.includes(state.status);
    if (!active) stopping = false;
    $("stop-run").disabled = !["running", "starting"].includes(state.status) || stopping;
    const hasCheckpoint = Boolean(state.checkpoint) || Boolean(detail && detail.checkpoints && detail.checkpoints.length);
    $("resume-run").disabled = !["stopped", "interrupted", "failed"].includes(state.status) || !hasCheckpoint;
    renderProgress();
    if (changed && detail && !fromDetail) refreshDetail(); // new checkpoints, the failure sentence
    if (active) startStream();
  }

  function renderDetail() {
    if (!detail) return;
    const error = $("run-error");
    if (detail.error) showError(error, detail.error); else clearError(error);
    const checkpoints = detail.checkpoints || [];
    $("checkpoints").replaceChildren(...(checkpoints.length
      ? checkpoints.map((checkpoint) => el("li", { dataset: { checkpoint } }, el("code", { text: checkpoint })))
      : [el("li", { class: "muted", i18n: "run.no_checkpoints" })]));
    const command = detail.command_text || shellLine(detail.command);
    const resume = detail.resume_command_text || shellLine(detail.resume_command);
    $("run-command").textContent = command + (resume ? "\n" + t("run.resume_command_comment") + "\n" + resume : "");
    $("run-plan").replaceChildren(renderPlan(detail.plan));
    $("run-data-report").replaceChildren(renderDataReport(detail.data_report));
  }

  async function refreshDetail() {
    try {
      detail = await api(runPath(name));
      clearError($("run-api-error"));
      renderDetail();
      applyState(detail.state, true);
    } catch (failure) {
      showError($("run-api-error"), failure);
    }
  }

  async function refreshLog() {
    try {
      const log = await api(runPath(name) + "/log?lines=200");
      const lines = ($("log-source").value === "train_log" ? log.train_log : log.console) || [];
      const pre = $("log-tail");
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
      // a progress bar redraws its line with \r: show what a terminal would
      pre.textContent = lines.map((line) => String(line).split("\r").filter(Boolean).pop() || "").join("\n");
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    } catch (failure) {
      showError($("run-api-error"), failure);
    }
  }

  // ---------- live curve: server-sent events read with fetch (EventSource cannot send the token header)

  function handleEvent(block) {
    let event = "message", id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // a comment: the keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (event === "reset") {
      clearPoints();
      lastEventId = null;
      scheduleChart();
    }
    if (id !== null && id !== "") lastEventId = id;
    if (!data.length) return;
    const text = data.join("\n");
    if (event === "metric") {
      addMetric(parseMetricJson(text));
      scheduleChart();
    } else if (event === "state") {
      applyState(parseMetricJson(text));
    }
  }

  /** One connection; true when the server ended it after a final state (no reconnect needed). */
  async function readStream() {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastEventId !== null) headers["Last-Event-ID"] = String(lastEventId);
    let response;
    try {
      response = await fetch(runPath(name) + "/events", { headers, signal: controller.signal, cache: "no-store" });
    } catch (error) {
      return false;
    }
    if (!response.ok) {
      if (response.status === 401) askForToken();
      showError($("run-api-error"), new Error(await errorSentence(response)));
      return response.status === 404;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // normalise line ends, keeping a trailing \r back in case its \n is in the next chunk
        const held = buffer.endsWith("\r") ? "\r" : "";
        buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
        buffer += held;
      }
    } catch (error) {
      return false; // dropped (the UI restarted): reconnect with Last-Event-ID
    }
    return Boolean(state) && !ACTIVE_STATUSES.includes(state.status);
  }

  async function startStream() {
    if (streaming || closed) return;
    streaming = true;
    try {
      while (!closed) {
        if (await readStream()) break;
        if (!closed) await sleep(RECONNECT_MS);
      }
    } finally {
      streaming = false;
    }
  }

  // ---------- jobs: eval, merge, export

  const JOB_KEYS = { eval: "job.eval", merge: "job.merge", export: "job.export" };
  const EVAL_ROWS = [
    ["eval.loss", ["loss"], 4], ["eval.perplexity", ["perplexity"], 2], ["eval.exact_match", ["exact_match"], 2],
    ["ROUGE-1", ["words", "rouge-1"], 2, "eval.words"], ["ROUGE-2", ["words", "rouge-2"], 2, "eval.words"],
    ["ROUGE-L", ["words", "rouge-l"], 2, "eval.words"], ["BLEU-4", ["words", "bleu-4"], 2, "eval.words"],
    ["ROUGE-1", ["chars", "rouge-1"], 2, "eval.chars"], ["ROUGE-2", ["chars", "rouge-2"], 2, "eval.chars"],
    ["ROUGE-L", ["chars", "rouge-l"], 2, "eval.chars"], ["BLEU-4", ["chars", "bleu-4"], 2, "eval.chars"],
  ];

  const PREFERENCE_ROWS = [
    ["eval.preference_accuracy", "accuracy"], ["eval.margin", "margin"], ["eval.reward_chosen", "reward_chosen"],
    ["eval.reward_rejected", "reward_rejected"], ["eval.logprob_accuracy", "logprob_accuracy"],
    ["eval.label_accuracy", "label_accuracy"],
  ];

  // `loraft eval` on preference records: the run and (with --base) its starting point, each by its own measure
  function preferenceEvalTable(result) {
    const scores = result.preference;
    const columns = ["reference", "adapter"].filter((column) => scores[column]);
    const table = el("table", { class: "grid eval-table" },
      el("tr", {}, el("th", { i18n: "eval.metric" }), ...columns.map((column) => el("th", { i18n: column === "reference" ? "eval.reference" : "eval.adapter" }))),
      el("tr", {}, el("th", { i18n: "eval.measure" }), ...columns.map((column) => el("td", { text: formatValue(scores[column].measure) }))));
    for (const [label, key] of PREFERENCE_ROWS) {
      const values = columns.map((column) => scores[column][key]);
      if (values.every((value) => value === undefined || value === null)) continue;
      table.append(el("tr", {}, el("th", { i18n: label }), ...values.map((value) => el("td", { text: formatDecimal(value, 4) }))));
    }
    const about = t("eval.preference_about", { records: formatValue(result.records), data: formatValue(result.data),
                                                objective: formatValue(result.objective) });
    return el("div", {}, el("p", { class: "muted small", text: about }), table);
  }

  function evalTable(result) {
    if (result.preference) return preferenceEvalTable(result);
    const columns = ["base", "adapter"].filter((column) => result[column]);
    const table = el("table", { class: "grid eval-table" },
      el("tr", {}, el("th", { i18n: "eval.metric" }), ...columns.map((column) => el("th", { i18n: column === "base" ? "eval.base" : "eval.adapter" }))));
    for (const [label, path, digits, unit] of EVAL_ROWS) {
      const values = columns.map((column) => path.reduce((node, key) => (node && typeof node === "object" ? node[key] : undefined), result[column]));
      if (values.every((value) => value === undefined)) continue;
      const name = label.startsWith("eval.") ? t(label) : `${label} (${t(unit)})`;
      table.append(el("tr", {}, el("th", { text: name }), ...values.map((value) => el("td", { text: formatDecimal(value, digits) }))));
    }
    const about = t("eval.about", { records: formatValue(result.records), data: formatValue(result.data) });
    return el("div", {}, el("p", { class: "muted small", text: about }), table);
  }

  function exportVerdict(result) {
    const verify = result.verify;
    const files = result.files ? Object.entries(result.files).filter(([key]) => key !== "bytes").map(([, file]) => file).join(", ") : "";
    let verdict;
    if (!verify) verdict = el("p", { class: "verdict", i18n: "job.export_unverified" });
    else {
      const text = t(verify.passed ? "job.export_passed" : "job.export_failed", {
        diff: isNumber(verify.logprob_max_abs_diff) ? verify.logprob_max_abs_diff.toPrecision(3) : DASH,
        tolerance: formatValue(verify.tolerance),
        equal: formatValue(verify.tokenization && verify.tokenization.equal),
        strings: formatValue(verify.tokenization && verify.tokenization.strings),
      });
      verdict = el("p", { class: "verdict " + (verify.passed ? "good" : "bad"), text });
    }
    return el("div", {}, verdict, files ? el("p", { class: "muted small", text: t("job.files", { files }) }) : null);
  }

  function jobResult(job) {
    const result = job.result;
    if (result === null || result === undefined) return null;
    if (job.kind === "eval" && typeof result === "object") return evalTable(result);
    if (job.kind === "export" && typeof result === "object") return exportVerdict(result);
    if (job.kind === "merge") {
      const path = typeof result === "string" ? result : result.out_dir || result.out || result.path || JSON.stringify(result);
      return el("p", { class: "verdict good", text: t("job.merged_to", { path }) });
    }
    return el("pre", { class: "log", text: JSON.stringify(result, null, 2) });
  }

  function renderJobs() {
    $("jobs").replaceChildren(...jobs.map((job) => {
      const status = el("span", { class: "status" });
      setStatus(status, job.status);
      const consoleTail = (job.console || []).slice(-8).join("\n");
      return el("li", { class: "job", dataset: { job: job.id, kind: job.kind, status: job.status } },
        el("div", { class: "job-head" },
          el("strong", { text: JOB_KEYS[job.kind] ? t(JOB_KEYS[job.kind]) : job.kind }), " ", status,
          el("span", { class: "muted small", text: " " + [job.started_at, job.ended_at].filter(Boolean).map(formatTime).join(" → ") }),
          isNumber(job.exit_code) ? el("span", { class: "muted small", text: " " + t("job.exit_code", { code: job.exit_code }) }) : null),
        job.command ? el("code", { class: "command small", text: shellLine(job.command) }) : null,
        jobResult(job),
        consoleTail ? el("pre", { class: "log job-console", text: consoleTail }) : null);
    }));
  }

  async function refreshJobs() {
    try {
      const answer = await api("/api/jobs?run=" + encodeURIComponent(name));
      jobs = [...answer].reverse(); // newest first
      renderJobs();
    } catch (failure) {
      showError($("run-api-error"), failure); // #job-error is for starting a job
    }
  }

  async function startJob(body) {
    const error = $("job-error");
    clearError(error);
    try {
      await api(runPath(name) + "/jobs", { method: "POST", body });
      await refreshJobs();
    } catch (failure) {
      showError(error, failure);
    }
  }

  function evalJob() {
    const data = $("eval-data").value.trim();
    if (!data) { showError($("job-error"), t("run.eval_data_required")); $("eval-data").focus(); return; }
    const body = { kind: "eval", data, base: $("eval-base").checked };
    const limit = parseInt($("eval-limit").value, 10);
    if (limit > 0) body.limit = limit;
    startJob(body);
  }

  // ---------- actions

  async function stopRun() {
    stopping = true;
    $("stop-run").disabled = true;
    try {
      const answer = await api(runPath(name) + "/stop", { method: "POST", body: {} });
      clearError($("run-api-error"));
      if (answer && answer.status) applyState({ status: answer.status });
    } catch (failure) {
      stopping = false;
      showError($("run-api-error"), failure);
    }
    refreshDetail();
  }

  async function resumeRun() {
    $("resume-run").disabled = true;
    try {
      await api(runPath(name) + "/resume", { method: "POST", body: {} });
      clearError($("run-api-error"));
      // a fresh connection: the resumed process trims metrics.jsonl, and the server answers with a reset
      controller.abort();
      controller = new AbortController();
      applyState({ status: "starting" });
    } catch (failure) {
      showError($("run-api-error"), failure);
    }
    refreshDetail();
  }

  // one poll every 2 s: details and log while the run is live, jobs while one runs; everything every 10 s
  async function pollTick() {
    const live = !state || ACTIVE_STATUSES.includes(state.status) || stopping;
    const everything = tick++ % 5 === 0;
    const jobsRunning = jobs.some((job) => job.status === "running");
    await Promise.all([
      live || everything ? refreshDetail() : null,
      live || everything ? refreshLog() : null,
      jobsRunning || everything ? refreshJobs() : null,
    ]);
    if (state && ACTIVE_STATUSES.includes(state.status) && !streaming) startStream();
  }

  return {
    mount(viewRoot, runName) {
      root = viewRoot;
      name = runName;
      points = emptyPoints();
      $("run-view").dataset.run = name;
      $("run-title").textContent = name;
      $("chat-link").href = "#/chat/" + encodeURIComponent(name);
      $("stop-run").addEventListener("click", stopRun);
      $("resume-run").addEventListener("click", resumeRun);
      $("job-eval").addEventListener("click", evalJob);
      $("job-merge").addEventListener("click", () => startJob({ kind: "merge", dtype: $("merge-dtype").value }));
      $("job-export").addEventListener("click", () => startJob({ kind: "export", outtype: $("export-outtype").value }));
      $("log-source").addEventListener("change", refreshLog);
      $("log-y").addEventListener("change", buildChart);
      root.querySelectorAll("#series-toggles [data-series]").forEach((box) => {
        box.checked = shown[box.dataset.series];
        box.addEventListener("change", () => {
          shown[box.dataset.series] = box.checked;
          if (chart) chart.setSeries(SERIES.indexOf(box.dataset.series) + 1, { show: box.checked });
        });
      });
      buildChart();
      $("chart").closest(".panel").after(rewardPanel());
      resizeObserver = new ResizeObserver(() => {
        if (chart) chart.setSize({ width: Math.max(300, $("chart").clientWidth), height: 280 });
        if (rewardCharts) {
          rewardCharts.rewards.setSize({ width: Math.max(240, $("rewards-chart").clientWidth), height: 220 });
          rewardCharts.accuracy.setSize({ width: Math.max(240, $("accuracy-chart").clientWidth), height: 220 });
        }
      });
      resizeObserver.observe($("chart"));
      resizeObserver.observe($("rewards-chart"));
      resizeObserver.observe($("accuracy-chart"));
      poll = poller(pollTick, POLL_MS);
      startStream();
    },
    unmount() {
      closed = true;
      controller.abort();
      if (poll) poll.stop();
      if (resizeObserver) resizeObserver.disconnect();
      clearTimeout(chartTimer);
      if (chart) chart.destroy();
      destroyRewardCharts();
    },
    relabel() {
      if (state) setStatus($("run-status"), state.status);
      renderDetail();
      renderJobs();
      renderProgress();
      buildChart();
      drawRewards(true); // a chart's series and axis names are given when it is made: made again, as buildChart
    },
  };
}

// ============================================================ #/data

const VISIBLE_WHITESPACE = { " ": "·", "\n": "↵", "\t": "⇥", "\r": "␍" };

function visibleToken(text) {
  if (text === "") return "∅";
  return String(text).replace(/[ \n\t\r]/g, (char) => VISIBLE_WHITESPACE[char]);
}

/** Token spans of ids[from..to) (tokens as `tokens` pieces): supervised ones (a label that is not -100)
 * highlighted, special ones marked, each with its index in the whole sequence. */
function tokenSpans(tokens, ids, labels, from = 0, to = ids.length) {
  const body = el("div", { class: "tokens" });
  for (let i = from; i < to; i++) {
    const token = tokens[i] || { text: String(ids[i]), special: false };
    const classes = ["token"];
    if (labels[i] !== undefined && labels[i] !== -100) classes.push("supervised");
    if (token.special) classes.push("special");
    body.append(el("span", { class: classes.join(" "), dataset: { index: String(i) }, title: `#${i} · id ${ids[i]}`, text: visibleToken(token.text) }));
    if (String(token.text).includes("\n")) body.append(el("br")); // keep the sample's own line breaks
  }
  return body;
}

/** The mark of `count` tokens cut (at the end; from the start: `where` "start"). */
function cutMark(count, where) {
  const key = where === "start" ? (count === 1 ? "data.cut_start_one" : "data.cut_start") : (count === 1 ? "data.cut_one" : "data.cut");
  return el("span", { class: "cut", dataset: { cut: String(count), where: where || "end" }, text: t(key, { count: formatInteger(count) }) });
}

const sampleTokens = (sample) => sample.tokens || (sample.input_ids || []).map((id) => ({ text: String(id), special: false }));

function renderSample(sample, index) {
  const ids = sample.input_ids || [];
  const labels = sample.labels || [];
  const supervised = labels.filter((label) => label !== -100).length;
  const head = el("div", { class: "sample-head" },
    el("strong", { text: t("data.sample_title", { number: index + 1 }) }), " ",
    el("span", { class: "muted", text: sample.source || "" }), " ",
    el("span", { class: "small", text: t("data.sample_counts", { tokens: formatInteger(ids.length), supervised: formatInteger(supervised) }) }));
  const body = tokenSpans(sampleTokens(sample), ids, labels);
  if (sample.truncated) body.append(cutMark((isNumber(sample.full_length) ? sample.full_length : ids.length) - ids.length));
  return el("div", { class: "sample", dataset: { index: String(index) } }, head, body);
}

const PREFERENCE_SIDES = ["chosen", "rejected", "completion"];
const SIDE_KEYS = { prompt: "data.prompt", chosen: "data.chosen", rejected: "data.rejected", completion: "data.completion" };

/** A preference record (preview_preferences' sample): the prompt once, then each completion (chosen and rejected,
 * or the one KTO completion with its label), token by token as renderSample draws an SFT sample. Each side holds
 * the prompt's tokens too (labelled -100): they are drawn once, from the first side. */
function renderPreference(sample, index) {
  const names = PREFERENCE_SIDES.filter((name) => sample[name] && typeof sample[name] === "object");
  const first = sample[names[0]] || {};
  const promptTokens = (first.labels || []).filter((label) => label === -100).length;
  const head = el("div", { class: "sample-head" },
    el("strong", { text: t("data.sample_title", { number: index + 1 }) }), " ",
    el("span", { class: "muted", text: sample.source || "" }), " ",
    el("span", { class: "small", text: t("data.prompt_tokens", { tokens: formatInteger(promptTokens) }) }));
  const prompt = tokenSpans(sampleTokens(first), first.input_ids || [], first.labels || [], 0, promptTokens);
  if (sample.prompt_truncated) prompt.prepend(cutMark(sample.prompt_length - promptTokens, "start"));
  const parts = [el("div", { class: "side", dataset: { side: "prompt" } }, el("div", { class: "side-label", i18n: SIDE_KEYS.prompt }), prompt)];
  for (const name of names) {
    const side = sample[name];
    const ids = side.input_ids || [];
    const labels = side.labels || [];
    const body = tokenSpans(sampleTokens(side), ids, labels, promptTokens, ids.length);
    // what the cut took from this completion: its own length before the cut less what is left of it
    const fullCompletion = (isNumber(side.full_length) ? side.full_length : ids.length) - (isNumber(sample.prompt_length) ? sample.prompt_length : promptTokens);
    const cut = fullCompletion - (ids.length - promptTokens);
    if (cut > 0) body.append(cutMark(cut));
    const label = name === "completion" && typeof sample.label === "boolean"
      ? el("span", { class: "label-badge " + (sample.label ? "good" : "bad"), i18n: sample.label ? "data.desirable" : "data.undesirable" }) : null;
    parts.push(el("div", { class: "side", dataset: { side: name } },
      el("div", { class: "side-label" }, el("span", { i18n: SIDE_KEYS[name] }), " ", label,
        el("span", { class: "muted small", text: " " + t("data.side_tokens", { tokens: formatInteger(ids.length - promptTokens) }) })),
      body));
  }
  return el("div", { class: "sample preference", dataset: { index: String(index) } }, head, ...parts);
}

/** The preference length limits on the data form: made here, next to max_length (index.html has the rest). */
function preferenceLimitFields() {
  const fields = [["data-max-prompt-length", "data.max_prompt_length"], ["data-max-completion-length", "data.max_completion_length"]];
  return fields.map(([id, label]) => el("div", { class: "field" },
    el("label", { for: id, i18n: label }),
    el("input", { id, type: "number", min: "1", step: "1", placeholder: t("data.no_limit"), title: t("data.preference_limit_help"),
                  dataset: { i18nPlaceholder: "data.no_limit", i18nTitle: "data.preference_limit_help" } })));
}

function dataView() {
  let root, report = null, samples = null, preference = false;

  function request(withLimit) {
    const body = {
      path: $("data-path").value.trim(),
      template: $("data-template").value.trim() || "human_assistant",
      format: $("data-format").value,
      max_length: parseInt($("data-max-length").value, 10) || 256,
    };
    for (const key of ["max_prompt_length", "max_completion_length"]) {
      const value = parseInt($("data-" + key.replace(/_/g, "-")).value, 10);
      if (Number.isInteger(value)) body[key] = value; // empty: no limit (the server says what is wrong with 0)
    }
    const model = $("data-model").value.trim();
    if (model) body.model = model;
    if (withLimit) body.limit = parseInt($("data-limit").value, 10) || 5;
    return body;
  }

  /** The format choices are the config schema's (data.format), preference formats included. */
  async function fillFormats() {
    try {
      const schema = await api("/api/schema");
      const property = ((schema.$defs || {}).DataConfig || {}).properties || {};
      const formats = property.format && property.format.enum;
      if (!Array.isArray(formats) || !$("data-format")) return;
      const select = $("data-format");
      const chosen = select.value;
      select.replaceChildren(...formats.map((format) => el("option", { value: format, text: format })));
      select.value = formats.includes(chosen) ? chosen : formats[0];
    } catch (failure) { /* the page's own choices stay */ }
  }

  async function run(kind) {
    const error = $("data-error");
    clearError(error);
    const body = request(kind === "preview");
    if (!body.path) { showError(error, t("data.path_required")); $("data-path").focus(); return; }
    if (kind === "preview" && !body.model) { showError(error, t("data.model_required")); $("data-model").focus(); return; }
    $("data-busy").hidden = false;
    root.querySelectorAll("#data-form button").forEach((button) => { button.disabled = true; });
    try {
      if (kind === "check") {
        report = await api("/api/data/check", { method: "POST", body });
      } else {
        const answer = await api("/api/data/preview", { method: "POST", body });
        samples = answer.samples || [];
        preference = Boolean(answer.preference);
      }
      render();
    } catch (failure) {
      showError(error, failure);
    } finally {
      if ($("data-busy")) {
        $("data-busy").hidden = true;
        root.querySelectorAll("#data-form button").forEach((button) => { button.disabled = false; });
      }
    }
  }

  function render() {
    $("data-report").replaceChildren(...(report ? [el("div", { class: "panel" }, el("h3", { i18n: "data.report" }), renderDataReport(report))] : []));
    $("samples-legend").hidden = !samples;
    $("samples").replaceChildren(...(samples || []).map(preference ? renderPreference : renderSample));
    if (samples && !samples.length) $("samples").append(el("p", { class: "empty", i18n: "data.no_samples" }));
  }

  return {
    mount(viewRoot) {
      root = viewRoot;
      $("data-max-length").closest(".field").after(...preferenceLimitFields());
      $("data-form").addEventListener("submit", (event) => { event.preventDefault(); run("check"); });
      $("data-preview-button").addEventListener("click", () => run("preview"));
      fillFormats();
    },
    unmount() {},
    relabel() { render(); },
  };
}

// ============================================================ #/chat/NAME

function chatView() {
  let root, name, checkpoints = [], finished = false;

  function fillSelect() {
    const select = $("chat-checkpoint");
    const chosen = select.value;
    const options = [];
    if (finished || !checkpoints.length) options.push(el("option", { value: "", text: t("chat.final_adapter") }));
    for (const checkpoint of [...checkpoints].reverse()) {
      const step = checkpoint.replace(/^checkpoint-/, "");
      options.push(el("option", { value: checkpoint, text: t("chat.checkpoint_option", { step, name: checkpoint }) }));
    }
    select.replaceChildren(...options);
    if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
  }

  function showAdapter() {
    const checkpoint = $("chat-checkpoint").value;
    const base = "/chat/" + encodeURIComponent(name) + "/";
    const src = checkpoint ? base + "?checkpoint=" + encodeURIComponent(checkpoint) : base;
    if ($("chat-adapter").getAttribute("src") !== src) $("chat-adapter").src = src;
  }

  return {
    async mount(viewRoot, runName) {
      root = viewRoot;
      name = runName;
      $("chat-title").textContent = name;
      $("chat-back").href = "#/run/" + encodeURIComponent(name);
      // the chat pages (same origin) send the UI's token from localStorage themselves (static/chat.html)
      $("chat-base").src = "/chat/" + encodeURIComponent(name) + "/?base=1";
      $("chat-checkpoint").addEventListener("change", showAdapter);
      try {
        const detail = await api(runPath(name));
        checkpoints = detail.checkpoints || [];
        finished = (detail.state && detail.state.status) === "finished";
        fillSelect();
        showAdapter();
      } catch (failure) {
        showError(root.querySelector(".error"), failure);
      }
    },
    unmount() {},
    relabel() { if (name) fillSelect(); },
  };
}

// ============================================================ start

window.loraftUI = {
  get lang() { return lang; },
  t,
  catalogs,
  get points() { return points; },
  setLang,
};

async function start() {
  const select = $("lang");
  select.value = lang;
  select.addEventListener("change", () => setLang(select.value));
  const token = $("token");
  token.value = localStorage.getItem(TOKEN_STORAGE) || "";
  token.addEventListener("change", () => {
    localStorage.setItem(TOKEN_STORAGE, token.value.trim());
    route(); // ask again with the token
  });
  try {
    await loadCatalogs();
  } catch (error) { // without catalogs there is nothing to translate with: say it plainly
    showError($("error"), "loraft ui: cannot load the language catalogs (" + error.message + ")");
    return;
  }
  document.documentElement.lang = lang;
  applyI18n(document);
  window.addEventListener("hashchange", route);
  route();
}

start();
