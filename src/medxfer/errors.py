"""Error types. The CLI prints ``str(error)`` on one line and exits with code 2."""


class MedxferError(Exception):
    """Base class for every error medxfer raises on purpose (bad input, not a bug)."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))


class ConfigError(MedxferError):
    """A config file is missing, unparsable, or has an unknown key / wrong value."""


class DataError(MedxferError):
    """A dataset file or layout is missing, unreadable or inconsistent."""


class CheckpointError(MedxferError):
    """A checkpoint file is missing, corrupt, untrusted or does not fit the model."""


class OutputError(MedxferError):
    """An output path cannot be written: an existing file where a folder belongs, or no write permission."""


class FolderInUse(MedxferError):
    """Another process holds the lock of an output folder (``medxfer.io.folder_lock``)."""


class TrainingDiverged(MedxferError):
    """The loss or the weights became NaN or infinite: the run is stopped and recorded as failed."""


class DiskFull(MedxferError):
    """No space left on the device (or quota exceeded) while a sweep writes: it stops, finished runs kept."""
