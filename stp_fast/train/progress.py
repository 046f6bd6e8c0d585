"""Progress reporting: a tqdm bar (epoch, step, loss, images/s) on a terminal, plain log lines
otherwise (CI logs, pipes), silent on DDP ranks other than 0."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One epoch's progress.  ``mode``: ``"auto"`` (bar when ``stream`` is a TTY), ``"bar"``,
    ``"log"`` (a line every ``log_every`` steps and at the end) or ``"off"``."""

    def __init__(self, epoch: int, epochs: int, steps: int, *, mode: str = "auto", stream: TextIO | None = None,
                 log_every: int = 50, desc: str = "train") -> None:  # fmt: skip
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.epoch, self.epochs, self.steps, self.log_every = mode, epoch, epochs, steps, log_every
        self.desc, self.step, self.images, self.start = desc, 0, 0, time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=f"{desc} epoch {epoch + 1}/{epochs}", file=self.stream, leave=True,
                            dynamic_ncols=True)  # fmt: skip

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def update(self, images: int, **metrics: float) -> None:
        self.step += 1
        self.images += images
        shown = {k: f"{v:.4g}" for k, v in metrics.items()} | {"img/s": f"{self.images_per_s:.0f}"}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.mode == "log" and (self.step % self.log_every == 0 or self.step == self.steps):
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"[{self.desc}] epoch {self.epoch + 1}/{self.epochs} step {self.step}/{self.steps} {fields}",
                  file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log(message: str, *, mode: str = "auto", stream: TextIO | None = None) -> None:
    """A one-line message (suppressed when progress is ``"off"``)."""
    if mode != "off":
        print(message, file=stream or sys.stderr, flush=True)
