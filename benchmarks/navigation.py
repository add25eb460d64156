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
    from plan_shared.navigation import optimise_paths, sequential_reference

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
    nc = cfg.navigation.model_copy(update={"T": args.T, "chunk": args.chunk or cfg.navigation.chunk})
    one, timed = nc.model_copy(update={"steps": 1}), nc.model_copy(update={"steps": args.steps})
    # warm-up (oneDNN primitive creation, allocator) with the shapes of the timed run, untimed
    if args.case == "sequential":
        sequential_reference(G, phi_id, phi_c, wa[0], wb[0], int(y[0]), one)
    else:
        optimise_paths(G, phi_id, phi_c, wa, wb, y, one, progress=False)
    base = _rss_mb()
    t0 = time.perf_counter()
    if args.case == "sequential":
        for p in range(n):
            sequential_reference(G, phi_id, phi_c, wa[p], wb[p], int(y[p]), timed)
    else:
        optimise_paths(G, phi_id, phi_c, wa, wb, y, timed, progress=False)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": args.case, "paths": n, "T": args.T, "steps": args.steps, "seconds": dt,
        "path_steps_per_s": n * args.steps / dt, "image_steps_per_s": n * (args.T - 2) * args.steps / dt,
        "peak_rss_mb": peak, "rss_after_warmup_mb": base, "navigation_extra_mb": peak - base,
    }



# ------------------------------------------------------------------ time to quality (issue 14.3)

TTQ_DOC = """Time to quality: the published loop vs this engine on the same anchors, G, phi_id, phi_class.

One process, --threads intra-op threads. phi_id (cosine head, one identity per image, --n-id train images)
and phi_class are trained here on pneumoniamnist train images (cached in --cache); anchors are GAN samples
(truncation 0.7) paired within phi_class's predicted class. The lambdas are the published per-image weights
(KL 0.025, CE 0.25: lambda = w * (T - 2)) and T - 2 is a multiple of 4, so the published loop's summed
split-means and the engine optimise the same objective. Cases (each starts from the straight line):

  official   plan_shared.navigation.official_loop, one path at a time, --official-steps (500) steps, on the
             first --official-paths paths (its time per path does not depend on the others: total = sum);
  engine     optimise_paths on the same paths at navigation.steps (30), and with early stopping per path
             (--patience, --rel-tol, cap --official-steps); also on --engine-paths paths of which those are
             the first (a site runs hundreds at once); quality is compared on the shared paths.

Quality (untimed, on the interior points): objective and its terms (means over paths), phi_id's mean max
probability (lower = less identifying), DCR = distance in pixels ([-1, 1], L2) to the closest identity image
(mean over points; higher = farther from the members). Time to quality = first time the mean objective is within
--tol (relative) of the official 500-step objective. GFLOP/s counts G + phi_id + phi_class forward + backward
(FlopCounterMode, per image) over the images actually rendered; utilisation is against a 1024^2 fp32 matmul
timed in the same process. --precision fp32,bf16 adds the engine cases with navigation.precision bf16 (the networks'
passes under bfloat16 autocast); their quality columns are scored in fp32 like every other case, and their utilisation
is given against both the fp32 and the bf16 1024^2 matmul.
"""


def _train_models(args, G):
    import torch

    from plan_shared.classifiers import build_classifier, spec_from, train_classifier
    from plan_shared.config import load_config
    from plan_shared.data import load_dataset, to_tensor

    cfg = load_config(None)
    key = f"{args.generator}|{args.n_id}|{args.id_epochs}|{args.class_images}|{args.class_epochs}"
    if args.cache and os.path.exists(args.cache):
        c = torch.load(args.cache, weights_only=False)
        if c["key"] == key:
            return c["phi_id"], c["phi_class"], c["x_id"], c["note"]
    cfg.data.name = "pneumoniamnist"
    cfg.data.size = G.size
    ds = load_dataset(cfg.data, cfg.seed)
    x_tr, y_tr = to_tensor(ds.train.images), torch.as_tensor(ds.train.labels)
    gen = torch.Generator().manual_seed(0)
    sel = torch.randperm(len(x_tr), generator=gen)
    x_id = x_tr[sel[: args.n_id]]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    phi_id = build_classifier(args.n_id, G.channels, G.size, cfg.identity, head="cosine")
    train_classifier(phi_id, x_id, torch.arange(args.n_id), spec_from(cfg.identity, epochs=args.id_epochs), progress=False,
                     recalibrate=True)
    ic = sel[: args.class_images]
    phi_class = build_classifier(ds.num_classes, G.channels, G.size, cfg.classes)
    train_classifier(phi_class, x_tr[ic], y_tr[ic], spec_from(cfg.classes, epochs=args.class_epochs), progress=False,
                     recalibrate=True)
    with torch.no_grad():
        acc_id = float((phi_id(x_id).argmax(1) == torch.arange(args.n_id)).float().mean())
        pv = torch.softmax(phi_id(to_tensor(ds.val.images)), 1).max(1).values.mean()
        x_te, y_te = to_tensor(ds.test.images), torch.as_tensor(ds.test.labels)
        acc_c = float((phi_class(x_te).argmax(1) == y_te).float().mean())
    note = (f"phi_id: {args.n_id} identities, {args.id_epochs} epochs, train top-1 {acc_id:.3f}, val mean max-prob {float(pv):.3f}; "
            f"phi_class: {args.class_images} images, {args.class_epochs} epochs, test acc {acc_c:.3f}; "
            f"trained in {time.perf_counter() - t0:.0f} s")
    if args.cache:
        torch.save({"key": key, "phi_id": phi_id, "phi_class": phi_class, "x_id": x_id, "note": note}, args.cache)
    return phi_id, phi_class, x_id, note


def _flops_per_image(G, phi_id, phi_class, nav, sc: float) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from plan_shared.nav_objectives import Objective
    from plan_shared.navigation import _chunk_loss

    n = 32
    w = (G.sample_w(n, torch.Generator().manual_seed(5)) / sc).requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        loss, _ = _chunk_loss(G, phi_id, phi_class, w * sc, torch.zeros(n, dtype=torch.long), Objective.from_config(nav),
                              nav.T - 2, torch.Generator().manual_seed(0), w.detach() * sc)
        loss.backward()
    return fc.get_total_flops() / n


def _matmul_gflops(dtype_name: str = "fp32") -> float:
    import torch

    dt = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * 1024**3 / best / 1e9


def _quality(G, phi_id, phi_class, x_id, full, labels, nav, sc: float) -> dict:
    import torch

    from plan_shared.navigation import dist_loss, path_losses

    with torch.no_grad():
        L = path_losses(G, phi_id, phi_class, full, labels)
        L["dist"] = dist_loss(full / sc)  # the optimised L_dist is in W standardised by sigma_W
        obj = nav.lambda_dist * L["dist"] + nav.lambda_id * L["id"] + nav.lambda_class * L["class"]
        img = G.render(full[:, 1:-1].reshape(-1, full.shape[2]))
        pmax = torch.softmax(phi_id(img), 1).max(1).values
        dcr = torch.cdist(img.flatten(1), x_id.flatten(1)).min(1).values
        acc = (phi_class(img).argmax(1) == labels.repeat_interleave(full.shape[1] - 2)).float().mean()
    return {"objective": float(obj.mean()), "dist": float(L["dist"].mean()), "id": float(L["id"].mean()),
            "class": float(L["class"].mean()), "id_prob": float(pmax.mean()), "dcr": float(dcr.mean()),
            "class_acc": float(acc)}


def time_to_quality(args) -> dict:
    import torch

    from plan_shared.config import load_config
    from plan_shared.gan import load_generator
    from plan_shared.navigation import official_loop, optimise_paths, random_samples, w_std

    torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if bad or not precisions:
        sys.exit(f"--precision {args.precision!r}: a comma list of fp32 and bf16")
    if not args.generator:
        sys.exit("--time-to-quality needs --generator CKPT (a trained generator; quality means nothing for random weights)")
    if (args.T - 2) % 4:
        sys.exit(f"--T {args.T}: T - 2 must be a multiple of 4 so that the published split-sum equals the engine's objective")
    G = load_generator(args.generator).eval().requires_grad_(False)
    phi_id, phi_class, x_id, note = _train_models(args, G)
    for m in (phi_id, phi_class):
        m.eval().requires_grad_(False)
    print(note, flush=True)
    cfg = load_config(None)
    nav = cfg.navigation.model_copy(update={"T": args.T, "lambda_id": 0.025 * (args.T - 2), "lambda_class": 0.25 * (args.T - 2),
                                            "devices": ["cpu"], "class_target": None, "eot_samples": 0, "lambda_smooth": 0.0,
                                            "layers": "all"})
    # class_target None, no EOT, no low-pass term, plain W: the published objective, the one official_loop optimises
    sc = w_std(G)
    # anchors: GAN samples paired within phi_class's predicted class
    n = args.engine_paths
    w = random_samples(G, 8 * n, truncation=0.7, seed=3)
    with torch.no_grad():
        y = phi_class(G.render(w)).argmax(1)
    wa, wb, lab = [], [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        for i in range(0, len(idx) - 1, 2):
            wa.append(w[idx[i]]), wb.append(w[idx[i + 1]]), lab.append(c)
    order = torch.randperm(len(lab), generator=torch.Generator().manual_seed(4))[:n]
    wa, wb, lab = torch.stack(wa)[order], torch.stack(wb)[order], torch.tensor(lab)[order]
    k = args.official_paths
    print(f"{n} anchor pairs (classes {torch.bincount(lab).tolist()}), first {k} for the official loop; T={args.T}, "
          f"lambda_id={nav.lambda_id:g} lambda_class={nav.lambda_class:g}, sigma_W={sc:.3f}, threads {args.threads}", flush=True)
    flop_img = _flops_per_image(G, phi_id, phi_class, nav, sc)
    mm = _matmul_gflops()
    mm_bf16 = _matmul_gflops("bf16") if "bf16" in precisions else None
    print(f"{flop_img / 1e6:.1f} MFLOP per image-step (G + phi_id + phi_class, fwd+bwd); 1024^2 fp32 matmul {mm:.1f} GFLOP/s"
          + (f", bf16 matmul {mm_bf16:.1f} GFLOP/s" if mm_bf16 else ""), flush=True)
    # warm-up (oneDNN primitives, allocator) for both code paths, untimed
    official_loop(G, phi_id, phi_class, wa[0], wb[0], int(lab[0]), nav.model_copy(update={"steps": 2}), w_scale=sc)
    for prec in precisions:
        optimise_paths(G, phi_id, phi_class, wa, wb, lab, nav.model_copy(update={"steps": 2, "precision": prec}), w_scale=sc,
                       progress=False)

    rows = []
    # --- official, one path at a time
    S = args.official_steps
    times = torch.zeros(k, S)
    losses = torch.zeros(k, S)
    snaps: dict[int, list] = {}
    every = max(1, S // 20)
    offs = []
    for p in range(k):
        spent = [0.0]
        t0 = time.perf_counter()

        def on_step(step, pts, loss, p=p, t0=t0, spent=spent):
            t = time.perf_counter()
            times[p, step] = t - t0 - spent[0]
            losses[p, step] = loss
            if step % every == 0:
                snaps.setdefault(step, []).append(torch.cat([wa[p, None], pts, wb[p, None]]))
            spent[0] += time.perf_counter() - t

        offs.append(official_loop(G, phi_id, phi_class, wa[p], wb[p], int(lab[p]), nav.model_copy(update={"steps": S}),
                                  w_scale=sc, on_step=on_step))
        print(f"official path {p + 1}/{k}: {S} steps in {float(times[p, -1]):.1f} s", flush=True)
    t_off = times.sum(0)  # all k paths at step s: sum of the per-path times (the loop is strictly sequential)
    off_full = torch.stack(offs)
    q_off = _quality(G, phi_id, phi_class, x_id, off_full, lab[:k], nav, sc)
    target = q_off["objective"] * (1 + args.tol)
    obj_off = losses.mean(0)
    s_off = int((obj_off <= target).nonzero()[0]) if bool((obj_off <= target).any()) else S - 1
    rows.append({"case": f"official ({S} steps)", "paths": k, "seconds": float(t_off[-1]), "steps": S,
                 "image_steps": k * S * (args.T - 2), "ttq_s": float(t_off[s_off]), **q_off})
    curve = []
    for step in sorted(snaps):
        qs = _quality(G, phi_id, phi_class, x_id, torch.stack(snaps[step]), lab[:k], nav, sc)
        curve.append({"step": step, "seconds": float(t_off[step]), **qs})

    # --- engine cases
    def engine(name, m, upd):
        c = nav.model_copy(update=upd)
        t0 = time.perf_counter()
        r = optimise_paths(G, phi_id, phi_class, wa[:m], wb[:m], lab[:m], c, w_scale=sc, progress=False)
        dt = time.perf_counter() - t0
        q = _quality(G, phi_id, phi_class, x_id, r.paths[:k], lab[:k], nav, sc)
        # time to quality: from the per-step history when the case ran exactly the official paths; with more
        # paths the run's total time if its shared paths end within the tolerance (an upper bound)
        lw = torch.tensor([c.lambda_dist, c.lambda_id, c.lambda_class])
        obj = [float(torch.tensor([h["dist"], h["id"], h["class"]]) @ lw) / m for h in r.history]
        hit = [h["seconds"] for h, o in zip(r.history, obj) if o <= target]
        if m > k:  # the history mixes in paths the official loop did not run: only the end point is comparable
            hit = [dt] if q["objective"] <= target else []
        imgs = int(r.steps_run.sum()) * (args.T - 2)
        print(f"{name} on {m} paths: {dt:.1f} s", flush=True)
        rows.append({"case": name, "paths": m, "precision": c.precision, "seconds": dt, "steps": int(r.steps_run.max()),
                     "steps_mean": float(r.steps_run.float().mean()), "image_steps": imgs,
                     "ttq_s": (hit[0] if hit else None), **q})

    d = cfg.navigation.steps
    for prec in precisions:
        tag = "" if prec == "fp32" else f" {prec}"
        for m in (k, n) if n > k else (k,):
            engine(f"engine{tag} ({d} steps)", m, {"steps": d, "precision": prec})
            engine(f"engine{tag} ({2 * d} steps)", m, {"steps": 2 * d, "precision": prec})
            engine(f"engine{tag} (early stop p={args.patience})", m, {"steps": S, "early_stop_patience": args.patience,
                                                                    "early_stop_rel_tol": args.rel_tol, "precision": prec})
    per_path_off = rows[0]["seconds"] / k
    print(f"\nofficial objective after {S} steps: {q_off['objective']:.4f}; target = within {args.tol:.0%}: <= {target:.4f}")
    print(f"{'case':28s} {'paths':>5s} {'steps':>9s} {'s/path':>8s} {'objective':>9s} {'L_dist':>7s} {'L_id':>6s} "
          f"{'L_class':>7s} {'id_prob':>7s} {'DCR':>6s} {'acc':>5s} {'ttq s/path':>10s} {'speed-up':>8s} {'GFLOP/s':>7s} {'util':>5s}")
    for r in rows:
        r["seconds_per_path"] = r["seconds"] / r["paths"]
        r["gflops"] = flop_img * r["image_steps"] / r["seconds"] / 1e9
        r["utilisation"] = r["gflops"] / mm  # against the fp32 matmul: the same FLOPs, whatever the arithmetic
        if r.get("precision") == "bf16" and mm_bf16:
            r["utilisation_of_bf16_peak"] = r["gflops"] / mm_bf16
        r["ttq_per_path_s"] = r["ttq_s"] / r["paths"] if r["ttq_s"] is not None else None
        r["speedup_at_equal_quality"] = per_path_off / r["ttq_per_path_s"] if r["ttq_per_path_s"] else None
        st = f"{r['steps']}" if "steps_mean" not in r else f"{r['steps_mean']:.0f}/{r['steps']}"
        tq = f"{r['ttq_per_path_s']:.2f}" if r["ttq_per_path_s"] is not None else "not reached"
        sp = f"{r['speedup_at_equal_quality']:.1f}x" if r["speedup_at_equal_quality"] else "-"
        print(f"{r['case']:28s} {r['paths']:5d} {st:>9s} {r['seconds_per_path']:8.2f} {r['objective']:9.4f} {r['dist']:7.3f} "
              f"{r['id']:6.3f} {r['class']:7.4f} {r['id_prob']:7.3f} {r['dcr']:6.2f} {r['class_acc']:5.2f} {tq:>10s} {sp:>8s} "
              f"{r['gflops']:7.1f} {r['utilisation']:5.0%}", flush=True)
    print("(speed-up = official s/path for all its steps / case's s/path to the target (for more paths than the "
          "official ran: its total s/path, a lower bound on the speed-up); quality columns on the "
          f"{k} shared paths; the official loop's own time to the target: {rows[0]['ttq_s'] / k:.2f} s/path)")
    print("official loop against its own time (quality of the points at that step, untimed evaluation):")
    for c in curve:
        print(f"  step {c['step']:4d}  {c['seconds'] / k:7.2f} s/path  objective {c['objective']:.4f}  "
              f"id_prob {c['id_prob']:.3f}  DCR {c['dcr']:.2f}")
    for r in rows:
        if "utilisation_of_bf16_peak" in r:
            print(f"  {r['case']} on {r['paths']} paths: {r['utilisation_of_bf16_peak']:.0%} of the bf16 matmul's GFLOP/s")
    return {"note": note, "T": args.T, "threads": args.threads, "tol": args.tol, "flop_per_image_step": flop_img,
            "matmul_gflops": mm, "matmul_gflops_bf16": mm_bf16, "precisions": precisions,
            "target_objective": target, "rows": rows, "official_curve": curve}


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
    tq = ap.add_argument_group("time to quality (--time-to-quality; see TTQ_DOC in this file)")
    tq.add_argument("--time-to-quality", action="store_true", help="run the time-to-quality comparison instead")
    tq.add_argument("--official-paths", type=int, default=4)
    tq.add_argument("--official-steps", type=int, default=500)
    tq.add_argument("--engine-paths", type=int, default=32)
    tq.add_argument("--patience", type=int, default=20)
    tq.add_argument("--rel-tol", type=float, default=1e-3)
    tq.add_argument("--tol", type=float, default=0.02, help="relative tolerance on the official objective")
    tq.add_argument("--id-epochs", type=int, default=20)
    tq.add_argument("--class-images", type=int, default=1500)
    tq.add_argument("--class-epochs", type=int, default=4)
    tq.add_argument("--precision", default="fp32", help="engine cases per precision, e.g. fp32,bf16 (navigation.precision)")
    tq.add_argument("--cache", default=None, help="keep the trained phi_id/phi_class here between runs")
    args = ap.parse_args()
    if args.time_to_quality:
        if args.T == 50 and "--T" not in sys.argv:
            args.T = 22
        if args.n_id == 2428 and "--n-id" not in sys.argv:
            args.n_id = 400
        res = time_to_quality(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)
        return
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
                             capture_output=True, text=True, env=os.environ.copy(), check=False)
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
