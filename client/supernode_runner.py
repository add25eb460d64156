"""Flower's own SuperNode main, with its loop's sleeps capped (``site.supernode_poll_s``).

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) sleeps a hard-coded
3 s after every pull that found no message, so a new round waits 1.5 s on average
(up to 3 s) before a site even sees it, and it checks for the ClientApp's reply every
0.5 s. No flag or environment variable sets either. ``plan-client start`` therefore runs

    python -m client.supernode_runner --poll-s 0.25 -- <flower-supernode arguments>

which replaces the ``time`` module that ``flwr.supernode.start_client_internal`` sleeps
through with one whose ``sleep`` waits at most ``--poll-s`` seconds (everything else is
the real ``time``), then calls Flower's ``flower-supernode`` main with the arguments
after ``--``. Nothing else of Flower changes. :func:`check_supernode_sleeps` checks first
that the installed flwr still has exactly those sleeps in those functions; where it does
not, the runner warns (naming the flwr version) and runs Flower's SuperNode unchanged.
tests/test_supernode_runner.py fails when a flwr upgrade moves them.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: The module whose sleeps are capped, and per function the ``time.sleep(N)`` calls it must hold.
SUPERNODE_MODULE = "flwr.supernode.start_client_internal"
FLOWER_SLEEPS: dict[str, tuple[str, ...]] = {
    "start_client_internal": ("time.sleep(3)",),  # after a pull that found no message
    "_push_messages": ("time.sleep(0.5)",),  # waiting for the ClientApp's reply (and its objects)
}
#: Flower's SuperNode main (the ``flower-supernode`` console script).
FLOWER_MAIN = ("flwr.supernode.cli.flower_supernode", "flower_supernode")


class CappedTime(ModuleType):
    """The ``time`` module, except that :meth:`sleep` waits at most ``cap_s``."""

    def __init__(self, cap_s: float):
        super().__init__("time")
        self.cap_s = float(cap_s)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def flwr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def check_supernode_sleeps(module: ModuleType) -> list[str]:
    """What does not match in ``module`` (Flower's SuperNode loop); empty when the cap can be applied."""
    problems = []
    if getattr(module, "time", None) is not time and not isinstance(getattr(module, "time", None), CappedTime):
        problems.append(f"{module.__name__} no longer imports the time module as `time`")
    for fn_name, calls in FLOWER_SLEEPS.items():
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            problems.append(f"{module.__name__}.{fn_name} is gone")
            continue
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError) as err:
            problems.append(f"source of {module.__name__}.{fn_name} unreadable ({err})")
            continue
        problems += [f"{module.__name__}.{fn_name} no longer calls {c}" for c in calls if c not in src]
    return problems


def cap_supernode_sleeps(cap_s: float, module: ModuleType | None = None) -> list[str]:
    """Cap the sleeps of Flower's SuperNode loop at ``cap_s``; the problems found instead (nothing changed then)."""
    import importlib

    if module is None:
        try:
            module = importlib.import_module(SUPERNODE_MODULE)
        except ImportError as err:
            return [f"{SUPERNODE_MODULE} does not import ({err})"]
    problems = check_supernode_sleeps(module)
    if not problems:
        module.time = CappedTime(cap_s)  # type: ignore[attr-defined]
    return problems


def flower_main() -> Callable[[], None]:
    """Flower's ``flower-supernode`` main function."""
    import importlib

    mod_name, fn_name = FLOWER_MAIN
    fn = getattr(importlib.import_module(mod_name), fn_name, None)
    if not callable(fn):
        raise RuntimeError(f"flwr {flwr_version()}: {mod_name}.{fn_name} is gone; run flower-supernode directly "
                           "(site.supernode_poll_s: null)")
    return fn  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, flower = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m client.supernode_runner", description=__doc__.split("\n\n")[0],
                                 epilog="Arguments after -- go to Flower's flower-supernode.")
    ap.add_argument("--poll-s", type=float, required=True, help="longest sleep of the SuperNode loop (site.supernode_poll_s)")
    args = ap.parse_args(ours)
    if not 0 < args.poll_s <= 3.0:
        ap.error(f"--poll-s {args.poll_s}: must be in (0, 3] (site.supernode_poll_s)")
    main_fn = flower_main()
    problems = cap_supernode_sleeps(args.poll_s)
    if problems:
        print(f"warning: flwr {flwr_version()}: cannot cap the SuperNode's sleeps at site.supernode_poll_s="
              f"{args.poll_s}: {'; '.join(problems)}. Running Flower's SuperNode unchanged (each new message may wait "
              "its idle sleep); update client/supernode_runner.py for this flwr.", file=sys.stderr, flush=True)
    sys.argv = ["flower-supernode", *flower]
    main_fn()


if __name__ == "__main__":
    main()
