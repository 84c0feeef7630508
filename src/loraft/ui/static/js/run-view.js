// #/run/NAME: one run, live. The view makes the run's state (run-state.js) and its parts, each given that state and
// the few functions of the others it calls: the charts, the status and details, the event stream, the jobs and the
// actions. One poll every 2 s keeps the details, the log, a GRPO run's completions and the jobs fresh; the stream
// draws the curve.

import { $, poller, POLL_MS } from "./dom.js";
import { ACTIVE_STATUSES, setStatus } from "./format.js";
import { runActions } from "./run-actions.js";
import { runChart } from "./run-chart.js";
import { runCompletions } from "./run-completions.js";
import { runJobs } from "./run-jobs.js";
import { createRunState, emptyPoints } from "./run-state.js";
import { runStatus } from "./run-status.js";
import { runStream } from "./run-stream.js";

// the run view shown last: its points are window.loraftUI.points (the tests read the curve there)
let latest = { points: emptyPoints() };

/** The points of the run view shown last (empty before any). */
export const shownPoints = () => latest.points;

export function runView() {
  let run = null, parts = null;

  /** The parts of `run`, wired to one another. */
  function makeParts() {
    const chart = runChart(run, { afterDraw: () => status.renderProgress() });
    const status = runStatus(run, { startStream: () => stream.start() });
    const stream = runStream(run, { applyState: status.applyState, scheduleChart: chart.schedule });
    const jobs = runJobs(run);
    const completions = runCompletions(run);
    const actions = runActions(run, { applyState: status.applyState, refreshDetail: status.refreshDetail,
                                      reconnect: stream.reconnect });
    return { chart, status, stream, jobs, actions, completions };
  }

  // one poll every 2 s: details and log while the run is live, jobs while one runs; everything every 10 s
  async function pollTick() {
    const { status, jobs, stream, completions } = parts;
    const live = !run.state || ACTIVE_STATUSES.includes(run.state.status) || run.stopping;
    const everything = run.tick++ % 5 === 0;
    const jobsRunning = run.jobs.some((job) => job.status === "running");
    await Promise.all([
      live || everything ? status.refreshDetail() : null,
      live || everything ? status.refreshLog() : null,
      live || everything ? completions.refresh() : null,
      jobsRunning || everything ? jobs.refresh() : null,
    ]);
    if (run.state && ACTIVE_STATUSES.includes(run.state.status) && !run.streaming) stream.start();
  }

  return {
    mount(viewRoot, runName) {
      run = createRunState(runName, viewRoot);
      latest = run;
      parts = makeParts();
      $("run-view").dataset.run = run.name;
      $("run-title").textContent = run.name;
      $("chat-link").href = "#/chat/" + encodeURIComponent(run.name);
      parts.actions.mount();
      parts.jobs.mount();
      $("log-source").addEventListener("change", parts.status.refreshLog);
      parts.chart.mount();
      parts.completions.mount();
      run.poll = poller(pollTick, POLL_MS);
      parts.stream.start();
    },
    unmount() {
      run.closed = true;
      parts.stream.close();
      if (run.poll) run.poll.stop();
      parts.chart.unmount();
    },
    relabel() {
      if (run.state) setStatus($("run-status"), run.state.status);
      parts.status.renderDetail();
      parts.jobs.render();
      parts.status.renderProgress();
      parts.chart.build();
      parts.chart.drawRewards(true); // a chart's series and axis names are given when it is made: made again, as build
    },
  };
}
