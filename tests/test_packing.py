"""Packing (train.packing): a step's samples packed into rows give the padded step's loss and gradients, and no
token of a packed row attends to another sample's tokens; for every architecture the registry says packs."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fastpaths import SHAPES, _model

from loraft.fastpaths import REGISTRY, apply_patch, fast_path, packed_segments
from loraft.packing import pack_batch, pack_row, plan_rows, unpad
from loraft.objectives.sft import LoraftTrainer

PACKING = sorted(name for name, entry in REGISTRY.items() if entry.packing)
LENGTHS = (5, 17, 9, 30, 12)


def _padded_batch(lengths=LENGTHS, vocab=96):
    generator = torch.Generator().manual_seed(2)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids = torch.randint(3, vocab, (length,), generator=generator)
        input_ids[row, :length] = ids
        mask[row, :length] = 1
        labels[row, length // 3:length] = ids[length // 3:]  # a masked prompt, then the supervised response
    count = int((labels[:, 1:] != -100).sum())
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}, count


def _trainer(model, tmp_path, **decisions):
    from dataclasses import replace

    from transformers import TrainingArguments

    from loraft.config import RunConfig
    from loraft.plan import make_plan
    from loraft.precision import Capabilities

    caps = Capabilities("cpu", "override", cpu_bf16_flags=False, bf16_speedup=0.01)
    plan = replace(make_plan(RunConfig(), caps, model.config), **{"micro_batch_tokens": 0, "fused_loss": False,
                                                                  "packing": False, **decisions})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=5)
    return LoraftTrainer(model=model, args=args, plan=plan)


def _prepared(model_type):
    model = _model(model_type).train()
    if fast_path(model).patch is not None:
        apply_patch(model)
    return model


def test_rows_hold_whole_samples_first_fit_decreasing():
    rows = plan_rows([5, 17, 9, 30, 12], budget=32)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert rows == [[3], [1, 4], [2, 0]]  # 30 | 17+12 | 9+5
    assert plan_rows([40, 3], budget=32) == [[0], [1]]  # a sample longer than the budget has its own row


def test_packed_rows_restart_positions_mask_first_labels_and_pad_their_tails():
    batch, _ = _padded_batch((3, 4, 2, 6))
    (sub_batch,) = pack_batch(batch, budget=64)  # rows of 6 tokens (the longest sample), all in one sub-batch
    assert sub_batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert sub_batch["input_ids"][1, :4].tolist() == batch["input_ids"][1, :4].tolist()  # longest first
    labels = sub_batch["labels"]
    assert labels[1, 0] == labels[1, 4] == labels[2, 0] == labels[2, 3] == -100  # each sample's first label
    assert sub_batch["use_cache"] is False
    three_per_batch = pack_batch(batch, budget=13)  # 13 // 6 = 2 rows per sub-batch
    assert [b["input_ids"].shape for b in three_per_batch] == [torch.Size([2, 6]), torch.Size([1, 6])]
    padded = pack_batch(_padded_batch((3, 6, 2))[0], budget=64)[0]
    assert padded["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 0]  # 3 + 2, then a padding segment
    assert padded["labels"][1, 5] == -100


@pytest.mark.parametrize("model_type", PACKING)
@pytest.mark.parametrize("supervised_loss", [True, False])
def test_packed_step_equals_the_padded_step(model_type, supervised_loss, tmp_path):
    results = []
    for packing in (False, True):
        model = _prepared(model_type)
        trainer = _trainer(model, tmp_path, packing=packing, micro_batch_tokens=32, fused_loss=supervised_loss)
        batch, count = _padded_batch()
        loss = trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(count))
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded), (packed_loss, packed) = results
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded.keys() == packed.keys()
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", PACKING)
def test_no_token_attends_across_samples(model_type):
    model = _prepared(model_type).eval()
    batch, _ = _padded_batch((6, 7))
    row = {key: value[None] for key, value in pack_row(unpad(batch)[::-1]).items()}  # 7 then 6 tokens, one row
    changed = copy.deepcopy(row)
    changed["input_ids"][0, :7] = (changed["input_ids"][0, :7] + 1) % 90 + 3  # the first sample's tokens only
    with torch.no_grad():
        outputs = []
        for inputs in (row, changed):
            with packed_segments(model, inputs["position_ids"]):
                outputs.append(model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                     use_cache=False).logits)
    assert not torch.allclose(outputs[0][0, :7], outputs[1][0, :7])
    torch.testing.assert_close(outputs[1][0, 7:], outputs[0][0, 7:], rtol=1e-5, atol=1e-5)
    # and the second sample's logits are what it gets alone
    with torch.no_grad():
        alone = model(input_ids=row["input_ids"][:, 7:], use_cache=False).logits
    torch.testing.assert_close(outputs[0][0, 7:], alone[0], rtol=1e-4, atol=1e-5)


def test_unregistered_architectures_and_unpatched_bloom_are_not_packed(tmp_path):
    assert set(PACKING) == set(SHAPES)  # every registered architecture packs, each tested above
    model = _model("llama")
    model.config.model_type = "gemma"
    # the plan decides it once, from the config and the architecture: such runs train padded
    from loraft.config import load_config
    from loraft.plan import make_plan
    from loraft.precision import Capabilities

    caps = Capabilities("cpu", "override", cpu_bf16_flags=False, bf16_speedup=0.01)
    packed = load_config(None, ["train.packing=true"])
    assert make_plan(packed, caps, {"model_type": "llama"}).packing
    gemma = make_plan(packed, caps, {"model_type": "gemma"})
    assert not gemma.packing and gemma.reasons["packing"] == "model_type gemma has no way registered to keep packed samples apart"
    eager = make_plan(load_config(None, ["train.packing=true", "model.attn_implementation=eager"]), caps,
                      {"model_type": "bloom"})
    assert not eager.packing and "only in loraft's attention patch" in eager.reasons["packing"]


@pytest.mark.parametrize("fixture", ["tiny_bloom_dir", "tiny_qwen2_dir"])
def test_train_packed_logs_the_padded_runs_losses(fixture, request, tmp_path, alpaca_jsonl):
    import json

    from loraft.config import load_config
    from loraft.train import train

    data = alpaca_jsonl
    losses = {}
    for packing in ("false", "true"):
        run = train(load_config(None, [
            f"model.name_or_path={request.getfixturevalue(fixture)}", f"data.path={data}",
            f"output_dir={tmp_path / packing}", "train.max_steps=3", "train.per_device_train_batch_size=4",
            "train.gradient_accumulation_steps=2", "train.micro_batch_tokens=48", "train.learning_rate=0.01",
            "train.logging_steps=1", "train.precision=fp32", f"train.packing={packing}",
            "adapter.target_modules=.*(query_key_value|q_proj|v_proj)", "adapter.modules_to_save=null",
            ]))
        losses[packing] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                           if "loss" in r]
        plan = json.loads((run / "loraft_run.json").read_text())["plan"]
        assert plan["packing"] == (packing == "true") and plan["micro_batch_tokens"] == 48
        expected = "packing             yes" if packing == "true" else "packing             no"
        assert expected in (run / "train.log").read_text()
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
