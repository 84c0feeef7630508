// The run view's charts: the training curves (loss, eval loss, learning rate, gradient norm; log scale, series
// toggles) and, for a preference or GRPO run, the reward and accuracy charts, drawn with the vendored uPlot (a global).

import { $, el } from "./dom.js";
import { DASH, formatDecimal, formatInteger, formatRate, isNumber } from "./format.js";
import { t } from "./i18n.js";
import { ACCURACY_SERIES, REWARD_SERIES, SERIES, rebuildPoints, seriesData } from "./run-state.js";

const SERIES_KEYS = { loss: "series.loss", eval_loss: "series.eval_loss", learning_rate: "series.learning_rate", grad_norm: "series.grad_norm" };
const SERIES_STYLE = {
  loss: { stroke: "#2f6fec", width: 2, scale: "loss" },
  eval_loss: { stroke: "#e8590c", width: 2, scale: "loss", spanGaps: true, points: { show: true, size: 7 } },
  learning_rate: { stroke: "#2b8a3e", width: 1.5, scale: "lr", dash: [6, 4] },
  grad_norm: { stroke: "#9c36b5", width: 1, scale: "loss" },
};
const REWARD_KEYS = {
  "rewards/chosen": "series.rewards_chosen", "rewards/rejected": "series.rewards_rejected",
  "rewards/margins": "series.rewards_margins", "rewards/accuracies": "series.reward_accuracy",
  reward: "series.reward", reward_std: "series.reward_std",
};
const REWARD_STYLE = {
  "rewards/chosen": { stroke: "#2b8a3e", width: 2 },
  "rewards/rejected": { stroke: "#c92a2a", width: 2 },
  "rewards/margins": { stroke: "#2f6fec", width: 1.5, dash: [6, 4] },
  "rewards/accuracies": { stroke: "#9c36b5", width: 2 },
  reward: { stroke: "#2b8a3e", width: 2 },
  reward_std: { stroke: "#868e96", width: 1.5, dash: [6, 4] },
};

/** The charts of `run` (its chart, rewardCharts, chartTimer, resizeObserver and shown fields); `afterDraw` runs
 * after each drawing of newly arrived points (the progress cards). */
export function runChart(run, { afterDraw }) {
  function chartData() {
    const steps = [...new Set(SERIES.flatMap((series) => [...run.byStep[series].keys()]))].sort((a, b) => a - b);
    const logY = $("log-y").checked;
    return [steps, ...SERIES.map((series) => steps.map((step) => {
      const value = run.byStep[series].get(step);
      if (!isNumber(value)) return null;
      return logY && series !== "learning_rate" && value <= 0 ? null : value;
    }))];
  }

  function buildChart() {
    if (run.chart) run.chart.destroy();
    const container = $("chart");
    const logY = $("log-y").checked;
    run.chart = new uPlot({
      width: Math.max(300, container.clientWidth), height: 280,
      scales: { x: { time: false }, loss: { distr: logY ? 3 : 1 }, lr: {} },
      series: [
        { label: t("run.step_axis"), value: (u, v) => (v === null ? DASH : formatInteger(v)) },
        ...SERIES.map((series) => Object.assign({ label: t(SERIES_KEYS[series]), show: run.shown[series],
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
          run.shown[series] = u.series[index].show;
          const box = run.root.querySelector(`#series-toggles [data-series="${series}"]`);
          if (box) box.checked = run.shown[series];
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
    }, seriesData(run, names), container);
  }

  function destroyRewardCharts() {
    if (!run.rewardCharts) return;
    run.rewardCharts.rewards.destroy();
    run.rewardCharts.accuracy.destroy();
    run.rewardCharts = null;
  }

  /** Show the reward charts when a reward is logged (an SFT run logs none: the page is as it was), and draw them. */
  function drawRewards(rebuild) {
    const panel = $("reward-panel");
    if (!panel) return;
    const hasRewards = [...REWARD_SERIES, ...ACCURACY_SERIES].some((series) => run.byStep[series].size > 0);
    panel.hidden = !hasRewards;
    $("accuracy-box").hidden = !ACCURACY_SERIES.some((series) => run.byStep[series].size > 0);
    if (rebuild || !hasRewards) destroyRewardCharts();
    if (!hasRewards) return;
    if (!run.rewardCharts) {
      run.rewardCharts = {
        rewards: rewardChart($("rewards-chart"), REWARD_SERIES, "run.reward_axis"),
        accuracy: rewardChart($("accuracy-chart"), ACCURACY_SERIES, "run.accuracy_axis", [0, 1]),
      };
    } else {
      run.rewardCharts.rewards.setData(seriesData(run, REWARD_SERIES));
      run.rewardCharts.accuracy.setData(seriesData(run, ACCURACY_SERIES));
    }
  }

  // events come in bursts (a replay sends the whole file): draw once per burst; a timer, not an animation frame,
  // so a background tab still keeps its points
  function scheduleChart() {
    if (run.chartTimer) return;
    run.chartTimer = setTimeout(() => {
      run.chartTimer = null;
      if (run.closed) return;
      rebuildPoints(run);
      if (run.chart) run.chart.setData(chartData());
      drawRewards(false);
      $("chart-empty").hidden = run.points.loss.length + run.points.eval_loss.length > 0;
      afterDraw();
    }, 50);
  }

  /** The toggles and the log scale wired, the curves drawn (empty), the reward panel added, sizes followed. */
  function mount() {
    $("log-y").addEventListener("change", buildChart);
    run.root.querySelectorAll("#series-toggles [data-series]").forEach((box) => {
      box.checked = run.shown[box.dataset.series];
      box.addEventListener("change", () => {
        run.shown[box.dataset.series] = box.checked;
        if (run.chart) run.chart.setSeries(SERIES.indexOf(box.dataset.series) + 1, { show: box.checked });
      });
    });
    buildChart();
    $("chart").closest(".panel").after(rewardPanel());
    run.resizeObserver = new ResizeObserver(() => {
      if (run.chart) run.chart.setSize({ width: Math.max(300, $("chart").clientWidth), height: 280 });
      if (run.rewardCharts) {
        run.rewardCharts.rewards.setSize({ width: Math.max(240, $("rewards-chart").clientWidth), height: 220 });
        run.rewardCharts.accuracy.setSize({ width: Math.max(240, $("accuracy-chart").clientWidth), height: 220 });
      }
    });
    run.resizeObserver.observe($("chart"));
    run.resizeObserver.observe($("rewards-chart"));
    run.resizeObserver.observe($("accuracy-chart"));
  }

  function unmount() {
    if (run.resizeObserver) run.resizeObserver.disconnect();
    clearTimeout(run.chartTimer);
    if (run.chart) run.chart.destroy();
    destroyRewardCharts();
  }

  return { build: buildChart, drawRewards, schedule: scheduleChart, mount, unmount };
}
