"""The one exception type that the CLI turns into a clean, single-line failure."""


class SamReuseError(Exception):
    """A problem with the user's input or environment, not a bug.

    The message must name the file (or option) at fault and say what is wrong
    with it, because the CLI prints it as the only line of output and exits 2.
    """
