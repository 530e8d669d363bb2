"""Every error type the package raises on purpose, in one place (the bottom layer: imports nothing of hyimage).

Each names what the user got wrong and the way out. They subclass the built-in exception a caller would
catch anyway (`ValueError` for a bad argument or file, `FileNotFoundError` for a missing one, `RuntimeError` for
a failed run), so code written against the built-ins keeps working.
"""


class RequestError(ValueError):
    """An argument a user passed is wrong; `argument` names it (as the user wrote it)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


class RequestTypeError(RequestError, TypeError):
    """An argument has the wrong type."""


class CacheOptionError(RequestError):
    """A step cache's kind or option is wrong; `argument` is "cache" or the option's name."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, or does not fit the model."""


class NonFiniteWeightError(CheckpointError):
    """A checkpoint holds NaN or infinite weights."""


class UnsafeCheckpointError(CheckpointError):
    """A torch file whose pickle would run code (call something other than tensor rebuilders) when loaded."""


class MissingCheckpointError(FileNotFoundError):
    """A file of the official layout that the chosen configuration needs is not there."""


class DownloadError(RuntimeError):
    """A file could not be fetched or did not arrive intact."""


class HubUnreachableError(DownloadError):
    """The Hub (or the mirror in HF_ENDPOINT) did not answer."""


class OfflineError(DownloadError):
    """Something is missing and HF_HUB_OFFLINE forbids asking the Hub."""


class UnsafeListingError(DownloadError):
    """A listing that is not what the Hub returns, or a name whose destination would leave the model root."""


class ParallelError(ValueError):
    """A parallel configuration that this model, launch or PyTorch build cannot run (raised before loading)."""


class NonFiniteError(RuntimeError):
    """A stage produced NaN or Inf values; `stage` names it."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
