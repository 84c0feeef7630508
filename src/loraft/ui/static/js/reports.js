// The reports loraft writes, readably: `loraft plan --json`'s plan (new run, run view) and `loraft data check
// --json`'s data report (run view, data page), preference records' included.

import { el } from "./dom.js";
import { DASH, formatDuration, formatInteger, formatValue, isNumber } from "./format.js";
import { t } from "./i18n.js";

// the parts of a preference record (the data page's samples name them too)
export const SIDE_KEYS = { prompt: "data.prompt", chosen: "data.chosen", rejected: "data.rejected", completion: "data.completion" };

/** A definition list of [label, value] rows (values may be nodes). */
function factList(rows) {
  const list = el("dl", { class: "facts" });
  for (const [label, value] of rows) {
    if (value === undefined) continue;
    list.append(el("dt", { text: label }), el("dd", {}, value instanceof Node ? value : formatValue(value)));
  }
  return list;
}

// [label key, value from the plan, reason key]
const PLAN_ROWS = [
  ["plan.device", (p) => p.device, "device"],
  ["plan.precision", (p) => p.precision, "precision"],
  ["plan.weights", (p) => p.weights, "weights"],
  ["plan.sub_batches", (p) => (isNumber(p.micro_batch_tokens) && p.micro_batch_tokens > 0
    ? t("plan.sub_batches_value", { tokens: p.micro_batch_tokens }) : formatValue(p.micro_batch_tokens)), "micro_batch_tokens"],
  ["plan.batch", (p) => t("plan.batch_value", { samples: formatValue(p.samples_per_batch), accumulation: formatValue(p.accumulation) }), "batch"],
  ["plan.sampler", (p) => p.sampler, "sampler"],
  ["plan.packing", (p) => p.packing, "packing"],
  ["plan.fused_loss", (p) => p.fused_loss, "fused_loss"],
  ["plan.speed_path", (p) => p.speed_path || t("plan.none"), "speed_path"],
  ["plan.attention", (p) => p.attention || t("plan.library_default"), "attention"],
  ["plan.optimizer", (p) => p.optimizer, "optimizer"],
  ["plan.gradient_checkpointing", (p) => p.gradient_checkpointing, "gradient_checkpointing"],
  ["plan.generation_dtype", (p) => p.generation_dtype, "generation_dtype"],
  ["plan.world_size", (p) => p.world_size, "world_size"],
];

/** `loraft plan --json`'s report, readably: the model, each decision with its reason, parameters, memory. */
export function renderPlan(report) {
  if (!report || typeof report !== "object") return el("p", { class: "muted", i18n: "plan.missing" });
  // a run directory may keep the whole report or only its "plan" part
  const plan = report.plan && typeof report.plan === "object" ? report.plan : report;
  const reasons = plan.reasons || {};
  const box = el("div", { class: "plan" });
  const facts = [];
  if (report.model) facts.push([t("plan.model"), report.model]);
  if (report.parameters) {
    const { trainable, total } = report.parameters;
    const percent = isNumber(trainable) && isNumber(total) && total > 0 ? (100 * trainable / total).toFixed(2) : DASH;
    facts.push([t("plan.parameters"), t("plan.parameters_value", { trainable: formatInteger(trainable), total: formatInteger(total), percent })]);
  }
  if (report.memory) {
    const parts = Object.entries(report.memory.parts_gib || {}).map(([part, gib]) => `${part} ${gib}`).join(" + ");
    facts.push([t("plan.memory"), el("span", { title: report.memory.how || "" },
      t("plan.memory_value", { peak: formatValue(report.memory.peak_gib) }), parts ? el("div", { class: "muted small", text: "= " + parts }) : null)]);
  }
  if (report.autotune) facts.push([t("plan.autotune"), report.autotune]);
  if (facts.length) box.append(factList(facts));
  const table = el("table", { class: "grid plan-table" });
  for (const [labelKey, value, reasonKey] of PLAN_ROWS) {
    const shown = value(plan);
    if (reasonKey === "world_size" && !(plan.world_size > 1)) continue;
    table.append(el("tr", { dataset: { row: reasonKey } },
      el("th", { text: t(labelKey) }),
      el("td", {}, el("code", { class: "value", text: formatValue(shown) }),
        reasons[reasonKey] ? el("div", { class: "reason", text: reasons[reasonKey] }) : null)));
  }
  box.append(table);
  // autotune's measurement: what it chose, and how long measuring took (the raw timings stay in the file)
  const tuning = plan.tuning;
  if (tuning && typeof tuning === "object" && tuning.choice && typeof tuning.choice === "object") {
    const rows = Object.entries(tuning.choice);
    if (isNumber(tuning.seconds)) rows.push([t("plan.tuning_seconds"), formatDuration(tuning.seconds)]);
    box.append(el("h4", { i18n: "plan.tuning" }), factList(rows));
  }
  return box;
}

/** `loraft data check --json`'s report, readably. */
export function renderDataReport(report) {
  if (!report || typeof report !== "object") return el("p", { class: "muted", i18n: "report.missing" });
  if (report.prompt_roles) return renderPreferenceReport(report);
  const rows = [
    [t("report.source"), t("report.source_value", { path: report.path, kind: formatValue(report.source_kind), format: formatValue(report.format) })],
    [t("report.records"), formatInteger(report.records_read)],
  ];
  if (report.roles) {
    rows.push([t("report.turns"), t("report.turns_value", {
      system: formatInteger(report.roles.system), user: formatInteger(report.roles.user), assistant: formatInteger(report.roles.assistant) })]);
  }
  rows.push([t("report.empty_outputs"), formatInteger(report.empty_outputs)],
            [t("report.multi_turn"), formatInteger(report.multi_turn_records)]);
  if ("samples_kept" in report) {
    const dropped = Object.entries(report.dropped || {}).map(([reason, count]) => `${formatInteger(count)} ${reason.replace(/_/g, " ")}`);
    const tokens = report.tokens || {};
    const percent = isNumber(tokens.supervised) && tokens.total ? Math.round(100 * tokens.supervised / tokens.total) : DASH;
    const lengths = report.length_percentiles || {};
    rows.push(
      [t("report.tokenizer"), t("report.tokenizer_value", { tokenizer: formatValue(report.tokenizer), template: formatValue(report.template), max_length: formatValue(report.max_length) })],
      [t("report.samples"), t("report.samples_value", { kept: formatInteger(report.samples_kept), dropped: dropped.join(", ") || t("report.none") })],
      [t("report.truncated"), formatInteger(report.truncated_samples)],
      [t("report.tokens"), t("report.tokens_value", { total: formatInteger(tokens.total), supervised: formatInteger(tokens.supervised), percent, prompt: formatInteger(tokens.prompt) })],
      [t("report.lengths"), `p50 ${formatValue(lengths.p50)} · p90 ${formatValue(lengths.p90)} · p99 ${formatValue(lengths.p99)} · max ${formatValue(lengths.max)}`]);
  }
  if (report.eval) {
    const origin = report.eval.path || t("report.eval_fraction", { fraction: formatValue(report.eval.eval_fraction) });
    rows.push([t("report.eval"), t("report.eval_value", { kept: formatInteger(report.eval.samples_kept), origin })]);
  }
  if ("cache_hit" in report) rows.push([t("report.cache"), report.cache_hit ? t("report.cache_hit") : t("report.cache_miss")]);
  return factList(rows);
}

/** check_preferences' report (preference records), readably: records, prompts, and with a tokenizer the cuts,
 * the tokens per part and the lengths of prompt + longest completion. */
function renderPreferenceReport(report) {
  const labels = report.labels;
  const rows = [
    [t("report.source"), t("report.source_value", { path: report.path, kind: formatValue(report.source_kind), format: formatValue(report.format) })],
    [t("report.records"), labels
      ? t("report.unpaired_value", { records: formatInteger(report.records_read), desirable: formatInteger(labels.desirable), undesirable: formatInteger(labels.undesirable) })
      : t("report.pairs_value", { records: formatInteger(report.records_read) })],
    [t("report.prompt_turns"), t("report.turns_value", {
      system: formatInteger(report.prompt_roles.system), user: formatInteger(report.prompt_roles.user), assistant: formatInteger(report.prompt_roles.assistant) })],
    [t("report.multi_turn"), formatInteger(report.multi_turn_records)],
  ];
  if ("samples" in report) {
    const limit = (value) => (value === null || value === undefined ? t("report.off") : formatValue(value));
    const part = ([name, count]) => `${SIDE_KEYS[name] ? t(SIDE_KEYS[name]) : name} ${formatInteger(count)}`;
    const lengths = report.length_percentiles || {};
    rows.push(
      [t("report.tokenizer"), t("report.preference_tokenizer_value", { tokenizer: formatValue(report.tokenizer), template: formatValue(report.template),
        max_length: formatValue(report.max_length), max_prompt_length: limit(report.max_prompt_length), max_completion_length: limit(report.max_completion_length) })],
      [t("report.truncated_prompts"), formatInteger(report.truncated_prompts)],
      [t("report.truncated_completions"), Object.entries(report.truncated_completions || {}).map(part).join(" · ")],
      [t("report.tokens"), Object.entries(report.tokens || {}).map(part).join(" · ")],
      [t("report.preference_lengths"), `p50 ${formatValue(lengths.p50)} · p90 ${formatValue(lengths.p90)} · p99 ${formatValue(lengths.p99)} · max ${formatValue(lengths.max)}`]);
  }
  return factList(rows);
}
