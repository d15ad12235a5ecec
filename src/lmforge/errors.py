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


def reason(e: BaseException, limit: int = 200) -> str:
    """An underlying exception's message fit to put inside a one-sentence LmforgeError: its first
    non-empty line, shortened (library messages such as pyarrow's often span several lines)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
