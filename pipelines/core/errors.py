"""Errors a user acts on, shared by every layer so that the one place jobs end through can recognise them."""


class PreconditionError(Exception):
    """A job cannot start: the message is one line a user can act on."""


class UsageError(ValueError):
    """The command's inputs cannot be used at all (a missing folder, a file of the wrong kind): exit status 2."""


class JobFailed(Exception):
    """The job ran but its result is a failure (nothing scored, pages missing under --strict): the message is the
    one line to print, `summary` what was written; `run_job` prints the line and not the summary."""

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}


class JobStopped(Exception):
    """The job stopped cleanly before its end (a preempted trainer saved its state): one line, not an error, and
    the exit status it carries."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
