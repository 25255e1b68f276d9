"""Errors a user acts on, shared by every layer so that the one place jobs end through can recognise them."""


class PreconditionError(Exception):
    """A job cannot start: the message is one line a user can act on."""


class UsageError(ValueError):
    """The command's inputs cannot be used at all (a missing folder, a file of the wrong kind): exit status 2."""
