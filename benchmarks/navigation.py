"""Navigation throughput: the published loop (one path at a time) vs this engine (many paths, chunked).

Same G, phi_id, phi_class, anchors, T and number of steps for every case:

  (a) sequential: the published loop re-stated (plan_shared.navigation.sequential_reference):
      one path at a time, its T-2 interior points in one batch, one backward per step;
  (b) batched: plan_shared.navigation.optimise_paths with 8 / 32 / 128 paths in one tensor,
      gradients accumulated chunk by chunk (navigation.chunk images per forward+backward).

Each case runs in its own subprocess so that its peak memory (ru_maxrss) is its own;
one untimed warm-up step runs first; peak RSS is over the whole process (models, warm-up and timed run).
Prints path-steps/s, the ratio (b)/(a) and the peak memory per case.

    python benchmarks/navigation.py [--generator CKPT] [--steps 2] [--T 50] [--threads 2]

Models are untrained unless --generator is given (throughput does not depend on weights);
phi_id has n_id = 2428 classes (PneumoniaMNIST's train split) with a cosine head.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(args) -> dict:
    import torch

    from plan_shared.classifiers import build_classifier
    from plan_shared.config import load_config
    from plan_shared.models import build_generator
    from plan_shared.navigation import NavWeights, optimise_paths, sequential_reference

    torch.set_num_threads(args.threads)
    cfg = load_config(None)
    torch.manual_seed(0)
    if args.generator:
        from plan_shared.gan import load_generator

        G = load_generator(args.generator)
    else:
        G = build_generator(cfg, 32, 1).eval().requires_grad_(False)
    phi_id = build_classifier(args.n_id, 1, 32, cfg.identity, head="cosine").eval()
    phi_c = build_classifier(2, 1, 32, cfg.classes).eval()
    gen = torch.Generator().manual_seed(1)
    n = args.paths
    wa, wb = G.sample_w(n, gen), G.sample_w(n, gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    nc = cfg.navigation
    wt = NavWeights(nc.lambda_dist, nc.lambda_id, nc.lambda_class)
    # warm-up (oneDNN primitive creation, allocator) with the shapes of the timed run, untimed
    if args.case == "sequential":
        sequential_reference(G, phi_id, phi_c, wa[0], wb[0], int(y[0]), T=args.T, steps=1, lr=nc.lr, weights=wt)
    else:
        optimise_paths(G, phi_id, phi_c, wa, wb, y, T=args.T, steps=1, lr=nc.lr, weights=wt,
                       chunk=args.chunk or nc.chunk, progress=False)
    base = _rss_mb()
    t0 = time.perf_counter()
    if args.case == "sequential":
        for p in range(n):
            sequential_reference(G, phi_id, phi_c, wa[p], wb[p], int(y[p]), T=args.T, steps=args.steps, lr=nc.lr, weights=wt)
    else:
        optimise_paths(G, phi_id, phi_c, wa, wb, y, T=args.T, steps=args.steps, lr=nc.lr, weights=wt,
                       chunk=args.chunk or nc.chunk, progress=False)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": args.case, "paths": n, "T": args.T, "steps": args.steps, "seconds": dt,
        "path_steps_per_s": n * args.steps / dt, "image_steps_per_s": n * (args.T - 2) * args.steps / dt,
        "peak_rss_mb": peak, "rss_after_warmup_mb": base, "navigation_extra_mb": peak - base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-id", type=int, default=2428)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--seq-paths", type=int, default=2, help="paths timed for the sequential baseline")
    ap.add_argument("--batched", default="8,32,128")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paths", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    common = ["--steps", str(args.steps), "--T", str(args.T), "--threads", str(args.threads), "--n-id", str(args.n_id)]
    if args.generator:
        common += ["--generator", args.generator]
    if args.chunk:
        common += ["--chunk", str(args.chunk)]
    cases = [("sequential", args.seq_paths)] + [("batched", int(p)) for p in args.batched.split(",")]
    results = []
    for case, paths in cases:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--paths", str(paths), *common],
                             capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            sys.exit(f"case {case} {paths} failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{case:10s} paths={paths:4d}  {r['path_steps_per_s']:7.3f} path-steps/s  "
              f"({r['image_steps_per_s']:6.1f} image-steps/s)  peak RSS {r['peak_rss_mb']:7.1f} MB  "
              f"(+{r['navigation_extra_mb']:.1f} MB over warm-up RSS)", flush=True)
    seq = results[0]["path_steps_per_s"]
    for r in results[1:]:
        r["ratio_vs_sequential"] = r["path_steps_per_s"] / seq
        print(f"batched {r['paths']:4d} paths / sequential: {r['ratio_vs_sequential']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
