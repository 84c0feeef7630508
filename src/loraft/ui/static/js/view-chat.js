// #/chat/NAME: the run's adapter (final or a checkpoint) and its base model side by side, each in a frame of the
// chat page the UI serves at /chat/NAME/; "Beside it" adds another finished run of the same base. The server keeps
// one copy of the base for all of them (loraft.ui.chat: one Engine, an adapter per run).

import { api, runPath } from "./api.js";
import { $, el, showError } from "./dom.js";
import { t } from "./i18n.js";

export function chatView() {
  let root, name, checkpoints = [], finished = false;

  function fillSelect() {
    const select = $("chat-checkpoint");
    const chosen = select.value;
    const options = [];
    if (finished || !checkpoints.length) options.push(el("option", { value: "", text: t("chat.final_adapter") }));
    for (const checkpoint of [...checkpoints].reverse()) {
      const step = checkpoint.replace(/^checkpoint-/, "");
      options.push(el("option", { value: checkpoint, text: t("chat.checkpoint_option", { step, name: checkpoint }) }));
    }
    select.replaceChildren(...options);
    if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
  }

  async function fillCompare() {
    const runs = await api("/api/runs");
    const mine = runs.find((run) => run.name === name);
    const same = runs.filter((run) => run.name !== name && run.status === "finished" && mine && run.base_model &&
                                      run.base_model === mine.base_model);
    const select = $("chat-compare");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "", text: t("chat.compare_none") }),
                           ...same.map((run) => el("option", { value: run.name, text: run.name })));
    if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
    $("chat-compare-box").hidden = !same.length;
  }

  function showCompare() {
    const other = $("chat-compare").value;
    $("chat-other-pane").hidden = !other;
    $("chat-other-title").textContent = other;
    const src = other ? "/chat/" + encodeURIComponent(other) + "/" : "about:blank";
    if ($("chat-other").getAttribute("src") !== src) $("chat-other").src = src;
  }

  function showAdapter() {
    const checkpoint = $("chat-checkpoint").value;
    const base = "/chat/" + encodeURIComponent(name) + "/";
    const src = checkpoint ? base + "?checkpoint=" + encodeURIComponent(checkpoint) : base;
    if ($("chat-adapter").getAttribute("src") !== src) $("chat-adapter").src = src;
  }

  return {
    async mount(viewRoot, runName) {
      root = viewRoot;
      name = runName;
      $("chat-title").textContent = name;
      $("chat-back").href = "#/run/" + encodeURIComponent(name);
      // the chat pages (same origin) send the UI's token from localStorage themselves (static/chat.html)
      $("chat-base").src = "/chat/" + encodeURIComponent(name) + "/?base=1";
      $("chat-checkpoint").addEventListener("change", showAdapter);
      $("chat-compare").addEventListener("change", showCompare);
      try {
        const detail = await api(runPath(name));
        checkpoints = detail.checkpoints || [];
        finished = (detail.state && detail.state.status) === "finished";
        fillSelect();
        showAdapter();
        await fillCompare();
      } catch (failure) {
        showError(root.querySelector(".error"), failure);
      }
    },
    unmount() {},
    relabel() {
      if (!name) return;
      fillSelect();
      fillCompare().catch(() => {});
    },
  };
}
