"""The README's config reference is the schema itself, so docs cannot drift from the code."""

from pathlib import Path

from loraft.cli import main


def test_readme_config_reference_matches_the_schema(capsys):
    assert main(["config", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert table in readme, "README.md's config reference is stale: paste `loraft config --markdown` into it"


def test_ci_runs_the_readme_test_command():
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(line.strip() for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert test_command in ci
