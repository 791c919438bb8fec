"""Writing a file or folder so that readers see the old one or the whole new one, never a part (no torch here)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(out: Path, folder: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) beside ``out`` to write; it replaces ``out`` when the block ends, and is
    removed when the block raises (a crash or Ctrl-C leaves ``out`` as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    else:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not folder:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
