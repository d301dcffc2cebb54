"""The one base class of errors that mean bad input or an impossible setting."""


class SpeechLLMError(Exception):
    """Bad input (a file, a record, a setting, a checkpoint) rather than a bug: a command prints
    the message, which names the file or key and the cause, and exits with status 2."""
