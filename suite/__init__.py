"""spdbench harness: model sources, sharding, the rank-local LLaMA, communicators, launching."""
