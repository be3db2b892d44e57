"""The one exception type the library raises for bad input.

Its message is a single line that names what is wrong and where; the CLI prints it as is and
exits non-zero.
"""


class ProbekitError(Exception):
    """Bad input or an unusable cache: the message names what is wrong and where."""
