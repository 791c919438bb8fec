"""Block-to-block (B2B) distillation of SPD blocks.

For each block in mode ``b2b`` or ``hg+b2b``: teacher = the original TP block (frozen),
student = the SPD version of the same block (for ``hg+b2b`` on its head-grouped layout), trained
alone to minimise MSE(SPD_block(X), TP_block(X)) over the block's inputs X in the unmodified
model on calibration windows. Teacher and student are the N real rank blocks run by the SPD
schedule in one process (``spd.ranks``); the model is streamed one block at a time, so memory
holds one block with its gradients and optimizer state, plus the activations.

Paper defaults: 10 epochs, lr 5e-5. Unstated in the paper, chosen here (all settings):
Adam (betas 0.9/0.999, no weight decay), batch of 1 window, windows shuffled each epoch with a
fixed seed, RMSNorm weights frozen (``train_norms`` to train them), float32. A weight that
several ranks hold (the norms, a KV head shared by ranks) gets the summed gradient of its
copies, so it stays one weight. The MSE before and after is measured on held-out calibration
windows (another seed) and recorded in the plan.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spd.data import calibration_windows
from spd.headgroup import head_grouping, kv_cost, shards_of
from spd.plan_file import Plan, load_plan
from spd.ranks import BlockStream, RankBlocks
from spd.settings import DistillSettings
from suite.model.sources import resolve

WEIGHTS_FILE = "weights.safetensors"


@torch.no_grad()
def spd_mse(block: RankBlocks, x: torch.Tensor, target: torch.Tensor) -> float:
    return F.mse_loss(block(x, spd=True), target).item()


def train_block(student: RankBlocks, x: torch.Tensor, target: torch.Tensor, s: DistillSettings) -> None:
    optimizer = torch.optim.Adam(student.trainable(s.train_norms), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, len(order), s.batch_size):
            idx = order[i : i + s.batch_size].to(x.device)
            loss = F.mse_loss(student(x[idx], spd=True), target[idx])
            optimizer.zero_grad()
            loss.backward()
            student.sync_replica_grads()
            optimizer.step()
    for block in student.blocks:
        block.requires_grad_(False)
        block.zero_grad(set_to_none=True)


def _distil_block(
    stream: BlockStream, entry: dict, b: int, x, target, held_x, held_target, settings: DistillSettings
) -> tuple[dict, dict]:
    """Train block ``b``'s SPD student (head-grouped first for ``hg+b2b``); its held-out MSEs and tensors."""
    config = stream.source.config
    teacher = stream.block(b)
    zs = spd_mse(teacher, held_x, held_target)
    if entry["mode"] == "hg+b2b":
        entry["layout"] = head_grouping(stream, teacher, x, settings.hg_split_kv_groups)
        entry["kv_cost"] = kv_cost(config, shards_of(entry["layout"], config))
        del teacher  # one block in memory at a time
        student = stream.block(b, shards_of(entry["layout"], config))
    else:
        student = teacher  # b2b: the SPD student starts from the teacher's weights
    initial = spd_mse(student, held_x, held_target)
    train_block(student, x, target, settings)
    mse = {"mode": entry["mode"], "mse_zs": zs, "mse_init": initial, "mse_b2b": spd_mse(student, held_x, held_target)}
    return mse, {name: t.cpu() for name, t in student.state().items()}


def distill(
    plan: Plan, settings: DistillSettings, model: str | None = None, only: set[int] | None = None
) -> tuple[Plan, dict]:
    """Distil the b2b / hg+b2b blocks of ``plan`` (those in ``only``, if given); returns the plan and new tensors."""
    device = torch.device(settings.device)
    source = resolve(model or plan.model, device)
    plan.validate(source, plan.tp, need_weights=False)
    blocks = sorted(plan.distilled_blocks() & (only if only is not None else plan.distilled_blocks()))
    tensors, report = {}, {}
    if blocks:
        windows = [
            calibration_windows(source, settings.calib, n, settings.seq_len, seed)
            for n, seed in ((settings.samples, settings.seed), (settings.heldout_samples, settings.heldout_seed))
        ]
        stream = BlockStream(source, plan.tp, device, windows)
        with tqdm(total=len(blocks), desc="distill") as progress:
            for b, (x, held_x), (target, held_target) in stream.blocks(blocks[-1]):
                if b in blocks:
                    report[str(b)], block_tensors = _distil_block(
                        stream, plan.blocks[b], b, x, target, held_x, held_target, settings
                    )
                    tensors |= block_tensors
                    progress.update()
    plan.distill = {"settings": asdict(settings), "optimizer": "adam", "heldout_mse": report}
    return plan, tensors


def distill_to(plan_path: str | Path, out_dir: str | Path, settings: DistillSettings, model: str | None = None) -> Path:
    """Distil the plan's blocks and write ``out_dir/plan.json`` + ``out_dir/weights.safetensors``."""
    from safetensors.torch import save_file

    plan, tensors = distill(load_plan(plan_path), settings, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    plan.weights = WEIGHTS_FILE if tensors else None
    return plan.save(out_dir / "plan.json")
