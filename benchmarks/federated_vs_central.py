"""Generator quality: federated (N Dirichlet sites, Flower simulation) vs central, same total steps.

The federated run trains ``rounds x local_steps`` GAN steps at each of ``sites`` sites
(total ``sites x rounds x local_steps`` steps of compute); the central reference trains
that many steps on the union of the sites' training images, and its checkpoint after
``rounds x local_steps`` steps (the number of sequential updates the global model went
through, i.e. equal wall time when the sites run in parallel) is scored as well.

Quality is a Fréchet distance (FD) and a kernel distance (KID, unbiased at any sample
size, ~0 for two samples of one distribution) on the features of a class classifier
trained here for a fixed number of epochs on the real train split (no downloaded
Inception weights), between ``--samples`` generated images and the real val split: same
source as the training images, seen by neither the generators nor the feature net. The
real test split is scored too, and "real test vs val" shows the size of that data set's
source shift on the same scale. Writes ``OUT/side_by_side.png`` and ``OUT/quality.json``
and prints the table and the FD ratios.
``--reuse`` keeps the federated run in ``OUT/federated`` and the central checkpoints in ``OUT``.

``--central-steps N[,N...]`` also scores the central run after N steps (it trains to the largest of
these and ``sites x rounds x local_steps``): the central generator at EQUAL WALL TIME with a federated
run (issue 10 item 3) is the one after ``federation wall / central seconds per step`` steps. The table
prints both rates (``wall`` line); take them on an idle machine, e.g. the demo's federation phase
(``runs/demo/report.json`` timings) over the central seconds per step printed here.

    python benchmarks/federated_vs_central.py --dataset pneumoniamnist --sites 3 --alpha 0.5 \
        --rounds 8 --local-steps 50 --out runs/fvc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plan_shared.classifiers import build_classifier, embed, spec_from, train_classifier  # noqa: E402
from plan_shared.data import load_dataset, to_tensor  # noqa: E402
from plan_shared.gan import GanTrainer, load_generator  # noqa: E402
from plan_shared.metrics import frechet_distance, kernel_distance  # noqa: E402
from plan_shared.runtime import seed_everything, setup_logging  # noqa: E402

# --variants: name -> federation overrides (server/server_opt.py); "fedavg" is today's default.
VARIANTS: dict[str, dict[str, object]] = {
    "fedavg": {"federation.server_opt": "none"},
    "fedavgm": {"federation.server_opt": "momentum", "federation.server_momentum": 0.9, "federation.server_lr": 1.0},
    "fedavgm-b0.5": {"federation.server_opt": "momentum", "federation.server_momentum": 0.5,
                     "federation.server_lr": 1.0},
    "fedadam": {"federation.server_opt": "adam", "federation.server_lr": 0.01},
    "fedavg-g": {"federation.server_opt": "none", "federation.share": "g"},
    # local optimisation under non-IID data: twice the Adam lr of G and D; five times the R1 weight
    "fedavg-lr2": {"federation.server_opt": "none", "gan.lr_g": 0.005, "gan.lr_d": 0.005},
    "fedavg-r1x5": {"federation.server_opt": "none", "gan.r1_gamma": 1.0},
}


@torch.no_grad()
def _samples(G, n: int, seed: int) -> torch.Tensor:
    w = G.sample_w(n, torch.Generator().manual_seed(seed))
    return torch.cat([G.render(w[i : i + 256]) for i in range(0, n, 256)])


def _side_by_side(grids: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plan_shared.imaging import image_grid

    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.6), dpi=120)
    for ax, (title, imgs) in zip(axes, grids.items()):
        g = image_grid(imgs, nrow=8)
        ax.imshow(g[:, :, 0] if g.shape[2] == 1 else g, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/fvc"))
    ap.add_argument("--variants", default="fedavg",
                    help=f"comma-separated federated variants, one table row each: {', '.join(VARIANTS)}")
    ap.add_argument("--reuse", action="store_true", help="score the federated run already in OUT/federated")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=CHECKPOINT",
                    help="also score this generator checkpoint (e.g. a demo's federated G: runs/demo/checkpoints/"
                    "round-0005.pt) on the same feature net and references; repeatable")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the central run and the scoring "
                    "(more threads than free cores slow torch down many times over: use 1 on a shared machine)")
    ap.add_argument("--central-steps", default="",
                    help="comma-separated extra central step counts to score (e.g. the equal-wall-time count)")
    args = ap.parse_args()
    setup_logging()
    from server.simulate import run_simulation, simulation_config

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        extra = sorted({int(x) for x in args.central_steps.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--central-steps: {args.central_steps!r} is not a comma-separated list of step counts")
    if any(n < 1 for n in extra):
        ap.error(f"--central-steps: {args.central_steps!r}: step counts must be >= 1")
    also: dict[str, Path] = {}
    for item in args.also:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            ap.error(f"--also {item!r}: expected NAME=CHECKPOINT with an existing checkpoint file")
        also[name] = Path(path)
    ov = {"federation.local_steps": args.local_steps, "federation.share": "gd", "seed": args.seed}
    total = args.sites * args.rounds * args.local_steps
    sequential = args.rounds * args.local_steps
    central_total = max([total, *extra])
    keep_at = {sequential: out / "central-sequential.pt", **{n: out / f"central-{n:05d}.pt" for n in extra}}
    fed_ckpts: dict[str, Path] = {}
    t_feds: dict[str, float] = {}
    cfg = None
    for v in variants:
        vdir = out / ("federated" if v == "fedavg" else f"federated-{v}")
        cfg_v = simulation_config(None, sites=args.sites, rounds=args.rounds, dataset=args.dataset,
                                  partition="dirichlet", alpha=args.alpha, out=vdir, overrides={**ov, **VARIANTS[v]})
        cfg = cfg if cfg is not None else cfg_v
        fed_ckpts[v] = vdir / "checkpoints" / f"round-{args.rounds:04d}.pt"
        t0 = time.perf_counter()
        if args.reuse and fed_ckpts[v].is_file():  # wall time of the earlier run: its rounds
            lines = (vdir / "metrics.jsonl").read_text().splitlines()
            t_feds[v] = sum(json.loads(x)["wall_s"] for x in lines)
        else:
            run_simulation(cfg_v, vdir)
            t_feds[v] = time.perf_counter() - t0
    assert cfg is not None
    t_fed = max(t_feds.values())

    seed_everything(args.seed)
    ds = load_dataset(cfg.data, args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta = json.loads((out / "central.json").read_text()) if (out / "central.json").is_file() else {}
    reuse_central = (args.reuse and meta.get("steps", 0) >= central_total
                     and all(p.is_file() for p in (out / "central.pt", *keep_at.values())))
    if reuse_central:
        t_cen, cen_steps = meta["wall_s"], meta["steps"]
    else:
        central = GanTrainer(cfg, ds.channels, ds.size)
        t_at: dict[int, float] = {}

        def _keep(tr: GanTrainer, _m: dict) -> None:
            if tr.step in keep_at:
                t_at[tr.step] = time.perf_counter() - t0
                tr.save_checkpoint(keep_at[tr.step])
            if tr.step == total:
                tr.save_checkpoint(out / "central.pt")

        central.train_steps(to_tensor(ds.train.images), central_total, progress=True, desc="central GAN",
                            callback=_keep)
        t_cen, cen_steps = time.perf_counter() - t0, central_total
        (out / "central.json").write_text(json.dumps({"wall_s": t_cen, "steps": central_total,
                                                      "wall_s_at": {str(k): v for k, v in t_at.items()}}))

    # The feature net trains a fixed number of epochs (no selection on val), so val stays
    # unseen by it and by every generator: the reference sample of the training source.
    feat = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes)
    train_classifier(feat, to_tensor(ds.train.images), ds.train.labels, spec_from(cfg.classes), seed=args.seed,
                     desc="feature net")
    ref = {"val": embed(feat, to_tensor(ds.val.images), normalise=False),
           "test": embed(feat, to_tensor(ds.test.images), normalise=False)}
    gens = {**{("federated" if v == "fedavg" else f"fed:{v}"): c for v, c in fed_ckpts.items()},
            "central": out / "central.pt",
            f"central@{sequential}": out / "central-sequential.pt",
            **{f"central@{n}": keep_at[n] for n in extra if n not in (sequential, total)}, **also}
    scores: dict[str, dict[str, float]] = {}
    grids = {}
    for name, ckpt in gens.items():
        x = _samples(load_generator(ckpt), args.samples, args.seed)
        f = embed(feat, x, normalise=False)
        scores[name] = {}
        for r, rf in ref.items():
            k, sd = kernel_distance(f, rf, seed=args.seed)
            scores[name].update({f"fd_{r}": frechet_distance(f, rf), f"kid_{r}": k, f"kid_{r}_sd": sd})
        grids[f"{name}: FD {scores[name]['fd_val']:.2f}, KID {scores[name]['kid_val']:.2f}"] = x[:64]
    k, sd = kernel_distance(ref["test"], ref["val"], seed=args.seed)
    scores["real test"] = {"fd_val": frechet_distance(ref["test"], ref["val"]), "kid_val": k, "kid_val_sd": sd}
    grids["real (train)"] = to_tensor(ds.train.images[:64])
    _side_by_side(grids, out / "side_by_side.png")
    res = {
        "dataset": args.dataset, "sites": args.sites, "alpha": args.alpha, "rounds": args.rounds,
        "local_steps": args.local_steps, "total_steps": total, "sequential_steps": sequential,
        "samples": args.samples, "reference_sizes": {r: len(v) for r, v in ref.items()}, "scores": scores,
        "variants": {v: VARIANTS[v] for v in variants},
        "ratio_fd_over_central_sequential": {n: sc["fd_val"] / scores[f"central@{sequential}"]["fd_val"]
                                             for n, sc in scores.items() if n == "federated" or n.startswith("fed:")},
        "wall_s": {**{f"federated:{v}": round(t, 1) for v, t in t_feds.items()}, "central": round(t_cen, 1)},
        "central_s_per_step": t_cen / cen_steps,
        "central_steps_in_federated_wall": {v: int(t / (t_cen / cen_steps)) for v, t in t_feds.items()},
        "png": str(out / "side_by_side.png"),
    }
    if "federated" in scores:
        res["ratio_fd_federated_over_central"] = scores["federated"]["fd_val"] / scores["central"]["fd_val"]
        res["ratio_fd_federated_over_central_sequential"] = res["ratio_fd_over_central_sequential"]["federated"]
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    steps = {**{n: f"{args.sites}x{sequential}" for n in res["ratio_fd_over_central_sequential"]},
             "central": str(total), f"central@{sequential}": str(sequential), **{f"central@{n}": str(n) for n in extra},
             "real test": "-", **{n: "?" for n in also}}
    print(f"\nFeatures: class classifier trained on the real train split. Reference: real val "
          f"({len(ref['val'])} images, same source as train, unseen); KID ~ 0 = indistinguishable from it.")
    print(f"{'images':<16}{'steps':>8}{'FD val':>10}{'KID val x1e3':>18}{'FD test':>10}{'KID test x1e3':>18}"
          f"{'FD/central@seq':>16}")
    for name, sc in scores.items():
        row = f"{name:<16}{steps[name]:>8}{sc['fd_val']:>10.3f}{1e3 * sc['kid_val']:>11.1f} ± {1e3 * sc['kid_val_sd']:<4.0f}"
        if "fd_test" in sc:
            row += f"{sc['fd_test']:>10.3f}{1e3 * sc['kid_test']:>11.1f} ± {1e3 * sc['kid_test_sd']:<4.0f}"
        if name in res["ratio_fd_over_central_sequential"]:
            row += f"{res['ratio_fd_over_central_sequential'][name]:>16.2f}"
        print(row)
    print(f"wall federated (slowest variant) {t_fed:.0f}s, central {t_cen:.0f}s for {cen_steps} steps "
          f"({t_cen / cen_steps:.3f} s/step: {res['central_steps_in_federated_wall']} central steps in each federated "
          f"run's wall time); figure {res['png']}")


if __name__ == "__main__":
    main()
