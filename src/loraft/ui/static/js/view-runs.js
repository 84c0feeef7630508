// #/runs: the workspace's runs, polled.

import { api } from "./api.js";
import { $, clearError, el, poller, POLL_MS, showError } from "./dom.js";
import { DASH, formatInteger, formatLoss, formatTime, isNumber, setStatus } from "./format.js";

export function runsView() {
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
