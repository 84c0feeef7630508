"""One table of training objectives: `train.objective` -> one entry, looked up once by a run (loraft.train); each
entry's code is its module in loraft/objectives/.

An entry says what the rest of loraft needs to know without importing the objective's code: who computes its loss (loraft's SFT speed path applies only to its own), the data order its trainer
needs, the adapter it starts from, and the pip extra it needs. Its module does the work, with one interface:

    check(config)                                       settings it cannot run with, one sentence each
    prepare(config, tokenizer) -> PreparedData           records read, encoded, cut and cached (train, eval, report)
    arguments(config, plan, run_dir, has_eval)           its TrainingArguments (a subclass: TRL's DPOConfig, ...)
    build_trainer(config, plan, args, model, info, tokenizer, prepared, callbacks)
                                                        its Trainer, with loraft.trainer.RunGuarantees mixed in

Adding an objective is one entry here and its module (objectives/dpo.py is the shortest to copy). Record kinds
have a table too (objectives/kinds.py): `loraft data check/preview` and the UI decide the kind of a file once.

This module imports nothing of loraft (config validates train.objective against OBJECTIVE_NAMES, the plan reads the
entry); the modules are imported by name on lookup, so `loraft plan` never imports TRL.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Objective:
    name: str
    module: str  # the module with check / prepare / arguments / build_trainer
    loss: str  # "loraft": loraft's Trainer (its sub-batches, fused loss, packing, sampler, autotune) or "trl"
    attach_adapter: bool  # load_model_for_training attaches the adapter (False: TRL wraps the base itself)
    sequential: Optional[str] = None  # why its trainer needs the data in order (None: it takes the run's sampler)
    extra: Optional[str] = None  # the pip extra its trainer needs, and its top-level module
    extra_module: Optional[str] = None
    pairs_per_sample: int = 1  # sequences its trainer forwards per sample (chosen + rejected: 2)

    def load(self):
        """The objective's module (one sentence naming the pip extra when it is not installed)."""
        if self.extra:
            from loraft.errors import require

            require(f"train with train.objective={self.name}", self.extra, self.extra_module)
        return importlib.import_module(self.module)


_TRL = dict(loss="trl", extra="preference", extra_module="trl", pairs_per_sample=2)
OBJECTIVES = {
    "sft": Objective("sft", "loraft.objectives.sft", loss="loraft", attach_adapter=True),
    # DPO and KTO without model.adapter_from: TRL wraps the base, and its reference is the adapter switched off
    "dpo": Objective("dpo", "loraft.objectives.dpo", attach_adapter=False, **_TRL),
    "kto": Objective("kto", "loraft.objectives.kto", attach_adapter=False,
                     sequential="KTO estimates its KL term from batch neighbours: TRL requires the sequential order "
                                "(loraft shuffles the data once, seeded)", **_TRL),
    "orpo": Objective("orpo", "loraft.objectives.orpo", attach_adapter=True, **_TRL),
    # GRPO: TRL wraps the base too (with grpo.beta > 0 its reference is the adapter switched off); one sample is one
    # prompt, sampled grpo.num_generations times
    "grpo": Objective("grpo", "loraft.objectives.grpo", loss="trl", attach_adapter=False, extra="preference",
                      extra_module="trl"),
}
OBJECTIVE_NAMES = tuple(OBJECTIVES)


def objective(name: str) -> Objective:
    """The table's entry for `train.objective` (config has validated the name)."""
    return OBJECTIVES[name]
