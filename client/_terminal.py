"""Terminal pieces of the CLI: the waiting spinner, the stop summary, and Ctrl-C handling."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any, TextIO

from ._types import StopReason, Summary

# Hand-rolled rather than rich: the CLI ships with the client, whose only dependencies are grpcio and
# protobuf (rich is an optional extra), and a spinner that owns one line of stderr is a few lines.
_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_CLEAR_LINE = "\r\x1b[K"


class Spinner:
    """A spinner on one line of a terminal until `stop()`, which erases it. Does nothing when the
    stream is not a terminal (piped or redirected output stays clean)."""

    def __init__(
        self, stream: TextIO, label: str = "waiting for the first token", interval: float = 0.08
    ) -> None:
        self._stream = stream
        self._label = label
        self._interval = interval
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Spinner:
        if self._stream.isatty() and self._thread is None:
            self._draw(0)  # at once, from this thread: the first token may beat a new thread's first frame
            self._thread = threading.Thread(target=self._spin, name="tokenwire-spinner", daemon=True)
            self._thread.start()
        return self

    def _draw(self, frame: int) -> None:
        self._stream.write(f"\r{_FRAMES[frame % len(_FRAMES)]} {self._label}")
        self._stream.flush()

    def _spin(self) -> None:
        frame = 1
        while not self._stopped.wait(self._interval):
            self._draw(frame)
            frame += 1

    def stop(self) -> None:
        """Stop and erase the spinner (idempotent): call before writing anything else to the terminal."""
        if self._thread is None or self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join()
        self._stream.write(_CLEAR_LINE)
        self._stream.flush()


def summary_line(summary: Summary, *, seed: int | None = None) -> str:
    """One line on how a generation ended: reason, tokens, prompt (and cache), first token, speed, and
    the `seed` of a sampled generation (to replay it)."""
    reason = str(summary.reason)
    if summary.reason == StopReason.STOP_SEQUENCE and summary.stop_sequence:
        reason += f" {summary.stop_sequence!r}"
    timings, usage = summary.timings, summary.usage
    cached = f", {usage.cached_prompt_tokens} cached" if usage.cached_prompt_tokens else ""
    parts = [
        f"{_count(usage.completion_tokens, 'token')} ({_count(summary.sent_text_chars, 'character')} sent)",
        f"prompt {_count(usage.prompt_tokens, 'token')}{cached}",
        f"first token after {timings.time_to_first_token_ms:.0f} ms",
        f"{timings.decode_tokens_per_second:.1f} tokens/s",
        f"{timings.total_ms / 1000:.2f} s in all",
    ]
    if seed is not None:
        parts.append(f"seed {seed}")
    return f"[{reason}: " + ", ".join(parts) + "]"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _quit_now(signum: int, frame: FrameType | None) -> None:
    # Only async-signal-safe work here: the main thread may be anywhere, even inside a lock.
    os.write(2, b"\n")
    os._exit(128 + signum)


class CtrlC:
    """Within the block, the first Ctrl-C arrives as KeyboardInterrupt (the caller interrupts the
    generation and keeps reading its end); after `pressed()`, the next Ctrl-C quits at once."""

    def __init__(self) -> None:
        self.was_pressed = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        self._previous = signal.getsignal(signal.SIGINT)
        return self

    def pressed(self) -> None:
        self.was_pressed = True
        signal.signal(signal.SIGINT, _quit_now)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.signal(signal.SIGINT, self._previous)
