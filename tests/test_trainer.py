"""Each LoraftTrainer override and each run guarantee on its own, on a tiny model, without a training run."""

from __future__ import annotations

import json

import pytest
import torch

from loraft.batching import LengthGroupedSampler
from loraft.config import AdapterConfig
from loraft.rundir import last_complete_checkpoint
from loraft.objectives.sft import LoraftTrainer
from loraft.trainer import STAGING, MetricsCallback, NonFiniteTraining


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    from loraft.model import attach_adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = AdapterConfig(target_modules=["q_proj", "v_proj"], modules_to_save=None, r=4)
    model, _ = attach_adapter(base, adapter)
    # LoRA B starts at zero: give it values so every LoRA gradient is non-trivial
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def _dataset(tokenizer, lengths=(5, 17, 9, 30)):
    from datasets import Dataset

    rows = []
    for index, length in enumerate(lengths):
        ids = [(7 * index + 3 * position) % 200 + 10 for position in range(length)]
        labels = [-100] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels, "length": length})
    return Dataset.from_list(rows)


def _plan(**decisions):
    """A plan with the given decisions (sampler, micro_batch_tokens, fused_loss, packing), the rest as planned."""
    from dataclasses import replace

    from loraft.config import RunConfig
    from loraft.plan import make_plan
    from loraft.precision import Capabilities

    caps = Capabilities("cpu", "override", cpu_bf16_flags=False, bf16_speedup=0.01)
    base = make_plan(RunConfig(), caps, {"model_type": "llama"})
    return replace(base, **{"fused_loss": False, "micro_batch_tokens": 0, "sampler": "random", **decisions})


def _trainer(model, tokenizer, tmp_path, nonfinite_patience=0, **decisions):
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints" / STAGING), use_cpu=True, report_to="none",
                             per_device_train_batch_size=4, save_total_limit=2, logging_steps=1)
    return LoraftTrainer(model=model, args=args, train_dataset=_dataset(tokenizer), processing_class=tokenizer,
                         data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
                         plan=_plan(**decisions), nonfinite_patience=nonfinite_patience)


def _batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    count = int((batch["labels"][:, 1:] != -100).sum())
    return batch, count


def _gradients(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture()
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_sub_batched_training_step_equals_the_unsplit_step(tiny_llama_dir, tokenizer, tmp_path):
    results = []
    for budget in (0, 40):  # 40 padded tokens: the 4 x 30 batch runs as several sub-batches
        model = _model(tiny_llama_dir)
        trainer = _trainer(model, tokenizer, tmp_path, micro_batch_tokens=budget)
        batch, count = _batch(trainer)
        loss = trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(count))
        results.append((float(loss), _gradients(model)))
    (whole_loss, whole), (split_loss, split) = results
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == split.keys() and any("lora_A" in name for name in whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


def test_supervised_loss_equals_the_models_own_and_falls_back_when_it_does_not_apply(tiny_llama_dir, tokenizer,
                                                                                       tmp_path):
    model = _model(tiny_llama_dir)
    fused = _trainer(model, tokenizer, tmp_path, fused_loss=True)
    plain = _trainer(model, tokenizer, tmp_path, fused_loss=False)
    batch, count = _batch(fused)
    model.train()
    assert fused.fused_loss and not plain.fused_loss
    ours = fused.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(count))
    theirs = plain.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # evaluation (return_outputs) takes Trainer's own path, which returns the logits
    loss, outputs = fused.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape


def test_non_finite_gradient_norm_stops_past_patience_and_zeroes_within_it(tiny_llama_dir, tokenizer, tmp_path):
    model = _model(tiny_llama_dir)
    trainer = _trainer(model, tokenizer, tmp_path, nonfinite_patience=1)
    batch, count = _batch(trainer)

    def before_optimizer_step():  # the public hook Trainer calls after clipping, before optimizer.step()
        trainer.callback_handler.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)

    def poison(value):  # one gradient element of a trainable parameter
        parameter = next(p for p in model.parameters() if p.requires_grad)
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        parameter.grad.view(-1)[0] = value

    trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(count))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    before_optimizer_step()  # finite: untouched
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters() if name in grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    poison(float("nan"))
    before_optimizer_step()  # first non-finite step: tolerated, zeroed
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())
    poison(float("inf"))
    with pytest.raises(NonFiniteTraining, match=r"training stopped at step 1: the gradient norm is not finite "
                                                r"\(2 step\(s\) in a row, train.nonfinite_patience=1\)"):
        before_optimizer_step()
    # a finite step resets the count; a non-finite loss is caught even with finite gradients
    poison(1.0)
    before_optimizer_step()
    trainer.nonfinite.saw_loss(torch.tensor(float("nan")))
    before_optimizer_step()
    trainer.nonfinite.saw_loss(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteTraining, match="the loss is not finite"):
        before_optimizer_step()


def test_length_grouped_sampler_only_when_asked(tiny_llama_dir, tokenizer, tmp_path):
    model = _model(tiny_llama_dir)
    grouped = _trainer(model, tokenizer, tmp_path, sampler="length_grouped")._get_train_sampler()
    assert isinstance(grouped, LengthGroupedSampler) and sorted(grouped) == [0, 1, 2, 3]
    assert not isinstance(_trainer(model, tokenizer, tmp_path)._get_train_sampler(), LengthGroupedSampler)


def test_checkpoints_are_staged_then_renamed_and_rotated(tiny_llama_dir, tokenizer, tmp_path):
    model = _model(tiny_llama_dir)
    trainer = _trainer(model, tokenizer, tmp_path)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        trainer.state.global_step = step
        # what Trainer does at a save step: write the checkpoint (into its output_dir, the staging folder), then
        # call on_save
        trainer._save_checkpoint(model, trial=None)
        assert (root / STAGING / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
        assert not (root / f"checkpoint-{step}").exists()  # not final until renamed
        trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        assert (root / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
        assert not (root / STAGING).exists()
    # save_total_limit=2 keeps the newest two, each complete
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert last_complete_checkpoint(root) == root / "checkpoint-3"


def test_metrics_callback_appends_one_line_per_log_on_rank_zero_only(tmp_path):
    from transformers import TrainerControl, TrainerState

    callback = MetricsCallback(tmp_path)
    state = TrainerState()
    state.global_step, state.epoch = 3, 0.5
    callback.on_log(None, state, TrainerControl(), logs={"loss": 1.5})
    callback.on_log(None, state, TrainerControl(), logs={})  # nothing logged: no line
    state.is_world_process_zero = False
    callback.on_log(None, state, TrainerControl(), logs={"loss": 9.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 3 and lines[0]["loss"] == 1.5 and lines[0]["epoch"] == 0.5
