"""Settings of the SPD tooling (torch-free: the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillSettings:
    epochs: int = 10
    lr: float = 5e-5
    batch_size: int = 1
    train_norms: bool = False
    samples: int = 16
    seq_len: int = 256
    seed: int = 0
    heldout_samples: int = 4
    heldout_seed: int = 1
    calib: str | None = None
    hg_split_kv_groups: bool = False  # head grouping may split KV groups (extra KV heads on a rank)
    device: str = "cpu"


# The paper's zero-shot tasks with a local copy (SciQ has none).
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "piqa", "winogrande")
# Strategies that run an SPD plan: on the default schedule, or composed with ladder's or TokenWeave's
SPD_STRATEGIES = ("spd", "spd+ladder", "spd+tokenweave")
