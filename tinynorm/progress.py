"""Progress of an epoch: a tqdm bar on a terminal, plain lines elsewhere.

On a terminal the bar redraws in place.  Where the output is not a terminal
(CI, ``nohup``, a log file, a pipe) a redrawn bar would write one line per
update into the file (the smoke run wrote ~400 per variant), so there a plain
line is printed at most every ``every_s`` seconds, as tqdm users expect from
``disable=None`` plus a periodic status line; the trainer's one line per epoch
is printed either way.
"""
from __future__ import annotations

import sys
import time

__all__ = ["EpochProgress"]


class EpochProgress:
    """``update(status)`` after every batch; ``close()`` at the end of the epoch.

    ``stream`` (default ``sys.stderr``, tqdm's) decides the mode: a bar when it
    is a terminal, else a line ``desc  batch b/n  status`` every ``every_s``."""

    def __init__(self, total, initial=0, desc="", every_s=60.0, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
        self._bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="it", leave=False,
                             dynamic_ncols=True, file=self.stream)
        self._last = time.monotonic()

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, status: str) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"{self.desc}  batch {self.n}/{self.total}  {status}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
