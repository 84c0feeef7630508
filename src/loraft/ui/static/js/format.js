// Formatting in the reader's language (numbers, durations, times, commands) and run/job statuses.

import { lang, t } from "./i18n.js";

export const DASH = "–";
export const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
export const formatInteger = (value) => (isNumber(value) ? new Intl.NumberFormat(lang).format(value) : DASH);
export const formatLoss = (value) => (isNumber(value) ? value.toFixed(4) : DASH);
export const formatDecimal = (value, digits) => (isNumber(value) ? value.toFixed(digits) : DASH);
export const formatRate = (value) => (isNumber(value) ? value.toExponential(2) : DASH);

export function formatDuration(seconds) {
  if (!isNumber(seconds) || seconds < 0) return DASH;
  const total = Math.round(seconds);
  const hours = Math.floor(total / 3600), minutes = Math.floor((total % 3600) / 60), rest = total % 60;
  if (hours) return t("time.hours_minutes", { hours, minutes });
  if (minutes) return t("time.minutes_seconds", { minutes, seconds: rest });
  return t("time.seconds", { seconds: rest });
}

/** A recorded time (ISO 8601, as loraft records it) in the reader's language; the raw text when unparsable. */
export function formatTime(text) {
  if (!text) return DASH;
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return String(text);
  return new Intl.DateTimeFormat(lang, { dateStyle: "medium", timeStyle: "medium" }).format(date);
}

export function formatValue(value) {
  if (value === null || value === undefined) return DASH;
  if (value === true) return t("common.yes");
  if (value === false) return t("common.no");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** An argv as one shell line (what a user can paste), quoting only what needs it. */
export function shellLine(argv) {
  if (!Array.isArray(argv)) return argv ? String(argv) : "";
  return argv.map((arg) => (/^[\w@%+=:,./-]+$/.test(arg) ? arg : "'" + String(arg).replace(/'/g, "'\\''") + "'")).join(" ");
}

// ---------- statuses (runs and jobs)

export const STATUS_KEYS = {
  starting: "status.starting", running: "status.running", "running?": "status.running_elsewhere",
  interrupted: "status.interrupted", stopped: "status.stopped", failed: "status.failed",
  finished: "status.finished", unreadable: "status.unreadable",
};
export const ACTIVE_STATUSES = ["starting", "running"];

export function statusText(status) {
  return STATUS_KEYS[status] ? t(STATUS_KEYS[status]) : (status || t("status.unknown"));
}

export function setStatus(node, status) {
  node.dataset.status = status || "";
  node.textContent = status ? statusText(status) : "";
}
