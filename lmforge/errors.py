"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class LmforgeError(Exception):
    """A user-facing error. The message names the file, field or flag and says what to do."""
