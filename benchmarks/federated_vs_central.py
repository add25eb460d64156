"""Generator quality: federated (N Dirichlet sites, Flower simulation) vs central, same total steps.

The federated run trains ``rounds x local_steps`` GAN steps at each of ``sites`` sites
(total ``sites x rounds x local_steps`` steps of compute); the central reference trains
that many steps on the union of the sites' training images. Quality is a Fréchet
distance on the features of a class classifier trained here on the real train split
(no downloaded Inception weights): real test images vs ``--samples`` generated images,
with real val vs real test as the floor. Writes ``OUT/side_by_side.png`` and
``OUT/quality.json`` and prints the table and the ratio federated / central.

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
from plan_shared.metrics import frechet_distance  # noqa: E402
from plan_shared.runtime import seed_everything, setup_logging  # noqa: E402


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
    args = ap.parse_args()
    setup_logging()
    from server.simulate import run_simulation, simulation_config

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ov = {"federation.local_steps": args.local_steps, "federation.share": "gd", "seed": args.seed}
    cfg = simulation_config(None, sites=args.sites, rounds=args.rounds, dataset=args.dataset, partition="dirichlet",
                            alpha=args.alpha, out=out / "federated", overrides=ov)
    total = args.sites * args.rounds * args.local_steps

    t0 = time.perf_counter()
    run_simulation(cfg, out / "federated")
    t_fed = time.perf_counter() - t0
    fed_ckpt = out / "federated" / "checkpoints" / f"round-{args.rounds:04d}.pt"

    seed_everything(args.seed)
    ds = load_dataset(cfg.data, args.seed)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    central = GanTrainer(cfg, ds.channels, ds.size)
    central.train_steps(to_tensor(ds.train.images), total, progress=True, desc="central GAN")
    central.save_checkpoint(out / "central.pt")
    t_cen = time.perf_counter() - t0

    feat = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes)
    train_classifier(feat, to_tensor(ds.train.images), ds.train.labels, spec_from(cfg.classes),
                     val=(to_tensor(ds.val.images), torch.as_tensor(ds.val.labels)), seed=args.seed, desc="feature net")
    real_test = embed(feat, to_tensor(ds.test.images), normalise=False)
    fd_floor = frechet_distance(embed(feat, to_tensor(ds.val.images), normalise=False), real_test)
    gens = {"federated": load_generator(fed_ckpt), "central": load_generator(out / "central.pt")}
    fd, grids = {}, {}
    for name, G in gens.items():
        x = _samples(G, args.samples, args.seed)
        fd[name] = frechet_distance(embed(feat, x, normalise=False), real_test)
        grids[f"{name}: FD {fd[name]:.2f}"] = x[:64]
    grids["real (train)"] = to_tensor(ds.train.images[:64])
    _side_by_side(grids, out / "side_by_side.png")
    res = {
        "dataset": args.dataset, "sites": args.sites, "alpha": args.alpha, "rounds": args.rounds,
        "local_steps": args.local_steps, "total_steps_each": total, "samples": args.samples,
        "fd_federated": fd["federated"], "fd_central": fd["central"], "fd_real_val_vs_test": fd_floor,
        "ratio_federated_over_central": fd["federated"] / fd["central"],
        "wall_s": {"federated": round(t_fed, 1), "central": round(t_cen, 1)},
        "png": str(out / "side_by_side.png"),
    }
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'generator':<12}{'FD (test)':>12}")
    print(f"{'federated':<12}{fd['federated']:>12.3f}")
    print(f"{'central':<12}{fd['central']:>12.3f}")
    print(f"{'real val':<12}{fd_floor:>12.3f}   (floor)")
    print(f"ratio federated/central: {res['ratio_federated_over_central']:.2f}; "
          f"wall federated {t_fed:.0f}s, central {t_cen:.0f}s; figure {res['png']}")


if __name__ == "__main__":
    main()
