"""The one error type for bad input: every message names the parameter and says what to do."""


class SpdbenchError(ValueError):
    """An impossible request (bad parameter, unusable file, unknown name): one line, shown as a usage error."""


class RankError(RuntimeError):
    """A rank failed while running (not bad input): the message names the rank and its error."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
