"""The run's loss curve (loss.png): training and eval loss by optimizer step, and a preference run's rewards."""

from __future__ import annotations

import os
from pathlib import Path

from loraft.rundir import read_metrics


REWARD_CURVES = (("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"),
                 ("rewards/margins", "margin"))


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Draw training (and eval) loss against optimizer step, and for a preference run (TRL's `rewards/*` logged)
    a second panel with the chosen and rejected rewards, their margin and the reward accuracy; returns False when
    nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points, eval_points = [], []
    rewards: dict[str, list] = {key: [] for key, _ in REWARD_CURVES + (("rewards/accuracies", ""),)}
    for record in read_metrics(metrics_path):
        if "loss" in record:
            train_points.append((record["step"], record["loss"]))
        elif "train_loss" in record and not train_points:
            # a run shorter than logging_steps: plot its mean loss at the last step
            train_points.append((record["step"], record["train_loss"]))
        if "eval_loss" in record:
            eval_points.append((record["step"], record["eval_loss"]))
        for key, points in rewards.items():
            if key in record and "loss" in record:
                points.append((record["step"], record[key]))
    if not train_points and not eval_points:
        return False
    has_rewards = any(rewards.values())
    figure, axes = plt.subplots(2 if has_rewards else 1, 1, figsize=(7, 7 if has_rewards else 4), dpi=100,
                                squeeze=False)
    axis = axes[0][0]
    if train_points:
        axis.plot(*zip(*train_points), marker="o", markersize=3, label="train loss")
    if eval_points:
        axis.plot(*zip(*eval_points), marker="s", markersize=4, label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(f"loraft: {png_path.parent.name}")
    axis.grid(alpha=0.3)
    axis.legend()
    if has_rewards:
        axis = axes[1][0]
        for key, label in REWARD_CURVES:
            if rewards[key]:
                axis.plot(*zip(*rewards[key]), marker="o", markersize=3, label=label)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("implicit reward")
        axis.grid(alpha=0.3)
        if rewards["rewards/accuracies"]:
            accuracy = axis.twinx()
            accuracy.plot(*zip(*rewards["rewards/accuracies"]), color="grey", linestyle="--", label="reward accuracy")
            accuracy.set_ylim(-0.05, 1.05)
            accuracy.set_ylabel("reward accuracy")
            accuracy.legend(loc="lower right")
        axis.legend(loc="upper left")
    figure.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, png_path)
    return True
