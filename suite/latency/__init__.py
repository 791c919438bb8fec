"""Latency: the matrix of measured, projected and simulated cells, profiles, telemetry."""
