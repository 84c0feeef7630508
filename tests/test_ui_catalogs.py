"""The UI page's translation catalogs and vendored files: pure file checks, no browser.

Every visible string of the page comes from i18n/en.json and i18n/zh-CN.json: static elements name their key in
data-i18n / data-i18n-placeholder / data-i18n-title (index.html), dynamic text is t("key") or an element built with
i18n: "key" (the page's scripts: app.js and its ES modules under js/), and a few keys are picked from maps of literal
keys (statuses, plan rows, chart series).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[1] / "src" / "loraft" / "ui" / "static"
LANGUAGES = ("en", "zh-CN")
# values that are the same in both languages: the name, and the languages' own names in the language picker
SAME_IN_BOTH = {"loraft", "English", "中文"}


def catalog(language: str) -> dict:
    return json.loads((STATIC / "i18n" / f"{language}.json").read_text(encoding="utf-8"))


def html_keys() -> set[str]:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return set(re.findall(r'data-i18n(?:-placeholder|-title)?="([^"]+)"', html))


def scripts() -> list[Path]:
    """The page's own scripts: the entry module app.js and every module under it (js/...), not the vendored ones."""
    found = sorted(path for path in STATIC.rglob("*.js") if "vendor" not in path.relative_to(STATIC).parts)
    assert STATIC / "app.js" in found and len(found) > 1, found  # the entry module and the modules it imports
    return found


def script() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in scripts())


def script_keys() -> set[str]:
    """Keys the scripts ask for by name: t("key", ...) and el(..., { i18n: "key" })."""
    return set(re.findall(r'\bt\(\s*"([^"]+)"', script())) | set(re.findall(r'\bi18n:\s*"([^"]+)"', script()))


def quoted_keys() -> set[str]:
    """Every "ns.name" literal of the scripts whose namespace is a catalog's (STATUS_KEYS, PLAN_ROWS...)."""
    namespaces = "|".join(sorted({key.split(".")[0] for key in catalog("en")}))
    return set(re.findall(rf'"((?:{namespaces})(?:\.[a-z0-9_]+)+)"', script()))


@pytest.mark.parametrize("language", LANGUAGES)
def test_catalog_is_a_flat_map_of_non_empty_strings(language):
    entries = catalog(language)
    assert entries, language
    for key, value in entries.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+", key), f"{language}: odd key {key!r}"
        assert isinstance(value, str) and value.strip(), f"{language}: {key} is empty or not a string"


def test_catalogs_have_the_same_keys_and_placeholders():
    english, chinese = catalog("en"), catalog("zh-CN")
    assert sorted(english) == sorted(chinese), set(english) ^ set(chinese)
    for key in english:
        names = lambda text: sorted(re.findall(r"\{(\w+)\}", text))  # noqa: E731
        assert names(english[key]) == names(chinese[key]), f"{key}: placeholders differ"


def test_every_key_the_page_uses_exists_in_both_catalogs():
    used = html_keys() | script_keys()
    assert len(used) > 100  # the regexes above still find the page's keys
    for language in LANGUAGES:
        missing = sorted(used - set(catalog(language)))
        assert not missing, f"{language}.json lacks {missing}"


def test_every_literal_that_looks_like_a_key_exists():
    """Keys named in maps (STATUS_KEYS, PLAN_ROWS, SERIES_KEYS, ...) are string literals of a catalog namespace."""
    named = quoted_keys()
    assert named >= {"status.running", "status.interrupted", "series.loss", "plan.precision"}
    for language in LANGUAGES:
        missing = sorted(named - set(catalog(language)))
        assert not missing, f"{language}.json lacks {missing}"


def test_no_dead_keys():
    used = html_keys() | script_keys() | quoted_keys()
    dead = sorted(set(catalog("en")) - used)
    assert not dead, f"catalog keys nothing uses: {dead}"


def test_chinese_is_translated():
    english, chinese = catalog("en"), catalog("zh-CN")
    copied = sorted(key for key in english if chinese[key] == english[key] and english[key] not in SAME_IN_BOTH)
    assert not copied, f"zh-CN.json repeats the English text of {copied}"
    # a translation has Chinese in it (not, say, the English reworded)
    untranslated = sorted(key for key in chinese if english[key] not in SAME_IN_BOTH
                          and not re.search(r"[\u4e00-\u9fff]", chinese[key]))
    assert not untranslated, f"zh-CN.json has no Chinese in {untranslated}"


def test_every_status_the_api_names_has_a_translation():
    # docs/ui.md: the runs list's statuses and the jobs' statuses
    statuses = re.search(r"const STATUS_KEYS = \{(.*?)\};", script(), re.S).group(1)
    mapped = dict(re.findall(r'"?([a-z?]+)"?:\s*"(status\.[a-z_]+)"', statuses))
    for status in ("starting", "running", "running?", "interrupted", "stopped", "failed", "finished", "unreadable"):
        assert mapped.get(status) in catalog("en"), status


def test_the_page_loads_only_its_own_files():
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert sources and all(source.startswith("/static/") or source.startswith("data:") for source in sources), sources
    for source in sources:
        if source.startswith("/static/"):
            assert (STATIC / source[len("/static/"):]).is_file(), source
    assert not re.search(r"https?://", script())


def test_the_scripts_are_modules_that_import_only_the_pages_own_files():
    """index.html loads app.js as an ES module (no build step); every import of every module is a relative path to a
    module of the page, and every module is imported by some other (nothing shipped that the page never runs)."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<script\b[^>]*\bsrc=\"/static/app\.js\"[^>]*>", html) == [
        '<script type="module" src="/static/app.js">']
    imported = set()
    for path in scripts():
        text = path.read_text(encoding="utf-8")
        specifiers = re.findall(r'^import\s[^;]*?\bfrom\s+"([^"]+)";', text, re.M)
        assert len(specifiers) == len(re.findall(r"^import\s", text, re.M)), path  # each import is one we can read
        for specifier in specifiers:
            assert specifier.startswith("./") and specifier.endswith(".js"), (path, specifier)
            target = (path.parent / specifier).resolve()
            assert target.is_file() and STATIC in target.parents, (path, specifier)
            imported.add(target)
    assert imported == {path.resolve() for path in scripts()} - {(STATIC / "app.js").resolve()}


def test_uplot_is_vendored_with_its_license():
    vendor = STATIC / "vendor"
    script_text = (vendor / "uPlot.iife.min.js").read_text(encoding="utf-8")
    assert script_text.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    assert ".u-legend" in (vendor / "uPlot.min.css").read_text(encoding="utf-8")
    license_text = (vendor / "uPlot.LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("The MIT License (MIT)") and "Leon Sorokin" in license_text
    assert "uPlot v1.6.32" in (STATIC / "index.html").read_text(encoding="utf-8")
