"""Errors the user can act on.

Every engine function that rejects input raises one of these with a message that says what was wrong and how to
fix it; the CLI prints it as one ``error:`` line and exits with status 2 (no traceback).
"""


class AttentionUNetError(Exception):
    """Base class of every error meant for the user (exit status 2 in the CLI)."""


class InputImageError(AttentionUNetError):
    """An input image is missing, unreadable or unsuitable (2D/4D/RGB, NaN/Inf, empty, constant)."""


class ModelBundleError(AttentionUNetError):
    """A model bundle is missing, corrupt, tampered with or incompatible with this engine. ``problem`` is what is
    wrong without the advice on fixing the bundle (for callers that give their own advice)."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


class OutputExistsError(AttentionUNetError):
    """An output file exists and overwriting was not asked for (``--force``)."""


class DatasetError(AttentionUNetError):
    """A training or evaluation dataset is malformed (named case, what is wrong, how to fix it)."""


class CancelledError(AttentionUNetError):
    """The run was cancelled by the caller; nothing was written."""


class InputsFailedError(AttentionUNetError):
    """Some inputs of a run over several failed while the others were segmented: ``failed`` maps each failed
    input's stem to its error, ``written`` the others to their outputs, ``summary`` is the ``summary.csv``."""

    def __init__(self, message: str, failed, written, summary) -> None:
        super().__init__(message)
        self.failed, self.written, self.summary = failed, written, summary
