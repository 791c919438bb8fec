"""GenZ-LLM, the analytical peer, on the cells of a published table, at its defaults: writes its decode
latency per cell next to the table, for ``spdbench validate-simulation`` to compare.

Runs where ``genz-llm`` is installed (it needs neither torch nor this project):

    python -m venv genz-env && genz-env/bin/pip install genz-llm pyyaml
    genz-env/bin/python suite/latency/peers/genz_gpt_fast.py

GenZ cannot express SPD, ladder residual or token splitting; here it models gpt-fast's plain tensor
parallelism: ``decode_moddeling(model, batch_size=1, input_tokens=5, output_tokens=200, Bb=1,
system_name="A100_80GB_GPU", bits="bf16", tensor_parallel=N)``, every other argument at its default.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TABLE = HERE.parent / "published" / "gpt-fast-tp.yaml"
OUT = HERE / "genz-gpt-fast-tp.yaml"
GENZ_MODELS = {
    "Llama-2-7B": "llama2_7b",
    "Llama-2-70B": "llama2_70b",
    "Llama-3.1-8B": "meta-llama/meta-llama-3.1-8b",
    "Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
}  # the table's model -> GenZ's name


def main() -> None:
    from GenZ import decode_moddeling

    warnings.filterwarnings("ignore")
    table = yaml.safe_load(TABLE.read_text())
    setting = table["simulation"]
    cells = []
    for cell in table["cells"]:
        if "tokens_per_s" not in cell:
            continue
        out = decode_moddeling(
            model=GENZ_MODELS[cell["model"]],
            batch_size=setting["batch"],
            input_tokens=setting["prompt_len"],
            output_tokens=setting["new_tokens"],
            Bb=1,
            system_name="A100_80GB_GPU",
            bits="bf16",
            tensor_parallel=cell["tp"],
        )
        cells.append(
            {
                "model": cell["model"],
                "tp": cell["tp"],
                "decode_ms": round(float(out["Latency"]), 4),
                "tokens_per_s": round(float(out["Throughput"]), 2),
            }
        )
    OUT.write_text(
        yaml.safe_dump(
            {
                "tool": f"genz-llm {version('genz-llm')}",
                "table": table["name"],
                "command": "python suite/latency/peers/genz_gpt_fast.py (with genz-llm installed)",
                "call": "GenZ.decode_moddeling(model, batch_size=1, input_tokens=5, output_tokens=200, Bb=1, "
                "system_name='A100_80GB_GPU', bits='bf16', tensor_parallel=N); defaults otherwise",
                "cells": cells,
            },
            sort_keys=False,
            width=110,
        )
    )
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
