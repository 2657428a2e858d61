"""The one base class of PSM-Pose's own errors: a bad config, data file, checkpoint, tracking
store, ... The `psm` CLI prints a PsmError as one line (`psm: error: ...`, exit code 2); any
other exception is a bug and keeps its traceback."""


class PsmError(Exception):
    """An error the user can act on: the message names the file and field."""
