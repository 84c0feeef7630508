// #/data: check a data file (its report) or preview samples as the tokenizer and template cut them.

import { api } from "./api.js";
import { $, clearError, el, showError } from "./dom.js";
import { t } from "./i18n.js";
import { preferenceLimitFields, renderPreference, renderSample } from "./data-samples.js";
import { renderDataReport } from "./reports.js";

export function dataView() {
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
