"""plan_shared.progress: events, rate limit, heartbeat, line format, JSONL files and their tail."""

from __future__ import annotations

import json
import logging
import time

import pytest

from plan_shared import progress as P


def _collect():
    events: list[dict] = []
    return events, events.append


def test_line_format_of_each_event():
    ev = {"site": "site-1", "stage": "navigation", "event": "progress", "task": "navigation", "done": 12, "total": 24,
          "unit": "paths", "elapsed_s": 41.2, "eta_s": 38.4}
    assert P.format_line(ev) == "[site-1] navigation 12/24 paths  41 s elapsed, ETA 38 s"
    ev.update(task="navigation (24 paths)", eta_s=None, elapsed_s=130)
    assert P.format_line(ev) == "[site-1] navigation: navigation (24 paths) 12/24 paths  2 min 10 s elapsed"
    start = {"site": "s", "stage": "inversion", "event": "start", "index": 6, "n_stages": 14, "prev": "calibrate",
             "prev_s": 3.0}
    assert P.format_line(start) == "[s] inversion started (stage 6/14); calibrate took 3 s"
    end = {"site": "s", "stage": "figures", "event": "end", "index": 14, "n_stages": 14, "elapsed_s": 5}
    assert P.format_line(end) == "[s] figures done in 5 s (stage 14/14)" and P.is_line(end)
    assert not P.is_line(dict(end, index=3))  # a middle stage's end is the next one's start line
    assert P.is_line(dict(end, index=3, failed=True))
    assert P.format_line(dict(end, failed=True)).startswith("[s] figures FAILED after 5 s")
    log = {"site": "s", "event": "log", "level": "ERROR", "message": "filter FAILED"}
    assert P.format_line(log) == "[s] ERROR: filter FAILED"


def test_stage_events_rate_limit_and_eta():
    events, sink = _collect()
    rep = P.Reporter("site-1", [sink], stages=["a", "b"], interval_s=0.2, heartbeat=False)
    with P.active(rep):
        with rep.stage("a"):
            for _ in P.bar(range(20), desc="loop", unit="steps"):
                time.sleep(0.02)
        with rep.stage("b"):
            pass
    kinds = [(e["stage"], e["event"]) for e in events]
    assert kinds[0] == ("a", "start") and kinds[-2:] == [("b", "start"), ("b", "end")]
    ticks = [e for e in events if e["event"] == "progress"]
    # 20 x 20 ms = 0.4 s of work with a 0.2 s interval: one or two lines, never one per step
    assert 1 <= len(ticks) <= 2, ticks
    t = ticks[0]
    assert t["task"] == "loop" and t["total"] == 20 and 0 < t["done"] < 20 and t["unit"] == "steps"
    assert t["eta_s"] > 0 and (t["index"], t["n_stages"]) == (1, 2)
    b_start = events[-2]
    assert b_start["prev"] == "a" and b_start["prev_s"] >= 0.3


def test_heartbeat_speaks_when_a_step_is_long():
    events, sink = _collect()
    with P.Reporter("site-2", [sink], interval_s=0.2) as rep:
        with rep.stage("filter"):
            time.sleep(0.7)  # one long step, no update at all
    beats = [e for e in events if e["event"] == "progress"]
    assert 2 <= len(beats) <= 4, beats
    assert all(b["stage"] == "filter" and "eta_s" not in b for b in beats)
    assert events[-1]["event"] == "end" and events[-1]["elapsed_s"] >= 0.7


def test_failed_stage_and_a_broken_sink_do_not_fail_the_work(caplog):
    events, sink = _collect()

    def broken(ev):
        raise OSError("disk full")

    rep = P.Reporter("s", [broken, sink], heartbeat=False)
    with caplog.at_level(logging.WARNING, logger="plan.progress"):
        with pytest.raises(ValueError):
            with rep.stage("x"):
                raise ValueError("boom")
    assert events[-1]["event"] == "end" and events[-1]["failed"] is True
    assert rep.sinks == [sink] and "disk full" in caplog.text


def test_bar_without_a_reporter_is_a_plain_loop():
    assert P.current() is None
    assert list(P.bar(range(3), desc="x")) == [0, 1, 2]


def test_site_warnings_travel_with_the_events():
    events, sink = _collect()
    rep = P.Reporter("site-0", [sink], heartbeat=False)
    with rep.forward_logs(), rep.stage("filter"):
        logging.getLogger("plan.pipeline").error("filter FAILED its sensitivity test")
        logging.getLogger("plan.pipeline").info("not forwarded")
        logging.getLogger("plan.progress").warning("not forwarded either (no loop)")
    logs = [e for e in events if e["event"] == "log"]
    assert [(e["level"], e["message"], e["stage"]) for e in logs] == [("ERROR", "filter FAILED its sensitivity test", "filter")]


def test_jsonl_files_and_tail(tmp_path, caplog):
    (tmp_path / "site-0").mkdir()
    old = tmp_path / "site-0" / "progress.jsonl"
    old.write_text(json.dumps({"site": "site-0", "stage": "old", "event": "start", "t": 1}) + "\n")
    tail = P.ProgressTail(tmp_path, "*/progress.jsonl", from_end=True)
    s0, s1 = P.JsonlSink(old), P.JsonlSink(tmp_path / "site-1" / "progress.jsonl")
    s1({"site": "site-1", "stage": "load", "event": "start", "t": 3})
    s0({"site": "site-0", "stage": "load", "event": "start", "t": 2})
    with open(old, "a") as fh:  # a writer caught mid-line, and a line that is no event
        fh.write('{"site": "site-0", "stage": "phi_id", "event": "st')
    evs = tail.poll()
    assert [(e["site"], e["stage"]) for e in evs] == [("site-0", "load"), ("site-1", "load")]  # by time, old skipped
    with open(old, "a") as fh:
        fh.write('art", "t": 4}\nnot json\n')
    with caplog.at_level(logging.WARNING, logger="plan.progress"):
        evs = tail.poll()
    assert [(e["stage"], e["event"]) for e in evs] == [("phi_id", "start")]
    assert "unreadable progress line" in caplog.text and str(old) in caplog.text
    assert tail.poll() == []


def test_tail_printer_shows_lines(tmp_path):
    sink = P.JsonlSink(tmp_path / "a" / "progress.jsonl")
    lines: list[str] = []
    with P.TailPrinter(P.ProgressTail(tmp_path, "*/progress.jsonl"), lines.append, poll_s=0.05):
        rep = P.Reporter("site-1", [sink], stages=["load", "figures"], heartbeat=False)
        with rep.stage("load"):
            pass
        with rep.stage("figures"):
            pass
        time.sleep(0.2)
    assert lines[0] == "[site-1] load started (stage 1/2)"
    assert lines[1].startswith("[site-1] figures started (stage 2/2); load took 0 s")
    assert lines[2].startswith("[site-1] figures done in 0 s (stage 2/2)") and len(lines) == 3


def test_watchdog_speaks_only_after_silence(caplog):
    log = logging.getLogger("plan.test_watchdog")
    with caplog.at_level(logging.INFO):
        with P.watchdog("coordinator", "simulation", log, interval_s=0.3):
            for _ in range(4):  # other lines every 0.1 s: no heartbeat
                logging.getLogger("plan.other").info("busy")
                time.sleep(0.1)
            n_before = sum("elapsed" in r.getMessage() for r in caplog.records)
            time.sleep(0.8)
    beats = [r.getMessage() for r in caplog.records if "elapsed" in r.getMessage()]
    assert n_before == 0 and 1 <= len(beats) <= 3, beats
    assert beats[0].startswith("[coordinator] simulation ")
