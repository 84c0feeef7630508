// The REST API of docs/ui.md: every call carries the token (X-Loraft-Token) kept in localStorage; a 401 opens the
// header's token box, any other answer closes it.

import { $ } from "./dom.js";
import { t } from "./i18n.js";

export const TOKEN_STORAGE = "loraft-ui-token";

export class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

export function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const token = localStorage.getItem(TOKEN_STORAGE);
  if (token) headers["X-Loraft-Token"] = token;
  return headers;
}

export async function errorSentence(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (error) { /* not JSON: say the HTTP status */ }
  return t("error.http", { status: response.status, text: response.statusText });
}

/** Call the REST API; answers the parsed JSON, or throws ApiError carrying the server's one sentence. */
export async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: authHeaders(), cache: "no-store" };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(t("error.unreachable"), 0);
  }
  if (response.status === 401) askForToken();
  else $("token-box").hidden = true; // the token (or none) is accepted
  if (!response.ok) throw new ApiError(await errorSentence(response), response.status);
  return response.status === 204 ? null : response.json();
}

export function askForToken() {
  const box = $("token-box");
  if (box.hidden) {
    box.hidden = false;
    $("token").focus();
  }
}

export const runPath = (name) => "/api/runs/" + encodeURIComponent(name);
