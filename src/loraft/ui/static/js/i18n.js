// i18n: the catalogs of i18n/, the current language and t(). Static elements carry data-i18n*, dynamic text goes
// through t(); the page's setLang (app.js) switches the language and asks the current view to relabel itself.

export const LANGUAGES = ["en", "zh-CN"];
const LANG_STORAGE = "loraft-ui-lang";

export const catalogs = {};
export let lang = initialLanguage();

function initialLanguage() {
  const saved = localStorage.getItem(LANG_STORAGE);
  if (LANGUAGES.includes(saved)) return saved;
  const browser = (navigator.languages && navigator.languages[0]) || navigator.language || "";
  return browser.toLowerCase().startsWith("zh") ? "zh-CN" : "en";
}

/** The catalog text for `key` in the current language, with `{name}` placeholders filled from `params`. */
export function t(key, params) {
  const own = catalogs[lang] && catalogs[lang][key];
  const text = own !== undefined ? own : (catalogs.en && catalogs.en[key]) || key;
  if (!params) return text;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in params ? String(params[name]) : whole));
}

export function applyI18n(root) {
  root.querySelectorAll("[data-i18n]").forEach((node) => { node.textContent = t(node.dataset.i18n); });
  root.querySelectorAll("[data-i18n-placeholder]").forEach((node) => { node.placeholder = t(node.dataset.i18nPlaceholder); });
  root.querySelectorAll("[data-i18n-title]").forEach((node) => { node.title = t(node.dataset.i18nTitle); });
}

export async function loadCatalogs() {
  await Promise.all(LANGUAGES.map(async (code) => {
    const response = await fetch(`/static/i18n/${code}.json`);
    if (!response.ok) throw new Error(`/static/i18n/${code}.json: ${response.status} ${response.statusText}`);
    catalogs[code] = await response.json();
  }));
}

/** Make `code` the language t() answers in, kept for the next visit; false (nothing changed) for an unknown code. */
export function chooseLanguage(code) {
  if (!LANGUAGES.includes(code)) return false;
  lang = code;
  localStorage.setItem(LANG_STORAGE, code);
  return true;
}
