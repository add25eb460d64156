"""Live progress of a site's work: stage transitions, done/total, elapsed time and ETA.

A :class:`Reporter` belongs to one site and one piece of work (a GAN round, the PLAN
pipeline, the evaluation). The code that does the work opens stages
(``with rep.stage("inversion"):``); the long loops inside (``plan_shared`` classifier
training, inversion, navigation, GAN steps) iterate through :func:`bar`, which feeds
the *active* reporter (see :func:`active`) and, where asked, draws a tqdm bar.

The reporter turns this into **events** (plain dicts, see :func:`format_line` for the
one-line form ``[site-1] navigation 12/24 steps  41 s elapsed, ETA 38 s``) handed to
its sinks:

* on every stage start and end;
* within a stage at most every ``interval_s`` (default 15 s) when work advanced;
* from a heartbeat thread when nothing was emitted for ``interval_s`` (a step that
  takes longer than the interval, or a stage without a loop), so a terminal never
  stays silent for more than ~``interval_s`` while work is in progress.

Sinks (any ``callable(event)``): :class:`LogSink` (the site's own log / terminal),
:class:`JsonlSink` (one JSON line per event, a file the simulation's terminal
tails with :class:`ProgressTail`), and the site's pool channel
(``client/progress_rpc.py``) in deployment. A sink that raises is dropped with one
warning; progress never fails the work it reports on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

LOG = logging.getLogger("plan.progress")

Event = dict[str, Any]
Sink = Callable[[Event], None]

INTERVAL_S = 15.0  # the longest a stage with work in progress stays without a line
EVENTS = ("start", "progress", "end", "log")

_active: Reporter | None = None
_active_lock = threading.Lock()


def _secs(s: float) -> str:
    s = max(0.0, float(s))
    if s < 100:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def is_line(ev: Event) -> bool:
    """Whether an event is shown as a line: one per stage transition (a start line names the
    stage before and its time), progress, logs; an end line only for the last stage or a failure."""
    if ev.get("event") != "end":
        return True
    return bool(ev.get("failed")) or not ev.get("n_stages") or ev.get("index") == ev.get("n_stages")


def format_line(ev: Event) -> str:
    """The human line of one event (the same on the site, in the demo and at the coordinator)."""
    head = f"[{ev.get('site') or '?'}] {ev.get('stage', '?')}"
    idx, n = ev.get("index"), ev.get("n_stages")
    pos = f" (stage {idx}/{n})" if idx and n and n > 1 else ""
    kind = ev.get("event")
    if kind == "log":
        return f"[{ev.get('site') or '?'}] {ev.get('level', 'WARNING')}: {ev.get('message', '')}"
    if kind == "start":
        prev = f"; {ev['prev']} took {_secs(ev.get('prev_s', 0))}" if ev.get("prev") else ""
        return f"{head} started{pos}{prev}"
    if kind == "end":
        return f"{head} {'FAILED after' if ev.get('failed') else 'done in'} {_secs(ev.get('elapsed_s', 0))}{pos}"
    task = ev.get("task")
    if task and task != ev.get("stage"):
        head += f": {task}"
    done, total, unit = ev.get("done"), ev.get("total"), ev.get("unit") or ""
    count = ""
    if total:
        count = f" {done}/{total} {unit}".rstrip()
    elif done:
        count = f" {done} {unit}".rstrip()
    eta = ev.get("eta_s")
    tail = f"  {_secs(ev.get('elapsed_s', 0))} elapsed" + (f", ETA {_secs(eta)}" if eta is not None else "")
    return head + count + tail


class Reporter:
    """Progress of one site's work, fanned out to ``sinks``; thread-safe, heartbeat included.

    ``stages``: the stage names in order (``index``/``n_stages`` in the events); a stage
    not in the list is appended. ``show_bars`` draws tqdm bars for :func:`bar` loops
    (a terminal or the SuperNode's own log), independently of the sinks.
    """

    def __init__(self, site: str, sinks: Sequence[Sink] = (), stages: Sequence[str] = (),
                 interval_s: float = INTERVAL_S, show_bars: bool = False, heartbeat: bool = True):
        if interval_s <= 0:
            raise ValueError(f"progress interval_s must be > 0, got {interval_s}")
        self.site = site
        self.sinks = list(sinks)
        self.stages = list(stages)
        self.interval_s = float(interval_s)
        self.show_bars = show_bars
        self._lock = threading.RLock()
        self._stage: str | None = None
        self._t_stage = 0.0
        self._last_emit = 0.0
        self._task: str | None = None
        self._done = 0
        self._total: int | None = None
        self._unit = ""
        self._t_task = 0.0
        self._done_at_emit = -1
        self._prev: tuple[str, float] | None = None  # the stage before and its seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = heartbeat

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, now: float) -> Event:
        ev: Event = {"site": self.site, "stage": self._stage, "event": kind, "t": round(time.time(), 3),
                     "elapsed_s": round(now - self._t_stage, 2)}
        if self._stage in self.stages:
            ev["index"], ev["n_stages"] = self.stages.index(self._stage) + 1, len(self.stages)
        if kind == "progress":
            ev.update(task=self._task, done=self._done, total=self._total, unit=self._unit)
            if self._total and self._done:
                rate = self._done / max(now - self._t_task, 1e-9)
                ev["eta_s"] = round((self._total - self._done) / rate, 1)
        return ev

    def _emit(self, ev: Event) -> None:
        self._last_emit = time.monotonic()
        for sink in list(self.sinks):
            try:
                sink(ev)
            except Exception as err:  # noqa: BLE001 - progress must never fail the work
                self.sinks.remove(sink)
                LOG.warning("%s: progress sink %s failed (%s); dropped", self.site, type(sink).__name__, err)

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self, name: str) -> Iterator[Reporter]:
        """A stage of the work: a start event, progress inside, an end event (also on error)."""
        with self._lock:
            if name not in self.stages:
                self.stages.append(name)
            self._stage, self._task, self._done, self._total, self._unit = name, None, 0, None, ""
            self._t_stage = self._t_task = time.monotonic()
            self._done_at_emit = -1
            ev = self._event("start", self._t_stage)
            if self._prev is not None:
                ev["prev"], ev["prev_s"] = self._prev[0], round(self._prev[1], 2)
            self._emit(ev)
        self._ensure_heartbeat()
        ok = False
        try:
            yield self
            ok = True
        finally:
            with self._lock:
                ev = self._event("end", time.monotonic())
                if not ok:
                    ev["failed"] = True
                self._emit(ev)
                self._prev = (name, ev["elapsed_s"])
                self._stage = None

    def task(self, desc: str | None, total: int | None, unit: str = "") -> None:
        """A counted piece of work inside the current stage (resets done/total)."""
        with self._lock:
            self._task, self._done, self._total, self._unit = desc, 0, total, unit
            self._t_task = time.monotonic()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._done += n
            if self._stage is None:
                return
            now = time.monotonic()
            if now - self._last_emit >= self.interval_s:
                self._done_at_emit = self._done
                self._emit(self._event("progress", now))

    def touch(self) -> None:
        """Something else was just shown: the heartbeat waits another interval."""
        self._last_emit = time.monotonic()

    def log(self, level: str, message: str) -> None:
        """A warning or error of the site's work as an event (where the site's own log is not seen)."""
        with self._lock:
            self._emit({"site": self.site, "stage": self._stage, "event": "log", "t": round(time.time(), 3),
                        "level": level, "message": message})

    @contextmanager
    def forward_logs(self, logger: str = "plan", level: int = logging.WARNING) -> Iterator[Reporter]:
        """Send ``logger``'s records of ``level`` and above through the sinks for the block."""
        handler = _ForwardHandler(self, level)
        lg = logging.getLogger(logger)
        lg.addHandler(handler)
        try:
            yield self
        finally:
            lg.removeHandler(handler)

    # ------------------------------------------------------------------ heartbeat
    def _ensure_heartbeat(self) -> None:
        if not self._heartbeat or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"progress-{self.site}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s / 4)):
            with self._lock:
                now = time.monotonic()
                if self._stage is not None and now - self._last_emit >= self.interval_s:
                    self._emit(self._event("progress", now))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ForwardHandler(logging.Handler):
    def __init__(self, rep: Reporter, level: int):
        super().__init__(level)
        self.rep = rep

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(LOG.name):  # the reporter's own warnings: no loop
            return
        try:
            self.rep.log(record.levelname, record.getMessage())
        except Exception:  # noqa: BLE001
            self.handleError(record)


# ---------------------------------------------------------------------- the active reporter
def current() -> Reporter | None:
    return _active


@contextmanager
def active(rep: Reporter | None) -> Iterator[Reporter | None]:
    """Make ``rep`` the reporter that :func:`bar` loops feed (process-wide) for the block."""
    global _active
    with _active_lock:
        prev, _active = _active, rep
    try:
        yield rep
    finally:
        with _active_lock:
            _active = prev


class bar:  # noqa: N801 - used like tqdm
    """A loop's progress: feeds the active reporter; a tqdm bar when ``show`` (or the reporter's show_bars).

    ``for x in bar(range(n), desc="phi_id", unit="epochs")`` or ``b = bar(total=n); b.update(k); b.close()``.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", show: bool = False, **tqdm_kw: Any):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc = iterable, total, desc
        self.rep = current()
        draw = show or (self.rep is not None and self.rep.show_bars)
        if draw and not sys.stderr.isatty():
            tqdm_kw.setdefault("mininterval", INTERVAL_S)  # a log file: a redraw every 15 s, not every second
        tqdm_kw.setdefault("mininterval", 1.0)
        self._tq = tqdm(total=total, desc=desc, unit=unit, disable=not draw, dynamic_ncols=True, **tqdm_kw)
        if self.rep is not None:
            self.rep.task(desc, total, unit)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this bar was made without an iterable: call update() instead")
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self._tq.update(n)
        if self.rep is not None:
            self.rep.update(n)

    def set_postfix(self, *a: Any, **kw: Any) -> None:
        self._tq.set_postfix(*a, **kw)

    def close(self) -> None:
        self._tq.close()


# ---------------------------------------------------------------------- sinks
class LogSink:
    """Each event as one log line (``plan.progress`` logger, INFO)."""

    def __init__(self, logger: logging.Logger = LOG):
        self.logger = logger

    def __call__(self, ev: Event) -> None:
        if is_line(ev):
            self.logger.info("%s", format_line(ev))


class JsonlSink:
    """Each event appended as one JSON line to ``path`` (one write per line, flushed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, ev: Event) -> None:
        line = (json.dumps(ev, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_event(line: str, source: str = "progress log") -> Event | None:
    """One event from a JSON line; None for a blank or torn line (a writer mid-line)."""
    line = line.strip()
    if not line:
        return None
    try:
        ev = json.loads(line)
    except ValueError:
        LOG.warning("%s: skipping an unreadable progress line %r", source, line[:80])
        return None
    if not isinstance(ev, dict) or ev.get("event") not in EVENTS:
        LOG.warning("%s: skipping a line that is not a progress event: %r", source, line[:80])
        return None
    return ev


class ProgressTail:
    """New events from JSONL progress files (a glob pattern or fixed paths), as they are appended.

    Remembers a byte offset per file and keeps an incomplete last line for the next poll.
    ``from_end=True`` skips what the files already hold (a resumed coordinator).
    """

    def __init__(self, root: str | Path, pattern: str = "*.jsonl", from_end: bool = False):
        self.root, self.pattern = Path(root), pattern
        self._off: dict[Path, int] = {}
        self._from_end = from_end
        if from_end:
            for p in self._files():
                self._off[p] = p.stat().st_size

    def _files(self) -> list[Path]:
        return sorted(self.root.glob(self.pattern)) if self.root.is_dir() else []

    def poll(self) -> list[Event]:
        out: list[Event] = []
        for p in self._files():
            off = self._off.get(p, 0)
            try:
                size = p.stat().st_size
                if size < off:  # truncated / replaced: start again
                    off = 0
                if size == off:
                    continue
                with open(p, "rb") as fh:
                    fh.seek(off)
                    data = fh.read(size - off)
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            self._off[p] = off + end
            for line in data[:end].decode(errors="replace").splitlines():
                ev = read_event(line, str(p))
                if ev is not None:
                    out.append(ev)
        out.sort(key=lambda e: e.get("t", 0))
        return out


def log_line(logger: logging.Logger, ev: Event) -> None:
    """Log an event's line: a forwarded site warning/error at its own level, the rest at INFO."""
    level = logging.getLevelName(str(ev.get("level", "INFO"))) if ev.get("event") == "log" else logging.INFO
    logger.log(level if isinstance(level, int) else logging.WARNING, "%s", format_line(ev))


class TailPrinter:
    """A thread showing every new event of a :class:`ProgressTail` (``write(line)``, else ``logger``)."""

    def __init__(self, tail: ProgressTail, write: Callable[[str], None] | None = None,
                 logger: logging.Logger = LOG, poll_s: float = 1.0):
        self.tail, self.write, self.logger, self.poll_s = tail, write, logger, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-tail", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.flush()
        self.flush()

    def flush(self) -> None:
        for ev in self.tail.poll():
            if not is_line(ev):
                continue
            if self.write is not None:
                self.write(format_line(ev))
            else:
                log_line(self.logger, ev)

    def __enter__(self) -> TailPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class _Touch(logging.Handler):
    def __init__(self, rep: Reporter):
        super().__init__(logging.INFO)
        self.rep = rep

    def emit(self, record: logging.LogRecord) -> None:
        self.rep.touch()


@contextmanager
def watchdog(name: str, stage: str, logger: logging.Logger = LOG, interval_s: float = INTERVAL_S) -> Iterator[Reporter]:
    """A terminal's heartbeat: a line from ``name`` when no log line was shown for ``interval_s``.

    For a process that mostly waits on others (the coordinator of a simulation): every
    log record that reaches the root logger resets the clock; :func:`bar` loops of this
    process (e.g. the coordinator's own classifier) make its line count and give an ETA.
    """
    rep = Reporter(name, [LogSink(logger)], interval_s=interval_s)
    touch = _Touch(rep)
    root = logging.getLogger()
    root.addHandler(touch)
    try:
        with rep, active(rep), rep.stage(stage):
            yield rep
    finally:
        root.removeHandler(touch)
