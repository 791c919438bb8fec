"""Named model shapes for ``random:<preset>`` (real architectures with random weights)."""

from transformers import LlamaConfig

_LLAMA2 = dict(
    vocab_size=32000,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
_LLAMA3 = dict(
    vocab_size=128256,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, rope_parameters=_LLAMA31_ROPE)  # 128K context
_LLAMA_70B = dict(
    hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672
)

PRESETS: dict[str, dict] = {
    "llama2-7b": dict(
        _LLAMA2,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
    ),
    "llama2-13b": dict(
        _LLAMA2,
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
    ),
    "llama2-70b": dict(_LLAMA2, **_LLAMA_70B),
    "llama3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
    ),
    "llama3-70b": dict(_LLAMA3, **_LLAMA_70B),
    "llama3.1-8b": dict(
        _LLAMA31,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
    ),
    # Llama-3.1-70B and Llama-3.3-70B: Llama-3-70B's shapes with 128K context and llama3 RoPE scaling
    # (their Hugging Face config.json files)
    "llama3.1-70b": dict(_LLAMA31, **_LLAMA_70B),
    "llama3.3-70b": dict(_LLAMA31, **_LLAMA_70B),
    "llama3.1-405b": dict(
        _LLAMA31,
        hidden_size=16384,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        intermediate_size=53248,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # Tiny test shapes: even heads; SmolLM2's 9/3 head ratio with an FFN no rank count divides;
    # a single KV head (replicated on every rank) with llama3 RoPE scaling.
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    ),
    "tiny-uneven": dict(
        vocab_size=256,
        hidden_size=144,
        head_dim=16,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=200,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-mqa": dict(
        vocab_size=256,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=1,
        intermediate_size=160,
        max_position_embeddings=512,
        rope_parameters=dict(_LLAMA31_ROPE, original_max_position_embeddings=64),
    ),
}


def preset_config(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return LlamaConfig(**PRESETS[name])
