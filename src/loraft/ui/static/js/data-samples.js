// The data page's samples, token by token: supervised tokens highlighted, special ones marked, cuts shown; an SFT
// sample (renderSample) or a preference record (renderPreference); and the preference length fields of its form.

import { el } from "./dom.js";
import { formatInteger, isNumber } from "./format.js";
import { t } from "./i18n.js";
import { SIDE_KEYS } from "./reports.js";

const VISIBLE_WHITESPACE = { " ": "·", "\n": "↵", "\t": "⇥", "\r": "␍" };

function visibleToken(text) {
  if (text === "") return "∅";
  return String(text).replace(/[ \n\t\r]/g, (char) => VISIBLE_WHITESPACE[char]);
}

/** Token spans of ids[from..to) (tokens as `tokens` pieces): supervised ones (a label that is not -100)
 * highlighted, special ones marked, each with its index in the whole sequence. */
function tokenSpans(tokens, ids, labels, from = 0, to = ids.length) {
  const body = el("div", { class: "tokens" });
  for (let i = from; i < to; i++) {
    const token = tokens[i] || { text: String(ids[i]), special: false };
    const classes = ["token"];
    if (labels[i] !== undefined && labels[i] !== -100) classes.push("supervised");
    if (token.special) classes.push("special");
    body.append(el("span", { class: classes.join(" "), dataset: { index: String(i) }, title: `#${i} · id ${ids[i]}`, text: visibleToken(token.text) }));
    if (String(token.text).includes("\n")) body.append(el("br")); // keep the sample's own line breaks
  }
  return body;
}

/** The mark of `count` tokens cut (at the end; from the start: `where` "start"). */
function cutMark(count, where) {
  const key = where === "start" ? (count === 1 ? "data.cut_start_one" : "data.cut_start") : (count === 1 ? "data.cut_one" : "data.cut");
  return el("span", { class: "cut", dataset: { cut: String(count), where: where || "end" }, text: t(key, { count: formatInteger(count) }) });
}

const sampleTokens = (sample) => sample.tokens || (sample.input_ids || []).map((id) => ({ text: String(id), special: false }));

export function renderSample(sample, index) {
  const ids = sample.input_ids || [];
  const labels = sample.labels || [];
  const supervised = labels.filter((label) => label !== -100).length;
  const head = el("div", { class: "sample-head" },
    el("strong", { text: t("data.sample_title", { number: index + 1 }) }), " ",
    el("span", { class: "muted", text: sample.source || "" }), " ",
    el("span", { class: "small", text: t("data.sample_counts", { tokens: formatInteger(ids.length), supervised: formatInteger(supervised) }) }));
  const body = tokenSpans(sampleTokens(sample), ids, labels);
  if (sample.truncated) body.append(cutMark((isNumber(sample.full_length) ? sample.full_length : ids.length) - ids.length));
  return el("div", { class: "sample", dataset: { index: String(index) } }, head, body);
}

const PREFERENCE_SIDES = ["chosen", "rejected", "completion"];

/** A preference record (preview_preferences' sample): the prompt once, then each completion (chosen and rejected,
 * or the one KTO completion with its label), token by token as renderSample draws an SFT sample. Each side holds
 * the prompt's tokens too (labelled -100): they are drawn once, from the first side. */
export function renderPreference(sample, index) {
  const names = PREFERENCE_SIDES.filter((name) => sample[name] && typeof sample[name] === "object");
  const first = sample[names[0]] || {};
  const promptTokens = (first.labels || []).filter((label) => label === -100).length;
  const head = el("div", { class: "sample-head" },
    el("strong", { text: t("data.sample_title", { number: index + 1 }) }), " ",
    el("span", { class: "muted", text: sample.source || "" }), " ",
    el("span", { class: "small", text: t("data.prompt_tokens", { tokens: formatInteger(promptTokens) }) }));
  const prompt = tokenSpans(sampleTokens(first), first.input_ids || [], first.labels || [], 0, promptTokens);
  if (sample.prompt_truncated) prompt.prepend(cutMark(sample.prompt_length - promptTokens, "start"));
  const parts = [el("div", { class: "side", dataset: { side: "prompt" } }, el("div", { class: "side-label", i18n: SIDE_KEYS.prompt }), prompt)];
  for (const name of names) {
    const side = sample[name];
    const ids = side.input_ids || [];
    const labels = side.labels || [];
    const body = tokenSpans(sampleTokens(side), ids, labels, promptTokens, ids.length);
    // what the cut took from this completion: its own length before the cut less what is left of it
    const fullCompletion = (isNumber(side.full_length) ? side.full_length : ids.length) - (isNumber(sample.prompt_length) ? sample.prompt_length : promptTokens);
    const cut = fullCompletion - (ids.length - promptTokens);
    if (cut > 0) body.append(cutMark(cut));
    const label = name === "completion" && typeof sample.label === "boolean"
      ? el("span", { class: "label-badge " + (sample.label ? "good" : "bad"), i18n: sample.label ? "data.desirable" : "data.undesirable" }) : null;
    parts.push(el("div", { class: "side", dataset: { side: name } },
      el("div", { class: "side-label" }, el("span", { i18n: SIDE_KEYS[name] }), " ", label,
        el("span", { class: "muted small", text: " " + t("data.side_tokens", { tokens: formatInteger(ids.length - promptTokens) }) })),
      body));
  }
  return el("div", { class: "sample preference", dataset: { index: String(index) } }, head, ...parts);
}

/** The preference length limits on the data form: made here, next to max_length (index.html has the rest). */
export function preferenceLimitFields() {
  const fields = [["data-max-prompt-length", "data.max_prompt_length"], ["data-max-completion-length", "data.max_completion_length"]];
  return fields.map(([id, label]) => el("div", { class: "field" },
    el("label", { for: id, i18n: label }),
    el("input", { id, type: "number", min: "1", step: "1", placeholder: t("data.no_limit"), title: t("data.preference_limit_help"),
                  dataset: { i18nPlaceholder: "data.no_limit", i18nTitle: "data.preference_limit_help" } })));
}
