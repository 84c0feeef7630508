"""The UI's workspace: the one folder every request's paths are confined to, its runs, and the UI's own files.

Every path or model name the UI accepts or launches with goes through `Workspace.place`: a request's file, a config's
model, data, eval data, cache, adapter source and output directory (after every override), a run's base model when
it is chatted with, evaluated or resumed. It expands `~` and environment variables, resolves the result against the
workspace (never the UI's working directory) with symbolic links followed, and refuses what lands outside, naming the
key; a name that is no file in the workspace is a hub id only where the UI was started with hubs allowed.
`Workspace.confine_config` applies it to a whole config and refuses model code (`trust_remote_code`).
Runs are the run directories `loraft runs WORKSPACE` lists (loraft.liveness), plus runs the UI has launched whose
trainer has not written its record yet. A run's console output is the run directory's `console.log`
(rundir.CONSOLE_FILE, the one file `loraft train` accepts in a directory it has not prepared yet); what the UI itself
keeps (launch records, submitted YAML, jobs) lives in `WORKSPACE/.loraft-ui/`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

from loraft.config import RunConfig
from loraft.errors import LoraftError
from loraft.files import cache_home
from loraft.liveness import find_runs, run_state
from loraft.rewards import SHIPPED_FUNCTIONS
from loraft.rundir import CHECKPOINTS, CONSOLE_FILE, RUN_FILE, read_record
from loraft.rundir import complete_checkpoints as complete_checkpoint_dirs
from loraft.ui.console import last_error_line, process_alive

UI_DIR = ".loraft-ui"
# a hub id as transformers and datasets take it: `name` or `owner/name`
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# the config keys that name files or folders on this machine (the rest are numbers, names and choices)
PATH_KEYS = ("model.name_or_path", "model.adapter_from", "data.path", "data.eval_path", "data.cache_dir", "output_dir")
LOCAL_ONLY = ("model.adapter_from", "data.cache_dir", "output_dir")  # always a path here, never a hub id
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# the fields of a run in GET /api/runs (run_state's, without its absolute run_dir)
LIST_FIELDS = ("name", "status", "step", "total_steps", "loss", "started_at", "checkpoint", "base_model")
LIVE_STATUSES = ("starting", "running")
# folders never searched for YAML configs: a run's checkpoints, caches, virtual environments
SKIPPED_FOLDERS = {CHECKPOINTS, "__pycache__", "node_modules", "site-packages"}


def caches() -> list[Path]:
    """The folders outside the workspace that the UI and what it launches may read and write: loraft's cache root
    (tokenized data, the precision probe, speed measurements, the llama.cpp converter) and Hugging Face's (hub
    downloads, datasets' cache), as this process's environment places them."""
    hf_home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                   / "huggingface")
    found = [cache_home(), hf_home]
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
        if os.environ.get(variable):
            found.append(Path(os.environ[variable]))
    unique: list[Path] = []
    for path in (Path(os.path.expanduser(str(path))).absolute() for path in found):
        if path not in unique:
            unique.append(path)
    return unique


class RequestError(Exception):
    """A request the UI refuses: an HTTP status (4xx) and one sentence, answered as {"error": sentence}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def refused(message: str) -> RequestError:
    """A path or name in a request that the workspace refuses (400)."""
    return RequestError(400, message)


def complete_checkpoints(run_dir: Path) -> list[str]:
    """The names of the run's complete checkpoints, by step."""
    return [path.name for path in complete_checkpoint_dirs(run_dir / CHECKPOINTS)]


class Workspace:
    """The folder the UI serves: request paths resolved inside it, its runs, the UI's own files."""

    def __init__(self, root: Union[str, Path], allow_hub: bool = False):
        self.root = Path(root).resolve()
        self.ui_dir = self.root / UI_DIR
        self.allow_hub = allow_hub  # names that are no file here may be hub ids (`loraft ui --allow-hub`)

    # ---------------------------------------------------------------------------------------------- paths
    def place(self, value: object, field: str = "path", must_exist: bool = True, local_only: bool = True) -> str:
        """Where `value` leads, as the UI will use it: an absolute path inside the workspace, or (not local_only,
        the UI started with --allow-hub, `value` shaped like one and naming nothing here) a hub id, unchanged.

        `~` and `$VARIABLES` are expanded first, then a relative path is taken from the workspace root, and symbolic
        links are followed: what the path reaches is what is checked.

        Raises:
            RequestError (400), naming `field`: not a string, empty, NUL, a `..` component, leading outside the
                workspace (directly or through a symbolic link), a hub id where none may be used, or (must_exist,
                and no hub id) missing.
        """
        if not isinstance(value, str):
            raise refused(f"{field} must be a string (a path relative to the workspace)")
        if not value.strip():
            raise refused(f"{field} is empty; give a path relative to the workspace")
        if "\0" in value:
            raise refused(f"{field} holds a NUL character")
        expanded = Path(os.path.expandvars(os.path.expanduser(value)))
        if ".." in expanded.parts:
            raise refused(f"{field} {value!r} climbs out with '..'; give a path inside the workspace")
        try:
            real = (self.root / expanded).resolve()  # an absolute `expanded` replaces the root
        except (OSError, RuntimeError):  # a symlink loop
            raise refused(f"{field} {value!r} cannot be resolved (a symbolic link loop?)") from None
        if real != self.root and self.root not in real.parents:
            if expanded.is_absolute():
                shown = f"{value!r}" + (f" ({expanded})" if str(expanded) != value else "")
                raise refused(f"{field} {shown} is outside the workspace {self.root}; give a path inside it")
            raise refused(f"{field} {value!r} leads outside the workspace through a symbolic link")
        try:
            exists = real.exists()
        except OSError as exc:  # a name too long for the file system, a folder that cannot be read
            raise refused(f"{field} {value!r} cannot be read ({exc.strerror})") from None
        if exists and not (real.is_file() or real.is_dir()):  # opening a named pipe waits for a writer for ever
            raise refused(f"{field} {value!r} is not a regular file or folder (a named pipe or a device?)")
        if exists and real.is_dir() and real != self.root:  # a model or dataset folder is read file by file
            self.check_tree(real, f"{field} {value!r}")
        if exists or (local_only and not must_exist):
            return str(real)
        if local_only or not HUB_ID.fullmatch(value):
            raise refused(f"{field} {value!r} does not exist in the workspace {self.root}")
        if not self.allow_hub:
            raise refused(f"{field} {value!r} is not in the workspace {self.root}, and this UI does not download "
                          "from a hub; put the files in the workspace, or start loraft ui with --allow-hub")
        return value

    def inside(self, path: Union[str, Path]) -> bool:
        """Whether `path`, symbolic links followed, lies in the workspace."""
        try:
            real = Path(path).resolve()
        except (OSError, RuntimeError):
            return False
        return real == self.root or self.root in real.parents

    def check_tree(self, folder: Path, what: str, depth: int = 3) -> None:
        """Refuse (400) a folder of the workspace (a run, a job) holding a symbolic link that leads outside it, or
        anything but files and folders (a named pipe), at most `depth` levels down: the UI reads such a folder's files
        by their names (the record, metrics.jsonl, the logs, the checkpoints, a run's tokenizer), so a planted link
        would hand it a file from outside, and a pipe would hold the request for ever."""
        level = [Path(folder)]
        for _ in range(depth):
            below = []
            for directory in level:
                try:
                    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)  # the same sentence each time
                except OSError:
                    continue
                for entry in entries:
                    relative = Path(entry.path).relative_to(folder).as_posix()
                    if entry.is_symlink() and not self.inside(entry.path):
                        raise refused(f"{what}: {relative} leads outside the workspace through a symbolic link")
                    if entry.is_dir():  # a link to a folder inside is searched too (the depth ends a loop)
                        below.append(Path(entry.path))
                    elif not entry.is_file():  # a named pipe would hold the request's thread until a writer comes
                        raise refused(f"{what}: {relative} is not a regular file (a named pipe or a device?)")
            level = below

    def resolve(self, relative: object, field: str = "path", must_exist: bool = True) -> Path:
        """A request's path (never a hub id) as an absolute path inside the workspace (see `place`)."""
        return Path(self.place(relative, field, must_exist=must_exist, local_only=True))

    def confine_config(self, config: RunConfig) -> RunConfig:
        """`config` as the UI may use or launch it: every path key (PATH_KEYS) placed in the workspace (`place`:
        absolute, symbolic links resolved; a hub id only where allowed), no model code, and no user code as a GRPO
        reward (the built-in rewards and the functions loraft ships, rewards.SHIPPED_FUNCTIONS).

        Raises:
            RequestError (400) naming the first key that leads outside or runs a model's own code.
        """
        if config.model.trust_remote_code:
            raise refused("model.trust_remote_code: the UI does not run code shipped with a model; train such a "
                          "model with `loraft train` on the command line")
        for index, reward in enumerate(config.grpo.rewards):
            if reward.type == "function" and reward.function not in SHIPPED_FUNCTIONS:
                raise refused(f"grpo.rewards.{index}: the UI offers the built-in rewards only and never imports code "
                              f"a request names ({reward.function}); train with a function reward with `loraft train` "
                              "on the command line")
        sections: dict[str, dict] = {}
        for key in PATH_KEYS:
            section, _, field = key.rpartition(".")
            value = getattr(getattr(config, section), field) if section else getattr(config, field)
            if value is None:
                continue
            placed = self.place(value, field=key, must_exist=False, local_only=key in LOCAL_ONLY)
            sections.setdefault(section, {})[field] = placed
        update = {name: getattr(config, name).model_copy(update=fields) for name, fields in sections.items() if name}
        return config.model_copy(update={**update, **sections.get("", {})})

    def check_new_name(self, name: object) -> str:
        """A name for a new run: one folder directly in the workspace (`[A-Za-z0-9][A-Za-z0-9._-]{0,63}`)."""
        if not isinstance(name, str):
            raise refused("name must be a string")
        if not RUN_NAME.fullmatch(name):
            raise refused(f"name {name!r} is not a run name: use letters, digits, '.', '_' and '-' (at most 64, "
                          "starting with a letter or digit)")
        return name

    def run_path(self, name: object) -> Path:
        """The directory of run `name`: one folder in the workspace, or two (`group/run`, as `loraft runs`
        lists runs two levels down). Refuses a malformed name (400); the directory need not exist."""
        if not isinstance(name, str) or not 0 < len(name.split("/")) <= 2 or not all(
                RUN_NAME.fullmatch(part) for part in name.split("/")):
            raise refused(f"{name!r} is not a run name: one or two folder names of letters, digits, '.', '_' and '-'")
        return self.resolve(name, field="run", must_exist=False)

    def run_dir(self, name: object) -> Path:
        """The directory of an existing run (its record written, or launched by the UI); 404 otherwise, 400 for one
        holding a link that leads outside (check_tree)."""
        path = self.run_path(name)
        if not (path / RUN_FILE).is_file() and not self.launch_file(name).is_file():
            raise RequestError(404, f"no run named {name!r} in the workspace {self.root}")
        self.check_tree(path, f"run {name!r}")
        return path

    # ------------------------------------------------------------------------------------- the UI's files
    def launch_file(self, name: str) -> Path:
        """The UI's launch record of run `name` (argv, pid, started_at of each start)."""
        return self.ui_dir / "runs" / f"{name}.json"

    def console_log(self, name: str) -> Path:
        """Where the output of the UI's `loraft train` processes of run `name` is appended: in the run directory."""
        return self.run_path(name) / CONSOLE_FILE

    def checked_config(self, name: str) -> Path:
        """The config the UI checked for the newest start or resume of run `name`, which its trainer is launched
        from (see loraft.ui.launch)."""
        return self.ui_dir / "runs" / f"{name}.checked.yaml"

    def submitted_yaml(self, name: str) -> Path:
        """The YAML text a run was started with, when it came from the page rather than a file or preset."""
        return self.ui_dir / "runs" / f"{name}.yaml"

    def jobs_dir(self) -> Path:
        return self.ui_dir / "jobs"

    def read_launch(self, name: str) -> dict:
        """The UI's launch record of run `name` ({} when the UI did not start it or the file is unreadable)."""
        try:
            record = json.loads(self.launch_file(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def launch_alive(self, name: str, launch: Optional[dict] = None) -> bool:
        """Whether the newest process the UI started for run `name` is still running."""
        launch = self.read_launch(name) if launch is None else launch
        newest = (launch.get("starts") or [{}])[-1]
        return process_alive(newest.get("pid"), newest.get("argv"))

    # --------------------------------------------------------------------------------------------- runs
    def run_names(self) -> list[str]:
        """Every run: the run directories at most two levels down, and the UI's launches without a record yet."""
        # a folder linked from outside is not searched: the UI reads nothing outside the workspace
        names = {run.relative_to(self.root).as_posix() for run in find_runs(self.root, within=self.root)
                 if run != self.root}
        runs_dir = self.ui_dir / "runs"
        if runs_dir.is_dir():
            for launch in runs_dir.rglob("*.json"):
                name = launch.relative_to(runs_dir).as_posix()[: -len(".json")]
                if all(RUN_NAME.fullmatch(part) for part in name.split("/")):
                    names.add(name)
        return sorted(names)

    def run_state(self, name: str) -> dict:
        """The run as it is now: liveness.run_state with the workspace-relative name, or for a launch without a
        record `starting` (its process alive) or `failed` (with `error`: what its console said last)."""
        path = self.run_path(name)
        launch = self.read_launch(name)
        if (path / RUN_FILE).is_file():
            self.check_tree(path, f"run {name!r}")
            state = run_state(path)
            state["name"] = name
            state.pop("run_dir", None)
            # a resume the UI started, before its trainer takes the lock: the record still says how it ended
            if (state["status"] in ("stopped", "interrupted", "failed") and launch
                    and (launch.get("starts") or [{}])[-1].get("kind") == "resume" and self.launch_alive(name, launch)):
                state["status"] = "starting"
            return state
        starts = launch.get("starts") or [{}]
        state = {field: None for field in LIST_FIELDS}
        state.update(name=name, started_at=starts[-1].get("started_at"), pid=starts[-1].get("pid"),
                     host=launch.get("host"), recorded_status=None, base_model=launch.get("base_model"))
        if self.launch_alive(name, launch):
            state["status"] = "starting"
        else:
            state["status"] = "failed"
            state["error"] = ("stopped before the run began" if launch.get("stop_requested_at")
                              else last_error_line(self.console_log(name))
                              or "its loraft train process ended before writing the run's record")
        return state

    def list_runs(self) -> list[dict]:
        """GET /api/runs: each run's listed fields, by name; a run that cannot be read is listed `unreadable` with
        its sentence as `error`, and never keeps the others from the list."""
        listed = []
        for name in self.run_names():
            try:
                state = self.run_state(name)
            except (RequestError, LoraftError, OSError, ValueError) as exc:
                reason = exc.message if isinstance(exc, RequestError) else str(exc)
                listed.append({**{field: None for field in LIST_FIELDS}, "name": name, "status": "unreadable",
                               "error": reason})
                continue
            listed.append({field: state.get(field) for field in LIST_FIELDS})
        return listed

    def run_error(self, name: str, state: dict) -> Optional[str]:
        """The one-sentence failure of a run: the record's reason, or what its console said last."""
        if state.get("error"):
            return state["error"]
        if state["status"] not in ("failed", "interrupted"):
            return None
        reason = read_record(self.run_path(name)).get("reason")
        if reason:
            return str(reason)
        return last_error_line(self.console_log(name)) if state["status"] == "failed" else None

    # --------------------------------------------------------------------------------------------- files
    def yaml_files(self, max_depth: int = 3, limit: int = 1000) -> list[str]:
        """Workspace-relative .yaml/.yml files at most `max_depth` folders deep, not in hidden folders or a run's
        checkpoints, not reached through a symbolic link leaving the workspace."""
        return self._files(lambda name: name.endswith((".yaml", ".yml")), max_depth, limit)

    def model_files(self, max_depth: int = 3, limit: int = 200) -> list[str]:
        """What the new-run form offers as model.name_or_path: the workspace's .gguf files (the models Ollama, LM
        Studio and llama.cpp run) and folders holding a model's config.json, found as yaml_files are."""
        return self._files(lambda name: name.lower().endswith(".gguf") or name == "config.json", max_depth, limit,
                           folder_of="config.json")

    def _files(self, wanted, max_depth: int, limit: int, folder_of: Optional[str] = None) -> list[str]:
        found: list[str] = []
        for folder, subfolders, files in os.walk(self.root):
            depth = len(Path(folder).relative_to(self.root).parts)
            subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                                   and name not in SKIPPED_FOLDERS and depth + 1 < max_depth)
            for name in sorted(files):
                if wanted(name) and not name.startswith("."):
                    path = Path(folder) / name
                    real = path.resolve()
                    if self.root in real.parents and real.is_file():
                        shown = path.parent if name == folder_of else path
                        if shown != self.root:
                            found.append(shown.relative_to(self.root).as_posix())
                        if len(found) >= limit:
                            return found
        return found
