"""GAN step speed: the reference step (``gan.fast=false``, the step as it was) against the
optimised one (``gan.fast=true``, optionally compiled), in ONE run, same batch, threads and
images, interleaved A B A B ... so that a change of machine load hits both alike.

    python benchmarks/gan_step.py                        # 32 px, 2 threads, CPU (< 3 min)
    python benchmarks/gan_step.py --device auto --size 32 64 128 --compile on

Each repetition times ``--steps`` steps of each trainer (after ``--warmup`` untimed steps,
which also pay any compile cost); the figure printed is the median over ``--reps``. Both
trainers start from the same seed and run the same number of steps, so the lazy-R1 steps
fall alike. ``uptime`` load is printed before and after: on a shared machine the absolute
numbers move, the ratio much less; the ratio of steps per CPU-second of this process is
printed too (less sensitive to other processes, but it counts threads spinning while waiting).

``--profile`` instead runs torch.profiler over ``--steps`` steps of each trainer and lists the top
ops by self CPU time and the share of the step's parts. Measured at 32 px, batch 32, the demo's gan
defaults, on 2 shared cores under load 6-7 (so the profiler's clock counts waiting; shares, not times):

    python benchmarks/gan_step.py --profile --threads 1 --steps 4 --warmup 2      (commit 55c325f)
    reference, 1 thread: convolution_backward 36.7%, mkldnn_convolution 22.6%, mul 5.3%, avg_pool2d 4.5%,
      avg_pool2d_backward 3.2%, copy_ 3.0%, leaky_relu 2.7%, leaky_relu_backward 1.9%, add 1.5%,
      upsample_bilinear2d_backward 1.3%, ConvolutionBackward0 (engine) 1.1%, AvgPool2DBackward0 1.0%,
      view 0.9%, convolution 0.8%, add_ 0.7%.  Parts: G forward 18%, D forward 20%, backward (G, D, R1's
      double backward) 58%, R1 grad 3%, Adam 0.8%, augment 0.5%, EMA 0.2%.
    optimised, 1 thread: convolution_backward 36.1%, mkldnn_convolution 29.2%, mul 4.5%, leaky_relu_backward
      3.9%, leaky_relu 2.5%, avg_pool2d 1.6%, copy_ 1.6%, upsample_bilinear2d 1.4%, sum 1.2%, fill_ 1.2%,
      add 1.0%, pow 0.9%, avg_pool2d_backward 0.8%, bmm 0.8%, add_ 0.8%.
    python benchmarks/gan_step.py --profile --threads 2 --steps 4 --warmup 2      (commit 7198371)
    reference, 2 threads: convolution_backward 23.1%, mkldnn_convolution 19.7%, mul 13.4%, mm 8.9%, sum 4.5%,
      add 3.2%, leaky_relu 3.0%, leaky_relu_backward 2.2%, avg_pool2d 2.2%, avg_pool2d_backward 2.1%,
      addmm 2.1%, copy_ 2.1%, add_ 1.8%, div 1.6%, fill_ 1.5%: at 2 threads on a loaded machine the small
      ops (mm of the styles, mul, sum) cost as much as the convolutions (threads waiting for each other).

Convolutions are ~60-65% of the 1-thread step in both trainers and the optimised step computes the
same convolutions, so at 1 thread the ceiling of any same-maths change outside them is ~1.6x.
gan.fast gains: channels_last activations (oneDNN convolutions 1.2-2x faster on the 32 px shapes,
avg_pool2d 3x, bilinear upsampling 4.5x in isolation), ToImage as one baddbmm (1x1 convolution to one
channel ~5x slower), one D pass over real+fake, fused bias/noise/demodulation/gain, foreach Adam/EMA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from plan_shared.config import load_config  # noqa: E402
from plan_shared.gan import GanTrainer  # noqa: E402
from plan_shared.runtime import resolve_device  # noqa: E402


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_size(size: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    trainers, images = _trainers(size, args, device)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    for name, tr in trainers.items():
        t = time.perf_counter()
        tr.train_steps(images, args.warmup)
        _sync(device)
        print(f"  {size}px {name}: warm-up {args.warmup} steps {time.perf_counter() - t:.1f}s", flush=True)
    for _ in range(args.reps):
        for name, tr in trainers.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            tr.train_steps(images, args.steps)
            _sync(device)
            times[name].append(args.steps / (time.perf_counter() - t))
            cpu[name].append(args.steps / max(time.process_time() - c, 1e-9))
        print(f"  {size}px rep {len(times['reference'])}: "
              + ", ".join(f"{k} {v[-1]:.2f} steps/s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {**med, "ratio": med["optimised"] / med["reference"],
            "cpu_ratio": med_cpu["optimised"] / med_cpu["reference"]}


_SECTIONS = ("G forward", "D forward", "augment", "backward", "R1 grad", "Adam", "EMA")


def _instrument(tr: GanTrainer) -> list[tuple[Any, str, Any]]:
    """Wrap the step's parts in ``record_function`` ranges (instance attributes; undone by ``_restore``)."""
    from torch.profiler import record_function

    def wrap(obj: Any, attr: str, label: str) -> tuple[Any, str, Any]:
        orig = getattr(obj, attr)

        def inner(*a: Any, **k: Any) -> Any:
            with record_function(label):
                return orig(*a, **k)

        setattr(obj, attr, inner)
        return obj, attr, orig

    return [wrap(tr, "_generate", "G forward"), wrap(tr.D, "forward", "D forward"), wrap(tr, "_augment", "augment"),
            wrap(torch.Tensor, "backward", "backward"), wrap(torch.autograd, "grad", "R1 grad"),
            wrap(tr.opt_d, "step", "Adam"), wrap(tr.opt_g, "step", "Adam"), wrap(tr, "_update_ema", "EMA")]


def _restore(patches: list[tuple[Any, str, Any]]) -> None:
    for obj, attr, orig in reversed(patches):
        setattr(obj, attr, orig)


def profile_size(size: int, args: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler over ``--steps`` steps of each trainer: top ops by self CPU time and the step's parts."""
    from torch.profiler import ProfilerActivity, profile

    trainers, images = _trainers(size, args, device)
    for name, tr in trainers.items():
        tr.train_steps(images, args.warmup)
        patches = _instrument(tr)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                c = time.process_time()
                tr.train_steps(images, args.steps)
                cpu_s = time.process_time() - c
        finally:
            _restore(patches)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n== {size}px {name}: {args.steps} steps, threads {torch.get_num_threads()}, ops' self CPU "
              f"{total / 1e6:.2f}s ({total / 1e3 / args.steps:.0f} ms/step; profiler clock, counts waits under load), "
              f"process CPU {cpu_s:.2f}s, load {_load()}")
        print(f"{'op':<42} {'self CPU ms':>12} {'%':>6} {'calls':>7}")
        ops = sorted((e for e in events if e.key not in _SECTIONS), key=lambda e: -e.self_cpu_time_total)
        for e in ops[: args.top]:
            print(f"{e.key[:42]:<42} {e.self_cpu_time_total / 1e3:>12.1f} {100 * e.self_cpu_time_total / total:>6.1f} {e.count:>7}")
        parts = {e.key: e.cpu_time_total for e in events if e.key in _SECTIONS}
        print("parts (their ops' CPU, % of all ops' self CPU): " + ", ".join(
            f"{k} {100 * parts.get(k, 0.0) / total:.1f}%" for k in _SECTIONS)
            + f", other ops (losses, zero_grad, batch) {100 * (1 - sum(parts.values()) / total):.1f}%")


def _trainers(size: int, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, GanTrainer], torch.Tensor]:
    base = {"data.size": size, "seed": 0}
    if args.batch:
        base["gan.batch_size"] = args.batch
    trainers = {
        "reference": GanTrainer(load_config(overrides={**base, "gan.fast": False, "gan.compile": "off"}), 1, size, device),
        "optimised": GanTrainer(load_config(overrides={**base, "gan.fast": True, "gan.compile": args.compile}), 1, size, device),
    }
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(512, 1, size, size, generator=gen) * 2 - 1).to(device)
    return trainers, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=[32], help="Image sizes (px); e.g. 32 64 128 on a GPU.")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (CUDA when available).")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    ap.add_argument("--batch", type=int, default=None, help="Batch size (default: gan.batch_size).")
    ap.add_argument("--steps", type=int, default=8, help="Timed steps per trainer and repetition (a multiple of r1_every).")
    ap.add_argument("--reps", type=int, default=5, help="Interleaved repetitions; the median is reported.")
    ap.add_argument("--warmup", type=int, default=4, help="Untimed steps per trainer first (pays compile, if on).")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="off", help="gan.compile of the optimised trainer.")
    ap.add_argument("--profile", action="store_true", help="Instead of timing: torch.profiler over --steps steps of each "
                    "trainer (after --warmup), top --top ops by self CPU time and the share of each part of the step.")
    ap.add_argument("--top", type=int, default=15, help="--profile: how many ops to list.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch or load_config().gan.batch_size}, compile {args.compile}")
    print(f"load before: {_load()}", flush=True)
    if args.profile:
        for s in args.size:
            profile_size(s, args, device)
        print(f"load after: {_load()}")
        return
    t0 = time.perf_counter()
    rows = {s: bench_size(s, args, device) for s in args.size}
    print(f"load after: {_load()}  (total {time.perf_counter() - t0:.0f}s)")
    print(f"{'size':>5} {'reference steps/s':>18} {'optimised steps/s':>18} {'ratio':>6} {'ratio per CPU-s':>16}")
    for s, r in rows.items():
        print(f"{s:>5} {r['reference']:>18.3f} {r['optimised']:>18.3f} {r['ratio']:>6.2f} {r['cpu_ratio']:>16.2f}")


if __name__ == "__main__":
    main()
