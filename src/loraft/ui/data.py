"""The data stage from the UI: `loraft data check` and `loraft data preview` on workspace files, with the tokenizer
of a run, a folder in the workspace, or a hub model where the UI allows hubs. Preference records (DPO pairs, KTO
unpaired completions) go to loraft.preference, as the CLI sends them. The app runs these in a worker process
(loraft.ui.work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from loraft.config import RunConfig
from loraft.rundir import RUN_FILE, RunDir, read_record
from loraft.ui.workspace import RequestError, Workspace, complete_checkpoints

DATA_FIELDS = {"path": (str, True), "model": (str, False), "template": (str, False), "format": (str, False),
               "max_length": (int, False), "max_prompt_length": (int, False), "max_completion_length": (int, False)}


def data_settings(workspace: Workspace, values: dict, limit: Optional[int] = None) -> RunConfig:
    """The `data` and `preference` sections `loraft data check/preview` build from the same options
    (loraft.cli.data._data_settings), validated by the one RunConfig schema; a bad value is a 400 naming the request's key."""
    fields = {"path": str(workspace.resolve(values["path"], field="path")), "template": values["template"] or "auto",
              "max_length": 256 if values["max_length"] is None else values["max_length"],
              "format": values["format"] or "auto"}
    if limit:
        fields["limit"] = limit
    limits = {key: values.get(key) for key in ("max_prompt_length", "max_completion_length")}
    try:
        return RunConfig.model_validate({"data": fields, "preference": limits})
    except ValidationError as exc:
        # not config_from_sections: its sentence names the config key (data.format); the request's key is `format`
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        key = ".".join(str(part) for part in first["loc"][1:])
        raise RequestError(400, f"{key}: {message}" if key else message) from None


def tokenizer_of(workspace: Workspace, model: str):
    """The tokenizer of `model`, placed by Workspace.place: a run in the workspace (its saved tokenizer, else its
    newest checkpoint's, else its base model's), a folder in the workspace, or a hub id where the UI allows hubs."""
    from loraft.model import load_tokenizer

    placed = workspace.place(model, field="model", local_only=False)
    run_dir = Path(placed)
    if run_dir.is_absolute() and (run_dir / RUN_FILE).is_file():
        workspace.check_tree(run_dir, f"run {model!r}")  # its tokenizer files are read by name
        checkpoints = RunDir(run_dir).checkpoints
        folders = [run_dir, *reversed([checkpoints / name for name in complete_checkpoints(run_dir)])]
        source = next((str(folder) for folder in folders if (folder / "tokenizer_config.json").is_file()), None)
        base = read_record(run_dir).get("base_model")
        if source is None and base:  # the run's base model, wherever the run was trained: checked like any other
            source = workspace.place(base, field=f"run {model!r}'s base model", local_only=False)
        if source:
            return load_tokenizer(source)
    return load_tokenizer(placed)


def data_check(workspace: Workspace, values: dict) -> dict:
    """POST /api/data/check: `loraft data check --json`'s report (token lengths when a model is given), of the
    record kind loraft.objectives.record_kind decides."""
    from loraft.objectives.kinds import record_kind

    settings = data_settings(workspace, values)
    tokenizer = tokenizer_of(workspace, values["model"]) if values["model"] else None
    return record_kind(settings).check(settings.data.path, settings, tokenizer)


MAX_PREVIEW = 200


def data_preview(workspace: Workspace, values: dict) -> dict:
    """POST /api/data/preview: the samples `loraft data preview --json` prints for the same options, and whether
    they are preference records."""
    from loraft.objectives.kinds import record_kind

    limit = 5 if values["limit"] is None else values["limit"]
    if limit > MAX_PREVIEW:  # each sample is drawn token by token in the page
        raise RequestError(400, f"limit must be at most {MAX_PREVIEW} (got {limit})")
    settings = data_settings(workspace, values, limit)
    tokenizer = tokenizer_of(workspace, values["model"])
    kind = record_kind(settings)
    return {"preference": kind.KIND == "preferences",
            "samples": kind.preview(settings.data.path, settings, tokenizer, limit)}
