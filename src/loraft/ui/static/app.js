// loraft ui: the page over the REST API of docs/ui.md, and nothing else. Native ES modules, no framework, no build
// step: this entry module (index.html's one <script type="module">) routes, and js/ holds the rest:
//   shared   i18n.js (catalogs, t), dom.js (el, errors, poller), format.js (numbers, statuses), api.js (token),
//            reports.js (plan and data report)
//   views    view-runs.js, view-new.js (+ schema-form.js), run-view.js, view-data.js (+ data-samples.js),
//            view-chat.js
//   run view run-state.js (its one state object), run-chart.js, run-status.js, run-stream.js (SSE),
//            run-jobs.js (+ job-results.js), run-actions.js (stop, resume)
// Each hash route is a view {mount, unmount, relabel} cloned from a <template> of index.html; every visible string
// comes from the catalogs in i18n/ (static elements carry data-i18n*, dynamic text goes through t()).

import { TOKEN_STORAGE } from "./js/api.js";
import { $, clearError, showError } from "./js/dom.js";
import { applyI18n, catalogs, chooseLanguage, lang, loadCatalogs, t } from "./js/i18n.js";
import { runView, shownPoints } from "./js/run-view.js";
import { chatView } from "./js/view-chat.js";
import { dataView } from "./js/view-data.js";
import { newRunView } from "./js/view-new.js";
import { runsView } from "./js/view-runs.js";

// ============================================================ router

const ROUTES = { runs: runsView, new: newRunView, run: runView, data: dataView, chat: chatView };
let currentView = null;

function route() {
  if (currentView) currentView.unmount();
  currentView = null;
  clearError($("error"));
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const page = parts[0] || "runs";
  const param = decodeURIComponent(parts.slice(1).join("/"));
  const factory = ROUTES[page];
  const needsName = page === "run" || page === "chat";
  const template = factory && !(needsName && !param) ? "tpl-" + page : "tpl-not-found";
  const root = $("view");
  root.replaceChildren($(template).content.cloneNode(true));
  window.scrollTo(0, 0);
  applyI18n(root);
  document.querySelectorAll("header nav a").forEach((link) => {
    link.classList.toggle("active", link.dataset.nav === page);
  });
  if (template === "tpl-not-found") return;
  currentView = factory();
  currentView.mount(root, param);
}

/** Switch the language without a reload: static text through data-i18n*, the current view re-renders its own. */
function setLang(code) {
  if (!chooseLanguage(code)) return;
  document.documentElement.lang = code;
  $("lang").value = code;
  applyI18n(document);
  if (currentView) currentView.relabel();
}

// ============================================================ start

window.loraftUI = {
  get lang() { return lang; },
  t,
  catalogs,
  get points() { return shownPoints(); },
  setLang,
};

async function start() {
  const select = $("lang");
  select.value = lang;
  select.addEventListener("change", () => setLang(select.value));
  const token = $("token");
  token.value = localStorage.getItem(TOKEN_STORAGE) || "";
  token.addEventListener("change", () => {
    localStorage.setItem(TOKEN_STORAGE, token.value.trim());
    route(); // ask again with the token
  });
  try {
    await loadCatalogs();
  } catch (error) { // without catalogs there is nothing to translate with: say it plainly
    showError($("error"), "loraft ui: cannot load the language catalogs (" + error.message + ")");
    return;
  }
  document.documentElement.lang = lang;
  applyI18n(document);
  window.addEventListener("hashchange", route);
  route();
}

start();
