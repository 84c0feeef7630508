// The run view's completions panel: a GRPO run's newest sampled completions (GET /api/runs/NAME/completions, from
// completions.jsonl) with their prompt, each reward and the advantage. Hidden for a run that logs none.

import { api, runPath } from "./api.js";
import { $, el, showError } from "./dom.js";
import { formatDecimal, formatInteger, isNumber } from "./format.js";

export const COMPLETIONS_SHOWN = 8;

/** The completions of `run`: mount() adds the panel after the reward panel, refresh() fetches and draws the newest. */
export function runCompletions(run) {
  function mount() {
    const panel = el("div", { class: "panel", id: "completions-panel", hidden: true },
      el("h3", { i18n: "run.completions" }),
      el("table", { class: "completions", id: "completions-table" },
        el("thead", {}, el("tr", {}, ...["run.step_axis", "run.prompt", "run.completion", "run.rewards", "run.advantage"]
          .map((key) => el("th", { i18n: key })))),
        el("tbody", { id: "completions-rows" })));
    ($("reward-panel") || $("chart").closest(".panel")).after(panel);
  }

  function row(item) {
    const rewards = Object.entries(item.rewards || {})
      .map(([name, value]) => `${name} ${isNumber(value) ? formatDecimal(value, 3) : "–"}`).join(", ");
    return el("tr", {},
      el("td", { text: isNumber(item.step) ? formatInteger(item.step) : "" }),
      el("td", { class: "prompt", text: String(item.prompt ?? "") }),
      el("td", { class: "completion", text: String(item.completion ?? "") }),
      el("td", { text: rewards }),
      el("td", { text: isNumber(item.advantage) ? formatDecimal(item.advantage, 3) : "" }));
  }

  async function refresh() {
    const panel = $("completions-panel");
    if (!panel) return;
    try {
      const answer = await api(runPath(run.name) + "/completions?lines=" + COMPLETIONS_SHOWN);
      const items = answer.completions || [];
      panel.hidden = items.length === 0;
      $("completions-rows").replaceChildren(...items.slice().reverse().map(row));
    } catch (failure) {
      showError($("run-api-error"), failure);
    }
  }

  return { mount, refresh };
}
