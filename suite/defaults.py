"""Names and defaults shared by the command line and the library, importable without torch."""

EMBEDDED_MODEL = "smollm2-135m"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 300  # seconds a collective may wait before the run fails
BENCH_STORE = "bench.jsonl"  # OUT/bench.jsonl: the rows of `spdbench bench --out OUT`
