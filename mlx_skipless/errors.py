"""The one error type for bad input: files, paths, options.

Raised by every module that reads or writes model files and by the commands
themselves, so it lives apart from all of them and importing it pulls in nothing.
"""


class CheckpointError(ValueError):
    """Bad input: the message says what is wrong and what to do."""
