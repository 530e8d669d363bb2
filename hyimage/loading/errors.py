"""The error every loader raises for a file that is missing, damaged, unsafe or does not fit the model."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, or does not fit the model."""
