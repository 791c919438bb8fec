"""Comparison strategies: all-reduce (Megatron), ladder residual, token splitting, no-communication."""
