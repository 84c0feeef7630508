// DOM helpers: elements by id, building elements, the error lines, and a poller that never overlaps itself.

import { t } from "./i18n.js";

export const $ = (id) => document.getElementById(id);
export const POLL_MS = 2000;

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "i18n") { node.dataset.i18n = value; node.textContent = t(value); }
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined && child !== false) node.append(child);
  return node;
}

export function showError(node, error) {
  node.textContent = error && error.message !== undefined ? error.message : String(error);
  node.hidden = false;
}

export function clearError(node) {
  node.textContent = "";
  node.hidden = true;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Run `task` now and again `ms` after each run ends (never two at once) until stop(). */
export function poller(task, ms) {
  let timer = null, stopped = false;
  async function tick() {
    if (stopped) return;
    try { await task(); } catch (error) { console.error(error); }
    if (!stopped) timer = setTimeout(tick, ms);
  }
  tick();
  return { stop() { stopped = true; clearTimeout(timer); } };
}
