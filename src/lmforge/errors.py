"""The one exception type a user sees.

Anything the user can fix (a bad file, row, field or parameter) raises `LmforgeError` with one
sentence that names the culprit and says what to do. The CLI prints that sentence and exits
non-zero; it never shows a traceback for these. Anything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A user-fixable problem, described in one sentence."""


class StopRun(LmforgeError):
    """Training stopped on purpose before an unsafe update (non-finite loss or gradient)."""


class Preempted(LmforgeError):
    """SIGTERM arrived: a checkpoint was saved at the step boundary and the run stopped."""
