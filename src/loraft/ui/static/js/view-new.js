// #/new: a run's name, a config (preset, workspace YAML file or YAML text) and overrides from the schema form; the
// plan and the exact command are asked again (debounced) after every change, and Start posts the run.

import { api } from "./api.js";
import { $, clearError, el, showError } from "./dom.js";
import { shellLine } from "./format.js";
import { t } from "./i18n.js";
import { renderPlan } from "./reports.js";
import { buildSchemaForm, overrideValue } from "./schema-form.js";

const PLAN_DEBOUNCE_MS = 400;

export function newRunView() {
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
