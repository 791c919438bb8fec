"""Block-to-block (B2B) distillation of SPD blocks.

For each block in mode ``b2b`` or ``hg+b2b``: teacher = the original TP block (frozen),
student = the SPD version of the same block (for ``hg+b2b`` on its head-grouped layout), trained
alone to minimise MSE(SPD_block(X), TP_block(X)) over the block's inputs X in the unmodified
model on calibration windows. The N shards are computed explicitly in one process
(``spd.shards``), which is the same math as N ranks.

Paper defaults: 10 epochs, lr 5e-5. Unstated in the paper, chosen here (all settings):
Adam (betas 0.9/0.999, no weight decay), batch of 1 window, windows shuffled each epoch with a
fixed seed, RMSNorm weights frozen (``train_norms`` to train them), float32. The MSE before
and after is measured on held-out calibration windows (another seed) and recorded in the plan.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spd.data import calibration_windows
from spd.headgroup import head_grouping, shards_of
from spd.plan import Plan, load_plan
from spd.settings import DistillSettings
from spd.shards import NORMS, ShardedBlock, block_inputs, default_shards
from suite.model.sources import resolve

WEIGHTS_FILE = "weights.safetensors"


@torch.no_grad()
def spd_mse(block: ShardedBlock, x: torch.Tensor, target: torch.Tensor) -> float:
    return F.mse_loss(block.spd(x), target).item()


def train_block(student: ShardedBlock, x: torch.Tensor, target: torch.Tensor, s: DistillSettings) -> None:
    params = [p for n, p in student.w.items() if s.train_norms or n.replace("/", ".") not in NORMS]
    for p in student.w.values():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.Adam(params, lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, len(order), s.batch_size):
            idx = order[i: i + s.batch_size]
            loss = F.mse_loss(student.spd(x[idx]), target[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    student.requires_grad_(False)


def distill(plan: Plan, settings: DistillSettings, model: str | None = None,
            only: set[int] | None = None) -> tuple[Plan, dict]:
    """Distil the b2b / hg+b2b blocks of ``plan`` (those in ``only``, if given); returns the plan and new tensors."""
    source = resolve(model or plan.model)
    plan.validate(source, plan.tp, need_weights=False)
    config, tp = source.config, plan.tp
    train_x = block_inputs(source, calibration_windows(source, settings.calib, settings.samples,
                                                       settings.seq_len, settings.seed))
    held_x = block_inputs(source, calibration_windows(source, settings.calib, settings.heldout_samples,
                                                      settings.seq_len, settings.heldout_seed))
    tensors, report = {}, {}
    blocks = sorted(plan.distilled_blocks() & (only if only is not None else plan.distilled_blocks()))
    for b in tqdm(blocks, desc="distill"):
        entry = plan.blocks[b]
        teacher = ShardedBlock.load(source, b, default_shards(config, tp, b))
        with torch.no_grad():
            target, held_target = teacher.tp(train_x[b]), teacher.tp(held_x[b])
        zs = spd_mse(teacher, held_x[b], held_target)
        shards = default_shards(config, tp, b)
        if entry["mode"] == "hg+b2b":
            entry["layout"] = head_grouping(source, b, tp, train_x[b])
            shards = shards_of(entry["layout"], config)
        student = ShardedBlock.load(source, b, shards)
        initial = spd_mse(student, held_x[b], held_target)
        train_block(student, train_x[b], target, settings)
        report[str(b)] = {"mode": entry["mode"], "mse_zs": zs, "mse_init": initial,
                          "mse_b2b": spd_mse(student, held_x[b], held_target)}
        tensors |= student.state(b)
    plan.distill = {"settings": asdict(settings), "optimizer": "adam", "heldout_mse": report}
    return plan, tensors


def distill_to(plan_path: str | Path, out_dir: str | Path, settings: DistillSettings,
               model: str | None = None) -> Path:
    """Distil the plan's blocks and write ``out_dir/plan.json`` + ``out_dir/weights.safetensors``."""
    from safetensors.torch import save_file

    plan, tensors = distill(load_plan(plan_path), settings, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    plan.weights = WEIGHTS_FILE if tensors else None
    return plan.save(out_dir / "plan.json")
