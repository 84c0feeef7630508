// The run view's actions: Stop and Resume (POST /api/runs/NAME/stop and /resume).

import { api, runPath } from "./api.js";
import { $, clearError, showError } from "./dom.js";

/** The actions of `run` (its stopping field); `applyState` and `refreshDetail` are the status part's, `reconnect`
 * the stream's. */
export function runActions(run, { applyState, refreshDetail, reconnect }) {
  async function stopRun() {
    run.stopping = true;
    $("stop-run").disabled = true;
    try {
      const answer = await api(runPath(run.name) + "/stop", { method: "POST", body: {} });
      clearError($("run-api-error"));
      if (answer && answer.status) applyState({ status: answer.status });
    } catch (failure) {
      run.stopping = false;
      showError($("run-api-error"), failure);
    }
    refreshDetail();
  }

  async function resumeRun() {
    $("resume-run").disabled = true;
    try {
      await api(runPath(run.name) + "/resume", { method: "POST", body: {} });
      clearError($("run-api-error"));
      // a fresh connection: the resumed process trims metrics.jsonl, and the server answers with a reset
      reconnect();
      applyState({ status: "starting" });
    } catch (failure) {
      showError($("run-api-error"), failure);
    }
    refreshDetail();
  }

  /** The two buttons wired. */
  function mount() {
    $("stop-run").addEventListener("click", stopRun);
    $("resume-run").addEventListener("click", resumeRun);
  }

  return { stop: stopRun, resume: resumeRun, mount };
}
