"""Model sources, real presets, exact Megatron sharding and the rank-local LLaMA math."""
