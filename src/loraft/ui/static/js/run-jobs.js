// The run view's jobs: eval, merge and export started from their forms (POST /api/runs/NAME/jobs) and listed from
// GET /api/jobs?run=NAME, newest first.

import { api, runPath } from "./api.js";
import { $, clearError, el, showError } from "./dom.js";
import { formatTime, isNumber, setStatus, shellLine } from "./format.js";
import { t } from "./i18n.js";
import { jobResult } from "./job-results.js";

const JOB_KEYS = { eval: "job.eval", merge: "job.merge", export: "job.export" };

/** The jobs part of `run` (its jobs field). */
export function runJobs(run) {
  function renderJobs() {
    $("jobs").replaceChildren(...run.jobs.map((job) => {
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
      const answer = await api("/api/jobs?run=" + encodeURIComponent(run.name));
      run.jobs = [...answer].reverse(); // newest first
      renderJobs();
    } catch (failure) {
      showError($("run-api-error"), failure); // #job-error is for starting a job
    }
  }

  async function startJob(body) {
    const error = $("job-error");
    clearError(error);
    try {
      await api(runPath(run.name) + "/jobs", { method: "POST", body });
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

  /** The three job buttons wired. */
  function mount() {
    $("job-eval").addEventListener("click", evalJob);
    $("job-merge").addEventListener("click", () => startJob({ kind: "merge", dtype: $("merge-dtype").value }));
    $("job-export").addEventListener("click", () => startJob({ kind: "export", outtype: $("export-outtype").value }));
  }

  return { render: renderJobs, refresh: refreshJobs, mount };
}
