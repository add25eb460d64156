"""Inversion cost: today's inversion (``inversion.steps`` Adam steps from w_avg) against a learned
encoder (plan_shared.encoder, trained on generator samples only) + 0/5/10 refinement steps, in ONE
run, on the same real train images, generator and feature network (phi_id, trained here as the
pipeline trains it, on the same images).

    python benchmarks/inversion.py                                  # trains G briefly (~400 steps)
    python benchmarks/inversion.py --generator G.pt --images 512

For each method: the final reconstruction MSE (pixels in [-1, 1]) and feature loss (1 - cos of
phi_id features), averaged over the images; generator evaluations per image (forward+backward
passes of G in the optimisation; the encoder's training samples are amortised over the images
of this run and, separately, over the whole train split, which is what a site inverts); wall
time. The target of issue 14: >= 5x fewer generator evaluations than the baseline at equal or
lower reconstruction error (both terms: pixel MSE and feature loss). ``--adapt`` adds E fine-tuned
on the same real images first (inversion.encoder.adapt_epochs: one G evaluation per image per
epoch, counted as the site's own). ``uptime`` load is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from plan_shared.classifiers import build_classifier, spec_from, train_classifier
from plan_shared.config import load_config
from plan_shared.data import load_dataset, stratified_subsample, to_tensor
from plan_shared.encoder import adapt_encoder, encode, encoder_for, n_parameters
from plan_shared.gan import GanTrainer, generator_digest, load_generator
from plan_shared.inversion import invert
from plan_shared.navigation import w_std
from plan_shared.runtime import resolve_device, set_threads


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default=None, help="generator checkpoint (default: train one briefly)")
    ap.add_argument("--gan-steps", type=int, default=400, help="GAN steps when no --generator is given")
    ap.add_argument("--save-generator", default=None, help="write the briefly trained generator here")
    ap.add_argument("--data", default="pneumoniamnist", help="MedMNIST flag in $PLAN_DATA_DIR")
    ap.add_argument("--images", type=int, default=256, help="real train images inverted (stratified)")
    ap.add_argument("--refine", default="0,5,10", help="refinement steps from E(x)")
    ap.add_argument("--adapt", default="", help="site-side adaptation of E to the real images first "
                    "(inversion.encoder.adapt_epochs), as EPOCHS+REFINE_STEPS pairs, e.g. 4+8,6+6; empty = none")
    ap.add_argument("--short", default="10", help="also invert from w_avg with these few steps (same G evals as a "
                    "refinement: what the encoder's start is worth); empty = none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--id-epochs", type=int, default=None, help="phi_id epochs (default: identity.epochs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. inversion.encoder.steps=600 (YAML value)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import yaml

    overrides: dict[str, Any] = {"data.name": args.data, "device": args.device, "threads": args.threads}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    cfg = load_config(overrides=overrides)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    print(f"load before: {_load()}", flush=True)
    ds = load_dataset(cfg.data, cfg.seed)
    x_all = to_tensor(ds.train.images)
    idx = stratified_subsample(ds.train.labels, min(args.images, len(x_all)), cfg.seed)
    x = x_all[idx]
    n = len(x)

    t = time.perf_counter()
    if args.generator:
        G = load_generator(args.generator, device)
        print(f"generator {args.generator}", flush=True)
    else:
        tr = GanTrainer(cfg, ds.channels, ds.size, device)
        tr.train_steps(x_all.to(device), args.gan_steps)
        if args.save_generator:
            tr.save_checkpoint(args.save_generator)
        G = tr.G_ema.eval().requires_grad_(False)
        print(f"generator: {args.gan_steps} GAN steps in {time.perf_counter() - t:.0f}s", flush=True)

    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    phi_id = build_classifier(n, ds.channels, ds.size, cfg.identity, head="cosine").to(device)
    spec = spec_from(cfg.identity, **({"epochs": args.id_epochs} if args.id_epochs else {}))
    train_classifier(phi_id, x, torch.arange(n), spec, seed=cfg.seed, desc="phi_id", progress=False, recalibrate=True)
    phi_id.eval().requires_grad_(False)
    print(f"phi_id on {n} images: {time.perf_counter() - t:.0f}s", flush=True)

    ic = cfg.inversion
    sigma_w = w_std(G, seed=cfg.seed)
    rows: list[dict[str, Any]] = []

    def row(name: str, res: Any, seconds: float, evals_own: float, amortised: float = 0.0) -> dict[str, Any]:
        r = {
            "method": name, "mse": float(res.mse.mean()),
            "feature_loss": float(res.feature_loss.mean()) if res.feature_loss is not None else None,
            "g_evals_per_image": evals_own, "g_evals_per_image_amortised_run": evals_own + amortised * len(x_all) / n,
            "g_evals_per_image_amortised_train": evals_own + amortised, "seconds": seconds,
        }
        rows.append(r)
        fl = f"{r['feature_loss']:.4f}" if r["feature_loss"] is not None else "-"
        print(f"  {name:24s} mse {r['mse']:.4f}  feat {fl}  G evals/img {evals_own:6.1f} "
              f"(+enc: {r['g_evals_per_image_amortised_run']:7.1f} over {n}, "
              f"{r['g_evals_per_image_amortised_train']:6.1f} over {len(x_all)})  {seconds:6.1f}s", flush=True)
        return r

    with torch.no_grad():
        w0 = G.w_avg[None].repeat(n, 1)
    t = time.perf_counter()
    base0 = invert(G, x, ic, sigma_w, phi_id, steps=0, progress=False)
    row("w_avg (no optimisation)", base0, time.perf_counter() - t, 0)
    t = time.perf_counter()
    base = invert(G, x, ic, sigma_w, phi_id, progress=False)
    b = row(f"w_avg + {ic.steps} steps", base, time.perf_counter() - t, base.generator_evals / n)
    for k in [int(v) for v in args.short.split(",") if v.strip()]:
        t = time.perf_counter()
        short = invert(G, x, ic, sigma_w, phi_id, steps=k, progress=False)
        row(f"w_avg + {k} steps", short, time.perf_counter() - t, short.generator_evals / n)
    del w0

    ec = ic.encoder
    t = time.perf_counter()
    # inversion.encoder.path: reuse an E trained for this G by an earlier run (a sweep of refinement settings)
    E, loaded = encoder_for(G, ec, generator_digest(G), device, progress=False, seed=cfg.seed, sigma_w=sigma_w)
    assert E.stats is not None
    t_enc = E.stats.seconds if loaded else time.perf_counter() - t
    enc_evals = E.stats.generator_evals
    print(f"encoder{' (loaded from ' + str(ec.path) + ')' if loaded else ''}: {n_parameters(E)} parameters, "
          f"{E.stats.steps} steps x {E.stats.batch}, {enc_evals} G evals, "
          f"{t_enc:.0f}s, final W loss {E.stats.final_w_loss:.3f} sigma_W^2", flush=True)
    t = time.perf_counter()
    w_e = encode(E, x)
    t_code = time.perf_counter() - t
    amort = enc_evals / len(x_all)
    enc_rows = []
    for r in [int(s) for s in args.refine.split(",")]:
        t = time.perf_counter()
        res = invert(G, x, ic, sigma_w, phi_id, w_init=w_e, steps=r, progress=False)
        enc_rows.append(row(f"encoder + {r} steps", res, t_code + time.perf_counter() - t, res.generator_evals / n, amort))

    for pair in [p for p in args.adapt.split(",") if p.strip()]:
        ep, _, r_s = pair.partition("+")
        ac = ic.model_copy(deep=True)
        ac.encoder.adapt_epochs = int(ep)
        t = time.perf_counter()
        A, ad = adapt_encoder(E, G, x, ac, phi_id, seed=cfg.seed, progress=False)
        w_a = encode(A, x)
        r = int(r_s or 0)
        res = invert(G, x, ac, sigma_w, phi_id, w_init=w_a, steps=r, progress=False)
        enc_rows.append(row(f"E adapted {ad.epochs} ep + {r} steps", res, t_code + time.perf_counter() - t,
                            (ad.generator_evals + res.generator_evals) / n, amort))

    print(f"\nbaseline: {b['g_evals_per_image']:.0f} G evals/image, mse {b['mse']:.4f}; encoder trained in "
          f"{t_enc:.0f}s ({enc_evals} G evals, amortised {amort:.1f}/image over the {len(x_all)} train images)")
    for r in enc_rows:
        own = b["g_evals_per_image"] / r["g_evals_per_image"] if r["g_evals_per_image"] else float("inf")
        am = b["g_evals_per_image"] / r["g_evals_per_image_amortised_train"] if amort or own != float("inf") else own
        fb, fr = b["feature_loss"], r["feature_loss"]
        equal = r["mse"] <= b["mse"] and (fb is None or fr is None or fr <= fb)  # both terms of the inversion loss
        ok = "meets" if equal and am >= 5 else "misses"
        ok_own = "meets" if equal and own >= 5 else "misses"
        f_ratio = f"{fr / fb:.3f}" if fb and fr is not None else "-"
        print(f"  {r['method']:20s} mse ratio {r['mse'] / b['mse']:.3f}  feature ratio {f_ratio}  G-eval ratio {own:.1f}x "
              f"(amortised over train: {am:.1f}x)  wall ratio {b['seconds'] / r['seconds']:.1f}x "
              f"(+ encoder training: {b['seconds'] / (r['seconds'] + t_enc * n / len(x_all)):.1f}x) -> {ok} "
              f"the target (>= 5x amortised, mse and feature loss <= baseline); {ok_own} it with E shipped with G "
              f"(>= 5x own evals, mse and feature loss <= baseline)")
    print(f"load after: {_load()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "encoder_seconds": t_enc, "encoder_g_evals": enc_evals,
                                               "n_images": n, "n_train": len(x_all)}, indent=1))


if __name__ == "__main__":
    main()
