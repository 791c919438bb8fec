"""spdbench's harness, one folder per step of the data path (imports point down it):

model/     model sources, presets, exact Megatron sharding, the rank-local LLaMA math
parallel/  communicators, strategies (the plug-in point), launching N ranks, the runner
latency/   the latency matrix: measured, projected and simulated cells, profiles, telemetry
accuracy/  lm-eval through the tensor-parallel model, on local task data
results.py the row schema and the results store (torch-free: reports read it)
cli/       the ``spdbench`` command line (commands register through entry points)
"""
