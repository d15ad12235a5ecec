"""Progress output: a live bar on a terminal, plain log lines elsewhere (CI, files, pipes)."""

from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """`with Progress("pretrain", total=steps) as p: p.update(step, loss=..., tok_s=...)`.

    On a TTY this is a rich progress bar (step, loss, tokens/s, ETA). Otherwise a plain line
    is printed every `every` updates and at the end, so CI logs stay readable.
    """

    def __init__(self, label: str, total: int, *, start: int = 0, every: int = 10, stream=None, enabled: bool = True):
        self.label, self.total, self.every = label, total, max(1, every)
        self.enabled = enabled  # False on non-zero ranks: one process reports for all
        self.stream = stream or sys.stdout
        self.start_step = start
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        self._t0 = time.time()
        self._last = start

    def __enter__(self) -> "Progress":
        if self.tty and self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.start_step, info="")
        return self

    def update(self, step: int, **fields: float | str) -> None:
        info = "  ".join(_fmt_field(k, v) for k, v in fields.items())
        self._last = step
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.time() - self._t0) / done * (self.total - step) if done > 0 else 0.0
            print(f"[{self.label}] step {step}/{self.total}  {info}  eta {_fmt_eta(eta)}", file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _fmt_field(k: str, v: float | str) -> str:
    if isinstance(v, float):
        if k in ("tok_s", "tokens_per_s", "ex_s"):
            return f"{k} {v:,.0f}"
        return f"{k} {v:.4g}"
    return f"{k} {v}"
