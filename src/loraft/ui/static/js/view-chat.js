// #/chat/NAME: the run's adapter (final or a checkpoint) and its base model side by side, each in a frame of the
// chat page the UI serves at /chat/NAME/.

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
      try {
        const detail = await api(runPath(name));
        checkpoints = detail.checkpoints || [];
        finished = (detail.state && detail.state.status) === "finished";
        fillSelect();
        showAdapter();
      } catch (failure) {
        showError(root.querySelector(".error"), failure);
      }
    },
    unmount() {},
    relabel() { if (name) fillSelect(); },
  };
}
