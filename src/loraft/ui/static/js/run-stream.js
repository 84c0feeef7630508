// The run view's live curve: GET /api/runs/NAME/events, server-sent events read with fetch (EventSource cannot send
// the token header), reconnecting with Last-Event-ID until the run has ended.

import { askForToken, authHeaders, errorSentence, runPath } from "./api.js";
import { $, showError, sleep } from "./dom.js";
import { ACTIVE_STATUSES } from "./format.js";
import { addMetric, clearPoints, parseMetricJson } from "./run-state.js";

const RECONNECT_MS = 1500;

/** The stream of `run` (its lastEventId, streaming and controller fields): metric events become points (then
 * `scheduleChart`), state events go to `applyState`. */
export function runStream(run, { applyState, scheduleChart }) {
  function handleEvent(block) {
    let event = "message", id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // a comment: the keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (event === "reset") {
      clearPoints(run);
      run.lastEventId = null;
      scheduleChart();
    }
    if (id !== null && id !== "") run.lastEventId = id;
    if (!data.length) return;
    const text = data.join("\n");
    if (event === "metric") {
      addMetric(run, parseMetricJson(text));
      scheduleChart();
    } else if (event === "state") {
      applyState(parseMetricJson(text));
    }
  }

  /** One connection; true when the server ended it after a final state (no reconnect needed). */
  async function readStream() {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (run.lastEventId !== null) headers["Last-Event-ID"] = String(run.lastEventId);
    let response;
    try {
      response = await fetch(runPath(run.name) + "/events", { headers, signal: run.controller.signal, cache: "no-store" });
    } catch (error) {
      return false;
    }
    if (!response.ok) {
      if (response.status === 401) askForToken();
      showError($("run-api-error"), new Error(await errorSentence(response)));
      return response.status === 404;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // normalise line ends, keeping a trailing \r back in case its \n is in the next chunk
        const held = buffer.endsWith("\r") ? "\r" : "";
        buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
        buffer += held;
      }
    } catch (error) {
      return false; // dropped (the UI restarted): reconnect with Last-Event-ID
    }
    return Boolean(run.state) && !ACTIVE_STATUSES.includes(run.state.status);
  }

  async function startStream() {
    if (run.streaming || run.closed) return;
    run.streaming = true;
    try {
      while (!run.closed) {
        if (await readStream()) break;
        if (!run.closed) await sleep(RECONNECT_MS);
      }
    } finally {
      run.streaming = false;
    }
  }

  /** Drop the connection (the loop reconnects: a resumed run trims metrics.jsonl, the server answers with a reset). */
  function reconnect() {
    run.controller.abort();
    run.controller = new AbortController();
  }

  /** Drop the connection for good (the view is gone). */
  function close() {
    run.controller.abort();
  }

  return { start: startStream, reconnect, close };
}
