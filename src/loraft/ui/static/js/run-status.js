// The run view's status: the run's state (status, buttons, progress cards) and its details (failure, checkpoints,
// command, plan, data report), from GET /api/runs/NAME and the stream's state events; and the log tail.

import { api, runPath } from "./api.js";
import { $, clearError, el, showError } from "./dom.js";
import { ACTIVE_STATUSES, DASH, formatDuration, formatInteger, formatLoss, isNumber, setStatus, shellLine } from "./format.js";
import { t } from "./i18n.js";
import { renderDataReport, renderPlan } from "./reports.js";

const ETA_WINDOW = 6; // logged steps the speed is measured over

/** The status part of `run` (its detail, state and stopping fields); `startStream` follows a run that is live. */
export function runStatus(run, { startStream }) {
  function currentStep() {
    const logged = run.points.loss.length ? run.points.loss[run.points.loss.length - 1][0] : null;
    return run.state && isNumber(run.state.step) ? run.state.step : logged;
  }

  function eta(step, total) {
    const status = run.state && run.state.status;
    if (status === "finished") return t("run.eta_done");
    if (!ACTIVE_STATUSES.includes(status) || !isNumber(step) || !isNumber(total)) return DASH;
    const recent = [...run.times.entries()].sort((a, b) => a[0] - b[0]).slice(-ETA_WINDOW);
    if (recent.length < 2) return DASH;
    const [first, last] = [recent[0], recent[recent.length - 1]];
    const secondsPerStep = (last[1] - first[1]) / (last[0] - first[0]);
    return isNumber(secondsPerStep) && secondsPerStep > 0 ? formatDuration((total - step) * secondsPerStep) : DASH;
  }

  function renderProgress() {
    const step = currentStep();
    const total = run.state ? run.state.total_steps : null;
    $("step").textContent = formatInteger(step);
    $("total-steps").textContent = formatInteger(total);
    const progress = $("progress");
    progress.value = isNumber(step) && isNumber(total) && total > 0 ? Math.min(1, step / total) : 0;
    $("eta").textContent = eta(step, total);
    $("tokens-per-second").textContent = run.speed ? formatInteger(Math.round(run.speed.value)) : DASH;
    const lastLoss = run.points.loss.length ? run.points.loss[run.points.loss.length - 1][1] : run.state && run.state.loss;
    $("last-loss").textContent = formatLoss(lastLoss);
  }

  function applyState(next, fromDetail) {
    if (!next || typeof next !== "object") return;
    const changed = !run.state || run.state.status !== next.status;
    run.state = Object.assign({}, run.state, next);
    const state = run.state;
    setStatus($("run-status"), state.status);
    const active = ACTIVE_STATUSES.includes(state.status);
    if (!active) run.stopping = false;
    $("stop-run").disabled = !["running", "starting"].includes(state.status) || run.stopping;
    const detail = run.detail;
    const hasCheckpoint = Boolean(state.checkpoint) || Boolean(detail && detail.checkpoints && detail.checkpoints.length);
    $("resume-run").disabled = !["stopped", "interrupted", "failed"].includes(state.status) || !hasCheckpoint;
    renderProgress();
    if (changed && detail && !fromDetail) refreshDetail(); // new checkpoints, the failure sentence
    if (active) startStream();
  }

  function renderDetail() {
    const detail = run.detail;
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
      run.detail = await api(runPath(run.name));
      clearError($("run-api-error"));
      renderDetail();
      applyState(run.detail.state, true);
    } catch (failure) {
      showError($("run-api-error"), failure);
    }
  }

  async function refreshLog() {
    try {
      const log = await api(runPath(run.name) + "/log?lines=200");
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

  return { applyState, renderProgress, renderDetail, refreshDetail, refreshLog };
}
