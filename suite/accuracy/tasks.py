"""lm-eval's own tasks, fed from local copies of their data sets.

Each task keeps lm-eval's definition (prompt format, metrics, process_docs); only the data
source changes: the local file is converted once into JSON lines with exactly the fields of
the Hub data set the task reads (into the cache folder, never into the project), and the
task config points lm-eval's ``json`` loader at it. Without a local data folder the tasks
read the Hub as usual.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
from pathlib import Path

from suite.errors import SpdbenchError
from suite.files import atomic_output
from suite.model.sources import cache_dir
from suite.results import parse_jsonl

_REPO_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class TaskDataError(SpdbenchError):
    """Unknown task, missing data folder or malformed data file (the message names it)."""


def _jsonl(path: Path) -> list[dict]:
    return parse_jsonl(_read(path), path, TaskDataError)


def _read(path: Path) -> str:
    try:
        raw = bz2.open(path).read() if path.suffix == ".bz2" else path.read_bytes()
        return raw.decode("utf-8")
    except FileNotFoundError:
        raise TaskDataError(f"{path}: data file is missing") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot read it ({exc})") from None


def _field(path: Path, n: int, row: dict, *keys: str):
    try:
        return [row[k] for k in keys] if len(keys) > 1 else row[keys[0]]
    except (KeyError, TypeError) as exc:
        raise TaskDataError(f"{path}:{n}: missing field {exc}") from None


def _labels(path: Path, count: int, allowed: set[str]) -> list[str]:
    labels = _read(path).split()
    if len(labels) != count or not set(labels) <= allowed:
        raise TaskDataError(
            f"{path}: expected {count} labels from {sorted(allowed)}, found {len(labels)} "
            f"({sorted(set(labels) - allowed)[:3] or 'count differs'})"
        )
    return labels


def _wikitext(folder: Path) -> list[dict]:
    """Whole articles, as EleutherAI/wikitext_document_level builds them from the raw rows."""
    path = folder / "wiki.test.raw"
    lines = _read(path).replace("\r\n", "\n").split("\n")
    pages, current = [], []
    for line in lines:
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(current).strip():
                pages.append({"page": "\n".join(current)})
            current = []
        current.append(line)
    if "\n".join(current).strip():
        pages.append({"page": "\n".join(current)})
    if not pages:
        raise TaskDataError(f"{path}: no articles found (expected ' = Title = ' heading lines)")
    return pages


def _lambada(folder: Path) -> list[dict]:
    path = folder / "lambada_test.jsonl"
    return [{"text": _field(path, n, row, "text")} for n, row in enumerate(_jsonl(path), 1)]


def _hellaswag(folder: Path) -> list[dict]:
    """llama.cpp layout: 6 lines per item (``activity_label: ctx``, gold label, four endings)."""
    path = folder / "hellaswag_val_full.txt.bz2"
    lines = _read(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        context, label, *endings = lines[i : i + 6]
        if label not in {"0", "1", "2", "3"}:
            raise TaskDataError(f"{path}:{i + 2}: label {label!r} is not 0-3")
        activity, _, ctx = context.partition(": ")
        docs.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": label,
            }
        )
    return docs


def _piqa(folder: Path) -> list[dict]:
    path = folder / "valid.jsonl"
    rows = _jsonl(path)
    labels = _labels(folder / "valid-labels.lst", len(rows), {"0", "1"})
    return [
        dict(zip(("goal", "sol1", "sol2"), _field(path, n, row, "goal", "sol1", "sol2")), label=int(label))
        for n, (row, label) in enumerate(zip(rows, labels), 1)
    ]


def _arc(filename: str):
    def convert(folder: Path) -> list[dict]:
        path = folder / filename
        docs = []
        for n, row in enumerate(_jsonl(path), 1):
            ident, question, key = _field(path, n, row, "id", "question", "answerKey")
            stem, choices = _field(path, n, question, "stem", "choices")
            labels = [_field(path, n, c, "label") for c in choices]
            if key not in labels:
                raise TaskDataError(f"{path}:{n}: answerKey {key!r} is not one of the choice labels {labels}")
            docs.append(
                {
                    "id": ident,
                    "question": stem,
                    "answerKey": key,
                    "choices": {"text": [c["text"] for c in choices], "label": labels},
                }
            )
        return docs

    return convert


def _winogrande(folder: Path) -> list[dict]:
    path = folder / "dev.jsonl"
    rows = _jsonl(path)
    labels = _labels(folder / "dev-labels.lst", len(rows), {"1", "2"})
    return [
        dict(
            zip(("sentence", "option1", "option2"), _field(path, n, row, "sentence", "option1", "option2")),
            answer=label,
        )
        for n, (row, label) in enumerate(zip(rows, labels), 1)
    ]


def _boolq(folder: Path) -> list[dict]:
    path = folder / "val.jsonl"
    docs = []
    for n, row in enumerate(_jsonl(path), 1):
        question, passage, idx, label = _field(path, n, row, "question", "passage", "idx", "label")
        if str(label).lower() not in ("true", "false"):
            raise TaskDataError(f"{path}:{n}: label {label!r} is not true/false")
        docs.append({"question": question, "passage": passage, "idx": idx, "label": int(str(label).lower() == "true")})
    return docs


# task -> (lm-eval's own config, data subfolder, split the task evaluates, converter)
LOCAL_TASKS = {
    "wikitext": ("wikitext/wikitext.yaml", "wikitext2_raw", "test", _wikitext),
    "lambada_openai": ("lambada/lambada_openai.yaml", "lambada_openai", "test", _lambada),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", "validation", _hellaswag),
    "piqa": ("piqa/piqa.yaml", "piqa", "validation", _piqa),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", "test", _arc("ARC-Easy-Test.jsonl")),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", "test", _arc("ARC-Challenge-Test.jsonl")),
    "winogrande": ("winogrande/default.yaml", "winogrande", "validation", _winogrande),
    "boolq": ("super_glue/boolq/default.yaml", "boolq", "validation", _boolq),
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``explicit`` (data_dir), else $SPDBENCH_DATA, else ../shared/data if present."""
    chosen = explicit or os.environ.get("SPDBENCH_DATA")
    if chosen:
        folder = Path(chosen).expanduser()
        if not folder.is_dir():
            source = "data_dir" if explicit else "SPDBENCH_DATA"
            raise TaskDataError(
                f"{source} {folder}: no such data folder; point it at the offline data "
                "or leave it unset to use the Hugging Face Hub"
            )
        return folder
    return _REPO_DATA if _REPO_DATA.is_dir() else None


def converted(task: str, folder: Path) -> Path:
    """The task's documents as JSON lines in the cache, converted once per source version."""
    _, sub, _, convert = LOCAL_TASKS[task]
    source = folder / sub
    if not source.is_dir():
        raise TaskDataError(f"{source}: missing data folder for task {task}")
    stamp = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in sorted(source.iterdir()))
    key = hashlib.sha256(f"{source.resolve()}|{stamp}".encode()).hexdigest()[:12]
    out = cache_dir() / "tasks" / f"{task}-{key}.jsonl"
    if out.exists():
        return out
    docs = convert(source)
    with atomic_output(out) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    return out


def _lm_eval_tasks() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _local_config(name: str, folder: Path) -> dict:
    """Overrides that point lm-eval's own task ``name`` at the converted local documents."""
    _, _, split, _ = LOCAL_TASKS[name]
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(converted(name, folder))}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }


def include_dir(folder: Path) -> Path:
    """A folder for lm-eval's ``--include_path``: one YAML per task, named as lm-eval's own, that includes
    lm-eval's config and reads the local documents (so ``--tasks piqa`` runs offline)."""
    import yaml

    configs = {
        name: {"include": str(_lm_eval_tasks() / LOCAL_TASKS[name][0]), "task": name, **_local_config(name, folder)}
        for name in LOCAL_TASKS
    }
    key = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "tasks" / f"lm-eval-{key}"
    if out.is_dir():
        return out
    with atomic_output(out, folder=True) as tmp:
        for name, config in configs.items():
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def task_configs(names: list[str], folder: Path | None):
    """lm-eval's own configs for ``names`` (re-pointed at local data when ``folder`` is set) and a TaskManager."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    if folder is None:  # the Hub: any lm-eval task
        manager = TaskManager()
        unknown = [n for n in names if not manager.match_tasks([n])]
        if unknown:
            raise TaskDataError(f"unknown task {unknown[0]!r} in tasks; see `lm-eval ls tasks`")
        return list(names), manager
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise TaskDataError(
            f"unknown task {unknown[0]!r} in tasks; with local data choose from: {', '.join(LOCAL_TASKS)}"
        )
    configs = [
        {**load_yaml(_lm_eval_tasks() / LOCAL_TASKS[name][0], resolve_func=True), **_local_config(name, folder)}
        for name in names
    ]
    return configs, TaskManager(include_defaults=False)  # no need to index lm-eval's thousands of tasks
