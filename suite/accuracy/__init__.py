"""Accuracy through lm-eval on the tensor-parallel model, with local task data."""
