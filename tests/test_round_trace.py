"""The round-time breakdowns of benchmarks/deploy_round.py (--trace) and benchmarks/sim_gap.py, on written logs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _supernode_log(round_start: str) -> str:
    """Two train messages as a SuperNode log with FLWR_LOG_LEVEL=DEBUG shows them (colour codes and all)."""
    out = []

    def stamp(base: int, dt: float) -> str:
        tot = base + dt
        return f"2026-12-02 {int(tot // 3600):02d}:{int(tot % 3600 // 60):02d}:{tot % 60:06.3f}".replace(".", ",")

    for sec in (round_start, "00:01:00"):
        h, m, s = (int(x) for x in sec.split(":"))
        base = h * 3600 + m * 60 + s

        def t(dt: float, base: int = base) -> str:
            return stamp(base, dt)

        out += [f"\x1b[92mINFO {t(1.0)}\x1b[0m:      Receiving: train message (ID: ab)",
                f"\x1b[94mDEBUG {t(1.2)}\x1b[0m:     Runtime.PushObject",
                f"INFO {t(3.0)}:      Start `flwr-clientapp` process",
                f"INFO {t(4.0)}:      Received successfully",
                f"DEBUG {t(5.0)}:     Runtime.ConfirmMessageReceived",
                f"{t(5.5)} INFO plan.site_worker: site worker: train handled in 0.30s",
                f"INFO {t(8.0)}:      Sent successfully",
                "INFO :      a line without a time"]
    return "\n".join(out) + "\n"


def test_site_marks_and_breakdown(tmp_path: Path) -> None:
    d = _load("deploy_round")
    (tmp_path / "hospital-a.log").write_text(_supernode_log("00:00:00"))
    marks = d.site_marks(tmp_path / "hospital-a.log")
    assert len(marks) == 2 and set(marks[1]) == {"recv", "recvd", "capp", "confirm", "hend", "sent"}
    assert marks[1]["sent"] - marks[1]["recv"] == pytest.approx(7.0)
    base = marks[1]["recv"] - 1.0  # round 2 pushed at 00:01:00, collected 9 s later, 0.5 s of server work
    recs = [{"round": 1, "time": 0.0, "wall_s": 1.0, "collect_s": 1.0},
            {"round": 2, "time": base + 9.5, "wall_s": 9.5, "collect_s": 9.0}]
    table = {k: v for k, v, _ in d.trace_table(tmp_path, recs)}
    assert table[d.SEGMENTS[0][0]] == pytest.approx(1.0)  # push -> Receiving
    assert table[d.SEGMENTS[1][0]] == pytest.approx(3.0)  # SuperNode pull
    assert table[d.SEGMENTS[5][0]] == pytest.approx(2.5)  # reply push
    last = [v for k, v in table.items() if k.startswith("last reply pushed")]
    assert last == [pytest.approx(1.0)]
    assert [v for k, v in table.items() if k.startswith("aggregation")] == [pytest.approx(0.5)]


def test_site_gaps_between_gan_rounds(tmp_path: Path) -> None:
    g = _load("sim_gap")
    ev = []
    for r, (a, b) in enumerate([(0.0, 30.0), (52.0, 80.0), (81.0, 90.0)], start=1):
        ev += [{"stage": f"GAN round {r}", "event": "start", "t": a}, {"stage": f"GAN round {r}", "event": "end", "t": b}]
    ev.append({"stage": "load", "event": "start", "t": 95.0})
    p = tmp_path / "progress.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in ev))
    assert g.site_gaps(p) == [22.0, 1.0]
