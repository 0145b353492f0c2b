"""Errors meant for the user: the CLI prints their message and exits non-zero, with no traceback."""


class MlxVideoError(Exception):
    """A problem with the user's input, files or machine, stated so that the user can fix it."""


class NonFiniteLatentsError(MlxVideoError):
    """The sampler produced NaN or infinity: the run is stopped instead of producing noise."""
