"""The helper's logging: never on the event loop's path to a slow stderr.

A service's stderr may be a pipe nobody reads (a supervisor that only keeps
the last lines, a benchmark, ``vantage helper serve 2>&1 | less`` left in the
background): writing to it from the event loop blocks the loop once the pipe
is full (64 KiB, ~650 request lines), and the helper stops answering.
So every record goes through a bounded queue to a thread that writes it
(``configure``); when that thread cannot keep up, records are dropped and
counted (``LogPipe.dropped``, in the periodic summary), never waited for.

What is logged: the start line, one summary line per ``SUMMARY_SECONDS``
in which requests were served (``RequestStats``), warnings and errors; one
line per control request only with ``--access-log`` (``access_log = true``)
or ``-v``. No line names a client address or a URL.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from collections import Counter
from typing import IO

SUMMARY_SECONDS = 60.0
QUEUE_RECORDS = 10_000  # records waiting for the writer thread at most (a few MB)
_MAX_DURATIONS = 10_000  # durations kept per summary interval for its percentiles
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """QueueHandler whose put never waits: a full queue drops the record."""

    def __init__(self, records: queue.Queue):
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    """QueueListener whose stop gives up after ``timeout`` (its thread may be
    stuck writing to a pipe nobody reads; it is a daemon thread)."""

    def stop(self, timeout: float = 2.0) -> None:  # type: ignore[override]
        if self._thread is None:
            return
        try:
            self.queue.put(self._sentinel, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None


class LogPipe:
    """The queue between the loggers and the writer thread (see ``configure``)."""

    def __init__(self, stream: IO[str] | None = None, capacity: int = QUEUE_RECORDS, level: int = logging.WARNING):
        self.records: queue.Queue = queue.Queue(maxsize=capacity)
        self.handler = _DroppingQueueHandler(self.records)
        self.output = logging.StreamHandler(stream if stream is not None else sys.stderr)
        self.output.setFormatter(logging.Formatter(FORMAT))
        self.listener = _Listener(self.records, self.output, respect_handler_level=False)
        self.level = level
        self._saved: tuple[list[logging.Handler], int] | None = None

    @property
    def dropped(self) -> int:
        return self.handler.dropped

    def start(self) -> "LogPipe":
        """Route the root logger (every logger of the process) through the queue."""
        root = logging.getLogger()
        self._saved = (list(root.handlers), root.level)
        for handler in self._saved[0]:
            root.removeHandler(handler)
        root.addHandler(self.handler)
        root.setLevel(self.level)
        self.listener.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout``) and restore the
        root logger's handlers."""
        self.listener.stop(timeout)
        root = logging.getLogger()
        root.removeHandler(self.handler)
        if self._saved is not None:
            for handler in self._saved[0]:
                root.addHandler(handler)
            root.setLevel(self._saved[1])
            self._saved = None


_pipe: LogPipe | None = None


def configure(verbose: bool = False, stream: IO[str] | None = None, capacity: int = QUEUE_RECORDS) -> LogPipe:
    """Log through a LogPipe to ``stream`` (stderr): INFO and up with
    ``verbose``, else WARNING and up plus the helper's own INFO lines (start,
    summaries, the access log when on). Returns the started pipe; ``stop`` it."""
    global _pipe
    pipe = LogPipe(stream, capacity, logging.INFO if verbose else logging.WARNING).start()
    logging.getLogger("vantage.helper").setLevel(logging.INFO)
    _pipe = pipe
    return pipe


def dropped() -> int:
    """Log records dropped so far by the pipe ``configure`` started (0 without one)."""
    return _pipe.dropped if _pipe is not None else 0


class RequestStats:
    """What the periodic summary says about the control requests since the
    last one: how many, their statuses, their durations."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """A new interval."""
        self.statuses: Counter[int] = Counter()
        self.durations: list[float] = []
        self.longest = 0.0

    def add(self, status: int, seconds: float) -> None:
        self.statuses[status] += 1
        if len(self.durations) < _MAX_DURATIONS:
            self.durations.append(seconds)
        self.longest = max(self.longest, seconds)

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    def summary(self, interval: float, in_flight: int, shed: int, dropped: int) -> str | None:
        """One line about the interval (None when nothing was asked), then start
        a new interval."""
        count = self.count
        if not count:
            return None
        ordered = sorted(self.durations)
        median = ordered[len(ordered) // 2]
        p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        line = (f"control requests in the last {interval:.0f} s: {count} ({statuses}); duration median "
                f"{median:.3f}s p90 {p90:.3f}s max {self.longest:.3f}s; in_flight={in_flight} shed_total={shed} "
                f"log_lines_dropped={dropped}")
        self._reset()
        return line
