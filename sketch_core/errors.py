"""The one exception type for bad input: its message is a single line a user can act on."""


class SketchError(Exception):
    """Bad input (a config value, a data file, an image, a model name).

    Command-line entry points print ``error: <message>`` and exit with status 2 instead of a
    traceback, so the message must name the file, field or value and what was expected.
    """
