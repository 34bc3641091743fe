"""One exception type for problems a user can fix (bad config, bad input files)."""


class MopError(Exception):
    """A user-facing error: the message names the file, line or config key at fault.

    The command line prints it on one line and exits non-zero, without a traceback.
    """


class Preempted(MopError):
    """The job was asked to stop (SIGTERM); its checkpoint holds everything done so far,
    and the same command resumes from it."""
