"""GRPO's rewards (grpo.rewards): the built-in checks, user functions, and the guard every reward runs behind.

Each reward is called as TRL's GRPOTrainer calls a reward function: `reward(prompts=, completions=,
completion_ids=, **columns)`, one list entry per completion, the record's fields as lists (`answer=[...]`), and it
returns one float (or None: not applicable, as TRL reads it) per completion. The built-ins:
- exact_match: 1.0 when the completion, stripped, equals str(record[field]) stripped, else 0.0;
- number: 1.0 when the last number written in the completion equals the number in record[field] (1,234 and 1234.0
  read as 1234), else 0.0;
- regex: 1.0 when the whole stripped completion matches the pattern (DOTALL), else 0.0;
- length: 0.0 up to max_tokens completion tokens, then -(tokens - max_tokens) / max_tokens.

`guarded` wraps each one so that a reward that raises, returns the wrong count, a non-number or a non-finite value
stops the run with one sentence naming the reward and the record (RewardError), and `check_fields` names a record
that lacks the field a reward reads before any training (`loraft data check`).
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from typing import Any, Callable, Optional, Sequence

from loraft.config_grpo import RewardConfig
from loraft.errors import LoraftError

RECORD_COLUMN = "loraft_record"  # where each prompt came from ("data.jsonl, line 3"), passed along with the fields
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
TRL_KEYWORDS = ("trainer_state", "log_extra", "log_metric", "environments")  # what TRL adds to a reward's kwargs
# reward functions that ship with loraft (not a user's code): the UI, which imports no code a request names, allows these
SHIPPED_FUNCTIONS = ("loraft.demo.rl:place_accuracy",)


class RewardError(LoraftError):
    """A reward that fails on a completion, or a reward that cannot be set up (its function cannot be imported)."""


def parse_number(text: str) -> Optional[float]:
    """The number `text` writes (commas between thousands allowed), or None."""
    try:
        return float(str(text).strip().replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> Optional[float]:
    """The last number written in `text`, or None."""
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def exact_match(completions: Sequence[str], answers: Sequence[Any]) -> list[float]:
    return [float(str(c).strip() == str(a).strip()) for c, a in zip(completions, answers)]


def number_match(completions: Sequence[str], answers: Sequence[Any]) -> list[float]:
    scores = []
    for completion, answer in zip(completions, answers):
        got, expected = last_number(completion), parse_number(answer)
        scores.append(float(got is not None and expected is not None
                            and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)))
    return scores


def regex_match(completions: Sequence[str], pattern: str) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(completion_ids: Sequence[Sequence[int]], max_tokens: int) -> list[float]:
    return [-max(0, len(ids) - max_tokens) / max_tokens for ids in completion_ids]


def import_function(spec: str) -> Callable:
    """The callable `module:function` names, imported with the working directory on the path.

    Raises:
        RewardError: the module or the attribute cannot be found, or is not callable.
    """
    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error in it is theirs
        raise RewardError(f"grpo reward function {spec}: cannot import {module_name} ({type(exc).__name__}: "
                          f"{exc})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardError(f"grpo reward function {spec}: {module_name} has no function {attribute}")
    return function


def builtin(reward: RewardConfig) -> Callable:
    """The reward function of a built-in reward, in TRL's signature."""
    if reward.type == "exact_match":
        return lambda completions, **columns: exact_match(completions, columns[reward.field])
    if reward.type == "number":
        return lambda completions, **columns: number_match(completions, columns[reward.field])
    if reward.type == "regex":
        return lambda completions, **columns: regex_match(completions, reward.pattern)
    if reward.type == "length":
        return lambda completions, completion_ids, **columns: length_penalty(completion_ids, reward.max_tokens)
    raise ValueError(reward.type)


def field_of(reward: RewardConfig) -> Optional[str]:
    """The record field the reward reads (None: it reads only the completion)."""
    return reward.field if reward.type in ("exact_match", "number") else None


class GuardedReward:
    """A reward as TRL calls it, stopping the run with one sentence (RewardError) when it misbehaves."""

    def __init__(self, label: str, function: Callable):
        self.label = label
        self.function = function
        self.__name__ = label  # TRL names the reward's metrics after it: rewards/<label>/mean

    def _where(self, columns: dict, index: int) -> str:
        records = columns.get(RECORD_COLUMN)
        return records[index] if records and index < len(records) else f"completion {index + 1}"

    def _fails_alone(self, prompts, completions, completion_ids, columns) -> Optional[tuple[int, Exception]]:
        """The first completion that the reward raises on when called with it alone (None when none does)."""
        for index in range(len(completions)):
            one = {key: ([value[index]] if isinstance(value, list) and len(value) == len(completions) else value)
                   for key, value in columns.items()}
            try:
                self.function(prompts=[prompts[index]], completions=[completions[index]],
                              completion_ids=[completion_ids[index]], **one)
            except Exception as exc:  # the user's function: any exception is its failure
                return index, exc
        return None

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[Optional[float]]:
        try:
            values = self.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as exc:  # the user's function: any exception is its failure
            alone = self._fails_alone(prompts, completions, completion_ids, columns)
            index, exc = alone if alone else (0, exc)
            where = self._where(columns, index) if alone else "a batch of " + str(len(completions))
            raise RewardError(f"reward {self.label} raised {type(exc).__name__} ({exc}) on the completion of "
                              f"{where}: {completions[index][:80]!r}") from None
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {self.label} returned {type(values).__name__}, not a list of one number per "
                              f"completion ({len(completions)})") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {self.label} returned {len(values)} values for {len(completions)} "
                              f"completions (records from {self._where(columns, 0)}): it must return one per "
                              "completion")
        checked: list[Optional[float]] = []
        for index, value in enumerate(values):
            if value is None:
                checked.append(None)
                continue
            try:
                if isinstance(value, (str, bytes)):
                    raise TypeError(value)
                number = float(value)
            except (TypeError, ValueError):
                raise RewardError(f"reward {self.label} returned {value!r} ({type(value).__name__}) for the "
                                  f"completion of {self._where(columns, index)}: a reward is a number or None"
                                  ) from None
            if not math.isfinite(number):
                raise RewardError(f"reward {self.label} returned {number} for the completion of "
                                  f"{self._where(columns, index)}: a reward must be finite")
            checked.append(number)
        return checked


def build_rewards(rewards: Sequence[RewardConfig]) -> tuple[list[GuardedReward], list[float]]:
    """The run's reward functions, guarded, and their weights (TRL's reward_funcs and reward_weights)."""
    functions = []
    for reward in rewards:
        function = import_function(reward.function) if reward.type == "function" else builtin(reward)
        functions.append(GuardedReward(reward.label, function))
    return functions, [reward.weight for reward in rewards]


def check_fields(path: str, rewards: Sequence[RewardConfig], records: Sequence[dict]) -> None:
    """Every record has the fields the built-in rewards read, and a number reward's field holds a number.

    Args:
        records: {"where": ..., "fields": the record's own fields} per prompt record.
    Raises:
        DataError: naming the file, the record and the field.
    """
    from loraft.errors import DataError

    for reward in rewards:
        field = field_of(reward)
        if field is None:
            continue
        for record in records:
            value = record["fields"].get(field)
            if value is None:
                raise DataError(path, f"has no {field!r}, which the {reward.label} reward compares the completion "
                                "with", record["where"], field)
            if reward.type == "number" and parse_number(value) is None:
                raise DataError(path, f"{value!r} is not a number, which the {reward.label} reward needs",
                                record["where"], field)
