"""What a person sees in the terminal: quiet Ray, one progress bar per stage, each warning once.

By default Ray's own log lines are off: the driver's "ray" loggers show errors only, worker and actor output
stays in the session's log files (/tmp/ray/session_*/logs) instead of being streamed to the terminal, and
Ray Data prints neither progress bars nor execution plans. `set_verbose(True)` (`ssm --verbose ...`) brings
all of it back. The setting travels in SSM_VERBOSE, so processes started from this one follow it.

`Progress` is the stage's bar: tqdm on a terminal, a few plain lines elsewhere (CI logs, files).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TextIO

VERBOSE_ENV = "SSM_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Show Ray's own logging (on) or keep it off (the default), and print each warning once either way."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if not sys.warnoptions:  # python -W ... decides for itself
        warnings.filterwarnings("once")  # one line per distinct warning, wherever it is raised from
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)  # as Python's own defaults
    if not on:
        # Ray warning about its own internals (deprecated options it sets itself...): nothing a user can act on.
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    _install_once_filter(logging.getLogger())


def ray_init_kwargs() -> dict:
    """The logging arguments of every ray.init of the project (jobs/cluster.py)."""
    if verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def quiet_ray_data() -> None:
    """Ray Data on the driver: no progress bars, no execution plans, its console handler at errors (its log
    file under the session folder keeps everything). Call after Ray has started, before running datasets."""
    if verbose():
        return
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    # Importing Ray put its own filter for RayDeprecationWarning in front of set_verbose's: put ours back ahead.
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.ERROR)
    _install_once_filter(logging.getLogger("ray.data"))


class _Once(logging.Filter):
    """Drops a log record whose text was already shown."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _install_once_filter(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, _Once) for f in handler.filters):
            handler.addFilter(_Once())


class Progress:
    """One stage's progress on stderr: a redrawn tqdm bar on a terminal; elsewhere a plain line at the start,
    at about every tenth of the work (every `every_s` seconds when the total is unknown) and at the end.

    >>> bar = Progress("score", total=480, unit="images")
    >>> bar.update(32, errors=1)
    >>> bar.close()
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", *, stream: TextIO | None = None,
                 enabled: bool = True, lines: int = 10, every_s: float = 30.0):
        from tqdm.auto import tqdm

        self.stream = stream or sys.stderr
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.n, self.postfix = 0, {}
        self.lines, self.every_s = max(1, lines), every_s
        self.start = self.last_line = time.monotonic()
        self.next_step = 1  # the next tenth (of `lines`) that prints a plain line
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True,
                        leave=True) if self.tty else None
        self.closed = False
        if enabled and not self.tty:
            self._line()

    def update(self, n: int = 0, **postfix) -> None:
        """`n` more done."""
        self.set(self.n + n, **postfix)

    def set(self, n: int, **postfix) -> None:
        """`n` done so far (e.g. the epoch just finished, or the exact count at the end of a stage)."""
        if not self.enabled:
            return
        self.n = n
        self.postfix.update({k: v for k, v in postfix.items() if v is not None})
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            self.bar.update(n - self.bar.n)
            return
        if self.total:
            step = int(self.n * self.lines / self.total)
            if step >= self.next_step and self.n < self.total:
                self.next_step = step + 1
                self._line()
        elif time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def close(self) -> None:
        if self.closed or not self.enabled:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        from tqdm import tqdm

        self.last_line = time.monotonic()
        elapsed = self.last_line - self.start
        total = self.total if self.total else None
        text = tqdm.format_meter(self.n, total, elapsed, unit=f" {self.unit}", prefix=self.desc,
                                 postfix=", ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items()) or None,
                                 bar_format="{desc}: {n_fmt}" + ("/{total_fmt}" if total else "") +
                                 "{unit} [{elapsed}" + ("" if final or not total else "<{remaining}") +
                                 ", {rate_fmt}{postfix}]")
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None and self.bar is None and self.enabled:  # the stage failed: its error says the rest
            self.closed = True
            return
        self.close()


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Tally:
    """A Ray actor counting what the scoring actors have done, for the driver's progress bar:
    `ray.remote(num_cpus=0)(Tally).remote()`; actors call add.remote(scored, errors), the driver read.remote()."""

    def __init__(self):
        self.scored = self.errors = 0

    def add(self, scored: int, errors: int) -> None:
        self.scored += scored
        self.errors += errors

    def read(self) -> tuple[int, int]:
        return self.scored, self.errors
