// What a finished job shows: an eval job's table (SFT metrics, or preference accuracies beside the starting point),
// an export's verification verdict, a merge's folder; anything else as its JSON.

import { el } from "./dom.js";
import { DASH, formatDecimal, formatValue, isNumber } from "./format.js";
import { t } from "./i18n.js";

const EVAL_ROWS = [
  ["eval.loss", ["loss"], 4], ["eval.perplexity", ["perplexity"], 2], ["eval.exact_match", ["exact_match"], 2],
  ["ROUGE-1", ["words", "rouge-1"], 2, "eval.words"], ["ROUGE-2", ["words", "rouge-2"], 2, "eval.words"],
  ["ROUGE-L", ["words", "rouge-l"], 2, "eval.words"], ["BLEU-4", ["words", "bleu-4"], 2, "eval.words"],
  ["ROUGE-1", ["chars", "rouge-1"], 2, "eval.chars"], ["ROUGE-2", ["chars", "rouge-2"], 2, "eval.chars"],
  ["ROUGE-L", ["chars", "rouge-l"], 2, "eval.chars"], ["BLEU-4", ["chars", "bleu-4"], 2, "eval.chars"],
];

const PREFERENCE_ROWS = [
  ["eval.preference_accuracy", "accuracy"], ["eval.margin", "margin"], ["eval.reward_chosen", "reward_chosen"],
  ["eval.reward_rejected", "reward_rejected"], ["eval.logprob_accuracy", "logprob_accuracy"],
  ["eval.label_accuracy", "label_accuracy"],
];

// `loraft eval` on preference records: the run and (with --base) its starting point, each by its own measure
function preferenceEvalTable(result) {
  const scores = result.preference;
  const columns = ["reference", "adapter"].filter((column) => scores[column]);
  const table = el("table", { class: "grid eval-table" },
    el("tr", {}, el("th", { i18n: "eval.metric" }), ...columns.map((column) => el("th", { i18n: column === "reference" ? "eval.reference" : "eval.adapter" }))),
    el("tr", {}, el("th", { i18n: "eval.measure" }), ...columns.map((column) => el("td", { text: formatValue(scores[column].measure) }))));
  for (const [label, key] of PREFERENCE_ROWS) {
    const values = columns.map((column) => scores[column][key]);
    if (values.every((value) => value === undefined || value === null)) continue;
    table.append(el("tr", {}, el("th", { i18n: label }), ...values.map((value) => el("td", { text: formatDecimal(value, 4) }))));
  }
  const about = t("eval.preference_about", { records: formatValue(result.records), data: formatValue(result.data),
                                              objective: formatValue(result.objective) });
  return el("div", {}, el("p", { class: "muted small", text: about }), table);
}

// what the run kept of its base on loraft's general prompts (loraft.retention), under either table
function retentionLine(result) {
  const kept = result.retention;
  if (!kept) return null;
  return el("p", { class: "retention", text: t("eval.retention", {
    prompts: formatValue(kept.prompts), checkable: formatValue(kept.checkable), base: formatDecimal(kept.base_accuracy, 2),
    run: formatDecimal(kept.accuracy, 2), kl: formatDecimal(kept.kl_per_token, 4) }) });
}

function evalTable(result) {
  const table = result.preference ? preferenceEvalTable(result) : result.records === undefined ? el("div") : taskEvalTable(result);
  const retention = retentionLine(result);
  if (retention) table.append(retention);
  return table;
}

function taskEvalTable(result) {
  const columns = ["base", "adapter"].filter((column) => result[column]);
  const table = el("table", { class: "grid eval-table" },
    el("tr", {}, el("th", { i18n: "eval.metric" }), ...columns.map((column) => el("th", { i18n: column === "base" ? "eval.base" : "eval.adapter" }))));
  for (const [label, path, digits, unit] of EVAL_ROWS) {
    const values = columns.map((column) => path.reduce((node, key) => (node && typeof node === "object" ? node[key] : undefined), result[column]));
    if (values.every((value) => value === undefined)) continue;
    const name = label.startsWith("eval.") ? t(label) : `${label} (${t(unit)})`;
    table.append(el("tr", {}, el("th", { text: name }), ...values.map((value) => el("td", { text: formatDecimal(value, digits) }))));
  }
  const about = t("eval.about", { records: formatValue(result.records), data: formatValue(result.data) });
  return el("div", {}, el("p", { class: "muted small", text: about }), table);
}

function exportVerdict(result) {
  const verify = result.verify;
  const files = result.files ? Object.entries(result.files).filter(([key]) => key !== "bytes").map(([, file]) => file).join(", ") : "";
  let verdict;
  if (!verify) verdict = el("p", { class: "verdict", i18n: "job.export_unverified" });
  else {
    const text = t(verify.passed ? "job.export_passed" : "job.export_failed", {
      diff: isNumber(verify.logprob_max_abs_diff) ? verify.logprob_max_abs_diff.toPrecision(3) : DASH,
      tolerance: formatValue(verify.tolerance),
      equal: formatValue(verify.tokenization && verify.tokenization.equal),
      strings: formatValue(verify.tokenization && verify.tokenization.strings),
    });
    verdict = el("p", { class: "verdict " + (verify.passed ? "good" : "bad"), text });
  }
  return el("div", {}, verdict, files ? el("p", { class: "muted small", text: t("job.files", { files }) }) : null);
}

export function jobResult(job) {
  const result = job.result;
  if (result === null || result === undefined) return null;
  if (job.kind === "eval" && typeof result === "object") return evalTable(result);
  if (job.kind === "export" && typeof result === "object") return exportVerdict(result);
  if (job.kind === "merge") {
    const path = typeof result === "string" ? result : result.out_dir || result.out || result.path || JSON.stringify(result);
    return el("p", { class: "verdict good", text: t("job.merged_to", { path }) });
  }
  return el("pre", { class: "log", text: JSON.stringify(result, null, 2) });
}
