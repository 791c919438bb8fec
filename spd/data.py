"""Token windows for SPD calibration and evaluation, from the offline data folder.

The data folder is the one accuracy uses (``suite.accuracy.tasks.data_dir``: ``SPDBENCH_DATA``, else
``../shared/data`` next to the project). Calibration windows are drawn at random offsets with
a fixed seed; evaluation windows are consecutive and non-overlapping from the start of the text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from suite.accuracy.tasks import data_dir
from suite.errors import SpdbenchError

CALIBRATION = "calibration_wiki/wiki.utf8"
WIKITEXT2_TEST = "wikitext2_raw/wiki.test.raw"


class DataError(SpdbenchError):
    """A data file is missing or too short for the requested windows."""


def data_file(path: str | os.PathLike | None, default: str) -> Path:
    """An explicit path as given, else ``default`` inside the data folder."""
    folder = data_dir()
    file = Path(path) if path else folder / default if folder else None
    if file is None or not file.is_file():
        raise DataError(
            f"data file {file or default} not found: pass calib FILE or set SPDBENCH_DATA to the data folder"
        )
    return file


def read_text(file: Path) -> str:
    text = file.read_text(encoding="utf-8").replace("\r\n", "\n")
    return re.sub(r"^</?doc[^>]*>\n", "", text, flags=re.M)  # calibration articles are <doc> wrapped


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def random_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at random offsets (fixed seed): [samples, seq_len]."""
    room = ids.numel() - seq_len
    if room < 1:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    starts = torch.randint(0, room, (samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def consecutive_windows(ids: torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """The first ``samples * seq_len`` tokens as [samples, seq_len]."""
    if ids.numel() < samples * seq_len:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than {samples} x {seq_len}")
    return ids[: samples * seq_len].view(samples, seq_len)


def calibration_windows(source, calib: str | None, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    return random_windows(
        tokenize(source.tokenizer(), read_text(data_file(calib, CALIBRATION))), samples, seq_len, seed
    )


def wikitext2_windows(source, samples: int, seq_len: int) -> torch.Tensor:
    """The first ``samples * seq_len`` tokens of the WikiText-2 (raw) test split, as consecutive windows."""
    text = data_file(None, WIKITEXT2_TEST).read_text(encoding="utf-8").replace("\r\n", "\n")
    return consecutive_windows(tokenize(source.tokenizer(), text), samples, seq_len)
