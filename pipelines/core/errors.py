"""Errors a user acts on, shared by every layer so that the one place jobs end through can recognise them."""


class PreconditionError(Exception):
    """A job cannot start: the message is one line a user can act on."""
