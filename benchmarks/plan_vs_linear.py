"""PLAN (each robust variant) vs the linear path on the same anchors: the four measures of issue #11.1.

One site: ``--n-train`` train images of the dataset (stratified, seeded). As client/pipeline.py does:
phi_id (one identity per image) and phi_class trained on them, the images inverted into W with
plan_shared.inversion, k-same anchors and nearest same-class pairs (plan_shared.anchors). Then,
with the SAME G, phi_id, phi_class and anchor pairs, paths for ``linear`` and each variant:

  plan          the published loss (plain KL + CE on the render)
  plan+margin   + L_class margin (CE only while p_y < navigation.class_target)
  plan+eot      + margin + expectation over transformations (navigation.eot_samples views)
  plan+lowpass  + margin + low-pass bound (navigation.lambda_smooth on the high-pass image change)
  plan+eot+lowpass   both
  plan+wplus    the published loss, W+ restricted: only the coarse/middle layers navigated (navigation.layers
                coarse_middle), the fine layers held on the linear path's w
  plan+wplus+margin  W+ restricted + L_class margin
  plan+wplus+margin+trR   + trust region: every point's W offset from its straight-line start at most R x the
                anchor-pair distance (navigation.trust_ratio)
  plan+wplus+margin+offR  + the absolute bound navigation.max_offset R (sigma_W units)
  plan+wplus+margin+realL  + the realism hinge navigation.lambda_real L with the checkpoint's D (for these the D
                measures below are no longer independent: read prec_att)
The other variants navigate plain W (navigation.layers all), whatever the configured default.

Measures on the interior path images (issue #11.1):
  (a) hf     spectral high-frequency share: power above 0.25 cycles/pixel over total (mean removed),
             mean over images; the real train images' share is the reference line
  (b) att_p  mean max identity probability under the attacker (plan_shared.attacker: its own
             architecture and recipe, trained on the same site images; never used by navigation)
  (c) dcr_px / dcr_att   mean distance to the closest site train image in pixels ([-1, 1], L2 over
             the image) and in the attacker's L2-normalised embedding
  (d) tstr   accuracy (and balanced accuracy) on the real test split of the utility classifier
             (classes recipe, utility epochs) trained on the path images with their path's label
Realism, in networks no variant optimises: the checkpoint's discriminator D (the federated D trained with G):
  d_logit    mean D logit of the path images (real train images' mean is the reference line)
  prec_d / kid_d   k-NN precision (k 3, Kynkaenniemi et al. 2019) and KID of the path images against the
             site's train images in D's penultimate features
  prec_att   k-NN precision in the attacker's embedding (no variant optimises it either)
  off_ratio  mean over points of ||w - w_lin|| / ||w_b - w_a|| (how far the path left the straight line)
Also phi_p (phi_id's mean max probability: what navigation optimised). Writes OUT/results.json,
OUT/strips-<variant>.png (plan_shared.plots.path_strips; p = attacker max id-probability,
d = pixel DCR) and prints the table.

    python benchmarks/plan_vs_linear.py --generator /work/runs/central-g/out/checkpoint.pt \\
        --dataset pneumoniamnist --n-train 300 --paths 12 --T 12 --out runs/plan_vs_linear
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plan_shared.anchors import k_same_anchors, nearest_pairs, spread_pairs
from plan_shared.attacker import embed as att_embed
from plan_shared.attacker import max_id_prob, train_attacker
from plan_shared.classifiers import build_classifier, predict_logits, spec_from, train_classifier
from plan_shared.config import NavigationConfig, config_from_stored, load_config, parse_sets
from plan_shared.data import load_dataset, stratified_subsample, to_tensor
from plan_shared.gan import load_generator
from plan_shared.inversion import invert
from plan_shared.metrics import balanced_accuracy, dcr, kernel_distance, precision_recall
from plan_shared.models import build_discriminator
from plan_shared.models.discriminator import Discriminator
from plan_shared.navigation import linear_paths, optimise_paths, path_styles, w_std
from plan_shared.plots import path_strips
from plan_shared.runtime import seed_everything, set_threads

VARIANTS: dict[str, dict[str, Any]] = {
    "plan": {"class_target": None},
    "plan+margin": {},
    "plan+eot": {"eot_samples": 4},
    "plan+lowpass": {"lambda_smooth": 400.0},
    "plan+eot+lowpass": {"eot_samples": 4, "lambda_smooth": 400.0},
    "plan+wplus": {"class_target": None, "layers": "coarse_middle"},
    "plan+wplus+margin": {"layers": "coarse_middle"},
    "plan+wplus+margin+tr0.1": {"layers": "coarse_middle", "trust_ratio": 0.1},
    "plan+wplus+margin+tr0.2": {"layers": "coarse_middle", "trust_ratio": 0.2},
    "plan+wplus+margin+tr0.35": {"layers": "coarse_middle", "trust_ratio": 0.35},
    "plan+wplus+margin+tr0.5": {"layers": "coarse_middle", "trust_ratio": 0.5},
    "plan+wplus+margin+off1": {"layers": "coarse_middle", "max_offset": 1.0},
    "plan+wplus+margin+real2": {"layers": "coarse_middle", "lambda_real": 2.0},
    "plan+wplus+margin+real6": {"layers": "coarse_middle", "lambda_real": 6.0},
    "plan+wplus+margin+tr0.35+real2": {"layers": "coarse_middle", "trust_ratio": 0.35, "lambda_real": 2.0},
    "plan+wplus+margin+off1.5": {"layers": "coarse_middle", "max_offset": 1.5},
}
# every variant sets the knobs it is about: the others follow the schema defaults, not the configured ones
_KNOBS = {"class_target": NavigationConfig().class_target, "layers": "all", "eot_samples": 0, "lambda_smooth": 0.0,
          "trust_ratio": None, "max_offset": None, "lambda_real": 0.0}


def hf_share(x: torch.Tensor, cutoff: float = 0.25) -> np.ndarray:
    """Per image: spectral power at radial frequency > ``cutoff`` cycles/pixel over all power (mean removed)."""
    x = x.float().mean(1)  # [N, H, W] (channels averaged)
    x = x - x.mean(dim=(1, 2), keepdim=True)
    pw = torch.fft.fft2(x).abs().pow(2)
    fy = torch.fft.fftfreq(x.shape[1]).view(-1, 1)
    fx = torch.fft.fftfreq(x.shape[2]).view(1, -1)
    high = (fy.pow(2) + fx.pow(2)).sqrt() > cutoff
    tot = pw.sum(dim=(1, 2)).clamp(min=1e-12)
    return (pw[:, high].sum(1) / tot).numpy()


def load_discriminator(path: str) -> Discriminator | None:
    """The checkpoint's discriminator (eval mode), or None when the file holds none."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "discriminator" not in sd:
        return None
    D = build_discriminator(config_from_stored(sd["config"], f"{path}:config"), sd["arch"]["size"], sd["arch"]["channels"])
    D.load_state_dict(sd["discriminator"])
    return D.eval().requires_grad_(False)


@torch.no_grad()
def d_scores(D: Discriminator, x: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """D's logits ``[N]`` and penultimate features ``[N, F]`` (batches of ``batch``: the minibatch-std groups)."""
    logits, feats = [], []
    for i in range(0, len(x), batch):
        h = x[i : i + batch]
        if D.native != D.size:
            h = torch.nn.functional.interpolate(h, size=(D.native, D.native), mode="bilinear", align_corners=False)
        h = D.conv(D.mbstd(D.blocks(D.from_image(h))))
        f = D.fc(h.flatten(1))
        feats.append(f)
        logits.append(D.out(f).squeeze(1))
    return torch.cat(logits), torch.cat(feats)


@torch.no_grad()
def render(G: torch.nn.Module, w: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([G.render(w[i : i + batch]).cpu() for i in range(0, len(w), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", required=True, help="generator checkpoint (plan-client train-gan or a round checkpoint)")
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--n-train", type=int, default=300, help="site train images (identities)")
    ap.add_argument("--paths", type=int, default=12)
    ap.add_argument("--T", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--strip-rows", type=int, default=4, help="paths drawn per strip PNG")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (e.g. identity.epochs=20)")
    ap.add_argument("--out", default="runs/plan_vs_linear")
    args = ap.parse_args()
    t_all = time.perf_counter()
    over = {"data.name": args.dataset, **parse_sets(args.set)}
    cfg = load_config(overrides=over)
    set_threads(args.threads)
    seed_everything(cfg.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu")
    timing: dict[str, float] = {}

    def tick(name: str, t0: float) -> None:
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_all:6.0f} s] {name} done ({timing[name]} s)", flush=True)

    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, cfg.seed)
    G = load_generator(args.generator, dev)
    if (G.channels, G.size) != (ds.channels, ds.size):
        raise SystemExit(f"generator makes {G.channels}x{G.size}px, data are {ds.channels}x{ds.size}px")
    idx = stratified_subsample(ds.train.labels, min(args.n_train, len(ds.train)), cfg.seed)
    x_tr, y_tr = to_tensor(ds.train.images[idx]), torch.as_tensor(ds.train.labels[idx]).long()
    x_te, y_te = to_tensor(ds.test.images), np.asarray(ds.test.labels)
    ids = torch.arange(len(x_tr))
    tick("load", t0)

    t0 = time.perf_counter()
    idc = cfg.identity
    torch.manual_seed(cfg.seed)
    phi_id = build_classifier(len(x_tr), ds.channels, ds.size, idc, head="cosine")
    train_classifier(phi_id, x_tr, ids, spec_from(idc), seed=cfg.seed, desc="phi_id", progress=False, recalibrate=True)
    torch.manual_seed(cfg.seed + 1)
    phi_class = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes)
    train_classifier(phi_class, x_tr, y_tr, spec_from(cfg.classes), seed=cfg.seed + 1, desc="phi_class",
                     progress=False, recalibrate=True)
    tick("phi_id+phi_class", t0)
    t0 = time.perf_counter()
    att = train_attacker(x_tr, ids, cfg.audit.attacker, dev, progress=False)
    att_train_p = float(max_id_prob(att, x_tr).mean())
    att_val_p = float(max_id_prob(att, to_tensor(ds.val.images)).mean())
    tick("attacker", t0)

    t0 = time.perf_counter()
    ic = cfg.inversion
    sigma_w = w_std(G, seed=cfg.seed)
    w_real = invert(G, x_tr, ic, sigma_w, feature_net=phi_id, progress=False).w
    anc = k_same_anchors(w_real, y_tr.numpy(), cfg.anchors.k)
    pairs = spread_pairs(nearest_pairs(anc.anchors, anc.labels, cfg.anchors.pairs_m), anc.labels, args.paths, cfg.seed)
    pa = torch.as_tensor([p[0] for p in pairs])
    pb = torch.as_tensor([p[1] for p in pairs])
    wa, wb = anc.anchors[pa], anc.anchors[pb]
    plabels = torch.as_tensor(anc.labels[pa.numpy()]).long()
    tick("inversion+anchors", t0)

    emb_tr = att_embed(att, x_tr)
    D = load_discriminator(args.generator)
    real_d_logit, real_d_feat = d_scores(D, x_tr) if D is not None else (None, None)
    flat_tr = x_tr.flatten(1)
    real_hf = float(hf_share(x_tr).mean())
    nc = cfg.navigation
    lin_paths = linear_paths(wa, wb, args.T)
    fulls: dict[str, torch.Tensor] = {"linear": lin_paths}  # styles to render: W or W+ per point
    off_ratio: dict[str, float] = {"linear": 0.0}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        t0 = time.perf_counter()
        variant = nc.model_copy(update={**_KNOBS, **VARIANTS[name], "T": args.T, "steps": args.steps})
        if variant.lambda_real > 0 and D is None:
            raise SystemExit(f"--variants {name}: {args.generator} holds no discriminator")
        paths = optimise_paths(G, phi_id, phi_class, wa, wb, plabels, variant, w_scale=sigma_w, progress=False,
                               seed=cfg.seed, disc=D).paths
        fulls[name] = path_styles(G, paths, variant)
        off_ratio[name] = float(((paths - lin_paths)[:, 1:-1].norm(dim=2) / (wb - wa).norm(dim=1, keepdim=True)).mean())
        tick(f"navigation {name}", t0)

    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, full in fulls.items():
        imgs_full = render(G, full.flatten(0, 1)).view(len(pairs), args.T, G.channels, G.size, G.size)
        inner = imgs_full[:, 1:-1].reshape(-1, G.channels, G.size, G.size)
        lab = plabels.repeat_interleave(args.T - 2)
        att_p = max_id_prob(att, inner)
        phi_p = torch.softmax(predict_logits(phi_id, inner), 1).max(1).values
        d_px = dcr(inner.flatten(1), flat_tr)
        d_att = dcr(att_embed(att, inner), emb_tr)
        torch.manual_seed(cfg.seed + 21)
        clf = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes)
        train_classifier(clf, inner, lab, spec_from(cfg.classes, epochs=cfg.classes.utility_epochs, balanced=True),
                         seed=cfg.seed + 21, desc=f"tstr {name}", progress=False, recalibrate=True)
        pred = predict_logits(clf, x_te).argmax(1).numpy()
        p_cls = torch.softmax(predict_logits(phi_class, inner), 1)[torch.arange(len(lab)), lab]
        results[name] = {
            "n": len(inner), "hf": float(hf_share(inner).mean()), "att_p": float(att_p.mean()),
            "phi_p": float(phi_p.mean()), "dcr_px": float(d_px.mean()), "dcr_px_p05": float(np.quantile(d_px, 0.05)),
            "dcr_att": float(d_att.mean()), "tstr_acc": float((pred == y_te).mean()),
            "tstr_bacc": balanced_accuracy(y_te, pred), "phi_class_p_y": float(p_cls.mean()),
            "off_ratio": off_ratio[name], "prec_att": precision_recall(emb_tr.numpy(), att_embed(att, inner).numpy(), k=3)[0],
        }
        if D is not None and real_d_feat is not None:
            d_logit, d_feat = d_scores(D, inner)
            results[name] |= {"d_logit": float(d_logit.mean()),
                              "prec_d": precision_recall(real_d_feat.numpy(), d_feat.numpy(), k=3)[0],
                              "kid_d": kernel_distance(real_d_feat.numpy(), d_feat.numpy())[0]}
        rows = []
        for r in range(min(args.strip_rows, len(pairs))):
            fp = imgs_full[r]
            rows.append({"title": f"{name} #{r} (p: attacker)", "images": fp, "id_prob": max_id_prob(att, fp).numpy(),
                         "dcr": dcr(fp.flatten(1), flat_tr)})
        path_strips(rows, out / f"strips-{name.replace('+', '_')}.png")
    tick("measures", t0)

    summary = {
        "generator": args.generator, "dataset": args.dataset, "n_train": len(x_tr), "paths": len(pairs), "T": args.T,
        "steps": args.steps, "variants": {k: VARIANTS[k] for k in fulls if k in VARIANTS},
        "navigation": nc.model_dump(mode="json"), "attacker": cfg.audit.attacker.model_dump(mode="json"),
        "attacker_mean_max_prob_train": att_train_p, "attacker_mean_max_prob_val": att_val_p,
        "real_train_hf": real_hf, "real_train_d_logit": None if real_d_logit is None else float(real_d_logit.mean()),
        "results": results, "timing_s": timing,
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsite {len(x_tr)} train images, {len(pairs)} paths x T {args.T}, {args.steps} steps; attacker mean max "
          f"prob: train {att_train_p:.3f}, val {att_val_p:.3f}; real train hf share {real_hf:.4f}"
          + ("" if real_d_logit is None else f", D logit {float(real_d_logit.mean()):.3f}"))
    hdr = f"{'method':26s} {'hf':>7s} {'hf/lin':>6s} {'att_p':>6s} {'phi_p':>6s} {'dcr_px':>7s} {'dcr_att':>7s} " \
          f"{'tstr':>6s} {'tstr_b':>6s} {'p_y':>5s} {'off':>5s} {'prec_a':>6s} {'d_logit':>7s} {'prec_d':>6s} {'kid_d':>7s}"
    print(hdr)
    lin_hf = results["linear"]["hf"]
    for name, r in results.items():
        real = f" {r['d_logit']:7.3f} {r['prec_d']:6.3f} {r['kid_d']:7.3f}" if "d_logit" in r else ""
        print(f"{name:26s} {r['hf']:7.4f} {r['hf'] / lin_hf:6.2f} {r['att_p']:6.3f} {r['phi_p']:6.3f} {r['dcr_px']:7.3f} "
              f"{r['dcr_att']:7.3f} {r['tstr_acc']:6.3f} {r['tstr_bacc']:6.3f} {r['phi_class_p_y']:5.2f} "
              f"{r['off_ratio']:5.2f} {r['prec_att']:6.3f}{real}")
    print(f"total {summary['total_s']} s; {out / 'results.json'}")


if __name__ == "__main__":
    main()
