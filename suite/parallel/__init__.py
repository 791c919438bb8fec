"""Running the rank model over N ranks: communicators, strategies, launching, the runner."""
