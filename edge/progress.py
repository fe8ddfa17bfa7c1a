"""A minimal progress bar on stderr for runtime commands (the runtime does not depend on tqdm)."""
from __future__ import annotations

import sys
import time


class Progress:
    """Progress(total, label).update(n) redraws ``label  done/total  rate/s`` at most 10 times a second."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.done, self.t0, self.last = 0, time.monotonic(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 0.1 or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.stream.write(f"\r{self.label}: {self.done}/{self.total} ({rate:.1f}/s)")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
