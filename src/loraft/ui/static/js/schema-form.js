// The new-run page's form of the config schema (GET /api/schema): one section per config part, one field per key,
// each typed from the schema; a filled field becomes a `key=value` override (overrideValue quotes what YAML would
// misread).

import { el } from "./dom.js";
import { t } from "./i18n.js";

const SECTION_KEYS = {
  run: "section.run", model: "section.model", data: "section.data", adapter: "section.adapter",
  train: "section.train", preference: "section.preference", generation: "section.generation",
};
const SECTION_ORDER = ["model", "data", "adapter", "train", "preference", "generation", "run"];
const SET_BY_THE_UI = ["output_dir"]; // the run's name decides output_dir (WORKSPACE/NAME)

/** A property that is a string or null (Optional[str]: a path, a name, a loss variant). */
function isOptionalString(property) {
  const types = (property.anyOf || []).map((option) => option.type).sort();
  return types.length === 2 && types[0] === "null" && types[1] === "string";
}

/** How a schema property is edited: enum/bool as a select, numbers as number inputs, the rest as YAML text. */
function widgetFor(property) {
  if (Array.isArray(property.enum)) return { kind: "choice", options: property.enum.map(String) };
  if (property.type === "boolean") return { kind: "choice", options: ["true", "false"] };
  if (property.type === "integer") return { kind: "number", step: "1" };
  if (property.type === "number") return { kind: "number", step: "any" };
  if (property.type === "string") return { kind: "string" };
  if (isOptionalString(property)) return { kind: "optional_string" }; // text, or null to unset it
  return { kind: "yaml" }; // unions (str or list, int or "auto", optional values) and lists are typed as YAML
}

function typeName(property) {
  if (Array.isArray(property.enum)) return property.enum.join(" | ");
  if (property.const !== undefined) return JSON.stringify(property.const);
  if (property.anyOf) return property.anyOf.map(typeName).join(" | ");
  if (property.type === "array") return `list[${property.items ? typeName(property.items) : "any"}]`;
  return { integer: "int", number: "float", string: "str", boolean: "bool", null: "null" }[property.type] || "any";
}

function defaultText(value) {
  if (value === undefined) return "";
  if (value === null) return "null";
  return typeof value === "string" ? value : JSON.stringify(value);
}

// A value the server parses as YAML; a plain string that YAML would read as something else is quoted.
const YAML_AMBIGUOUS = /^(?:true|false|yes|no|on|off|y|n|null|~)$|^[-+.]?\d|^[\s[\]{}&*!|>'"%@`#,?:-]|:\s|\s#|\s$/i;

export function overrideValue(raw, kind) {
  if (kind === "optional_string" && /^(?:null|~)$/i.test(raw)) return raw; // unset it
  return (kind === "string" || kind === "optional_string") && YAML_AMBIGUOUS.test(raw) ? JSON.stringify(raw) : raw;
}

export function buildSchemaForm(container, schema) {
  const defs = schema.$defs || {};
  const resolve = (property) => (property.$ref ? defs[property.$ref.split("/").pop()] || {} : property);
  const sections = {};
  for (const [name, property] of Object.entries(schema.properties || {})) {
    const resolved = resolve(property);
    if (resolved.type === "object" && resolved.properties) sections[name] = { fields: resolved.properties, prefix: name + "." };
    else if (!SET_BY_THE_UI.includes(name)) (sections.run = sections.run || { fields: {}, prefix: "" }).fields[name] = property;
  }
  const names = Object.keys(sections).sort((a, b) => {
    const rank = (name) => (SECTION_ORDER.includes(name) ? SECTION_ORDER.indexOf(name) : SECTION_ORDER.length);
    return rank(a) - rank(b);
  });
  container.replaceChildren(...names.map((section) => {
    const { fields, prefix } = sections[section];
    const heading = el("summary", {},
      SECTION_KEYS[section] ? el("span", { i18n: SECTION_KEYS[section] }) : el("span", { text: section }),
      section === "run" ? null : el("code", { class: "muted", text: section }));
    const grid = el("div", { class: "field-grid" });
    for (const [field, raw] of Object.entries(fields)) {
      const property = resolve(raw);
      const key = prefix + field;
      const widget = widgetFor(property);
      const description = property.description || raw.description || "";
      const id = "field-" + key.replace(/\W/g, "-");
      let input;
      if (widget.kind === "choice") {
        input = el("select", { id, dataset: { key, kind: widget.kind } },
          el("option", { value: "", i18n: "new.unchanged" }),
          ...widget.options.map((option) => el("option", { value: option, text: option })));
      } else {
        input = el("input", {
          id, type: widget.kind === "number" ? "number" : "text", step: widget.step, spellcheck: "false",
          dataset: { key, kind: widget.kind },
        });
      }
      input.title = description;
      grid.append(el("div", { class: "field", dataset: { field: key } },
        el("label", { for: id }, el("code", { text: field }), " ", el("span", { class: "type", text: typeName(property) })),
        input,
        el("p", { class: "help" }, description, " ",
          el("span", { class: "default", dataset: { value: defaultText(property.default) },
                       text: t("new.default_value", { value: defaultText(property.default) }) }))));
    }
    return el("details", { class: "section panel", open: true, dataset: { section } }, heading, grid);
  }));
}
