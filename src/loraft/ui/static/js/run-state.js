// The run view's state: one plain object per mounted #/run/NAME, made by createRunState and handed to each part
// (run-chart, run-status, run-stream, run-jobs, run-actions), in place of the mutable locals of one big closure.
// Also the metric points it is drawn from: the lines of metrics.jsonl as the event stream sends them.

import { isNumber } from "./format.js";

export const SERIES = ["loss", "eval_loss", "learning_rate", "grad_norm"];
// a preference run (DPO, KTO, ORPO) logs TRL's implicit rewards too: two more charts, shown once one is logged
// a GRPO run logs the mean and spread of its summed reward (reward, reward_std) on the same chart
export const REWARD_SERIES = ["rewards/chosen", "rewards/rejected", "rewards/margins", "reward", "reward_std"];
export const ACCURACY_SERIES = ["rewards/accuracies"]; // DPO and ORPO; KTO logs none
const ALL_SERIES = [...SERIES, ...REWARD_SERIES, ...ACCURACY_SERIES];

export function emptyPoints() {
  return Object.fromEntries(ALL_SERIES.map((series) => [series, []]));
}

const emptySteps = () => Object.fromEntries(ALL_SERIES.map((series) => [series, new Map()]));

/** A fresh state for the run `name` shown in `root`. Each part reads and writes the fields it names; nothing else holds any. */
export function createRunState(name, root) {
  return {
    name,
    root, // the view's element (#view)
    closed: false, // unmounted: timers and the stream stop
    // the server's view (run-status, run-jobs, run-actions)
    detail: null, // GET /api/runs/NAME
    state: null, // the run's state: the detail's, updated by the stream's state events and by stop/resume
    jobs: [], // GET /api/jobs?run=NAME, newest first
    stopping: false, // Stop was pressed and the run has not ended yet
    poll: null, // the poller (run-view)
    tick: 0, // polls so far: every fifth refreshes everything
    // the metrics (run-stream writes, run-chart and run-status read)
    byStep: emptySteps(), // series -> Map(step -> value)
    times: new Map(), // step -> wall time of the training log lines, for the ETA
    speed: null, // {step, value}: the newest tokens-per-second figure
    points: emptyPoints(), // series -> [[step, value]...] sorted: what is drawn (window.loraftUI.points)
    // the event stream (run-stream)
    lastEventId: null,
    streaming: false,
    controller: new AbortController(),
    // the charts (run-chart)
    chart: null, // the uPlot of the training curves
    rewardCharts: null, // {rewards, accuracy}: uPlot charts, made when the first reward arrives
    chartTimer: null,
    resizeObserver: null,
    shown: { loss: true, eval_loss: true, learning_rate: true, grad_norm: false },
  };
}

export function clearPoints(run) {
  run.byStep = emptySteps();
  run.times = new Map();
  run.speed = null;
  run.points = emptyPoints();
}

export function addMetric(run, line) {
  if (!line || !isNumber(line.step)) return;
  const step = line.step;
  // the end-of-training summary has train_loss and no loss: it is not a point of the curve
  if ("loss" in line) {
    run.byStep.loss.set(step, line.loss);
    if (isNumber(line.time)) run.times.set(step, line.time);
  }
  for (const series of ["eval_loss", "learning_rate", "grad_norm", ...REWARD_SERIES, ...ACCURACY_SERIES]) {
    if (series in line) run.byStep[series].set(step, line[series]);
  }
  const tokensPerSecond = isNumber(line.supervised_tokens_per_second) ? line.supervised_tokens_per_second : line.train_tokens_per_second;
  if (isNumber(tokensPerSecond) && (!run.speed || step >= run.speed.step)) run.speed = { step, value: tokensPerSecond };
}

export function rebuildPoints(run) {
  run.points = Object.fromEntries(ALL_SERIES.map((series) => [series, [...run.byStep[series].entries()].sort((a, b) => a[0] - b[0])]));
}

/** Steps and, per series of `names`, the value at each step (null where none): uPlot's data. */
export function seriesData(run, names) {
  const steps = [...new Set(names.flatMap((series) => [...run.byStep[series].keys()]))].sort((a, b) => a - b);
  return [steps, ...names.map((series) => steps.map((step) => (isNumber(run.byStep[series].get(step)) ? run.byStep[series].get(step) : null)))];
}

/** JSON as Python writes it: a non-finite loss is written as a bare NaN/Infinity, which JSON.parse refuses. */
export function parseMetricJson(text) {
  try { return JSON.parse(text); } catch (error) {
    return JSON.parse(text.replace(/-?\bInfinity\b|\bNaN\b/g, "null"));
  }
}
