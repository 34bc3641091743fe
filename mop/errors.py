"""One exception type for problems a user can fix (bad config, bad input files)."""


class MopError(Exception):
    """A user-facing error: the message names the file, line or config key at fault.

    The command line prints it on one line and exits non-zero, without a traceback.
    """
