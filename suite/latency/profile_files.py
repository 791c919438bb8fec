"""Profile and data files: a shipped name (a YAML file in a folder of the package) or a path."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from suite.errors import SpdbenchError


def read_mapping(
    name_or_path: str | os.PathLike, folder: Path, what: str, error: type[SpdbenchError], hint: str = ""
) -> tuple[dict, str]:
    """The YAML mapping of a file ``name_or_path``, or of ``folder/NAME.yaml``, and the path it came from."""
    path = Path(name_or_path)
    if not path.is_file():
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise error(f"{what} {str(name_or_path)!r}: no such file or name; shipped: {shipped}{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not YAML ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping with name, sources, method and the tables")
    return data, str(path)
