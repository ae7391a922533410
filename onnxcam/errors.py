"""The one exception type that the CLI turns into a one-line message."""


class OnnxcamError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
