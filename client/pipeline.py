"""The site pipeline B1-B6 of method.md, as one reusable function.

``run_site_pipeline(cfg, dataset, generator_ckpt, out_dir, method)`` trains phi_id,
the independent identity model and phi_class on the site's real train split, inverts
(a budgeted subsample of) the train images into W, forms k-same anchors, optimises
PLAN paths and the linear baseline between the same anchor pairs, draws random GAN
samples, scores every candidate with the privacy filter (with planted near-duplicates
that must be rejected), exports the accepted images of ``method`` and writes::

    OUT/images/<class>/<id>.png      accepted images only
    OUT/manifest.json                plan_shared.manifest format, one record per image
    OUT/report.json                  counts, filter, per-method comparison, utility, timing
    OUT/path_strips.png  OUT/samples.png  OUT/dcr_hist.png

The federated ClientApp calls it in-process with the global generator checkpoint.
Nothing that identifies a patient (real images, latents, phi_id) is written to OUT.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from plan_shared import progress as P
from plan_shared.anchors import k_same_anchors, nearest_pairs, spread_pairs
from plan_shared.classifiers import (
    accuracy_of,
    augmented_accuracy,
    build_classifier,
    embed,
    predict_logits,
    spec_from,
    train_classifier,
)
from plan_shared.config import PlanConfig
from plan_shared.data import ImageDataset, stratified_subsample, to_tensor
from plan_shared.gan import file_sha256, generator_digest, load_generator
from plan_shared.imaging import save_png, to_uint8_hwc
from plan_shared.encoder import encoder_init  # encoder:
from plan_shared.inversion import invert
from plan_shared.manifest import ImageRecord, SiteManifest, Thresholds, safe_class_names, write_site_manifest
from plan_shared.metrics import classification_report, dcr_summary
from plan_shared.navigation import NavWeights, linear_paths, optimise_paths, random_samples, w_std
from plan_shared.plots import dcr_histogram, path_strips, sample_grid
from plan_shared.privacy import accept_mask, build_zone, plant_duplicates, reject_reasons, score_images
from plan_shared.runtime import resolve_device, seed_everything, set_threads

LOG = logging.getLogger("plan.pipeline")
METHODS = ("plan", "linear", "random")


class _Timer:
    """Stage timings for report.json; every stage is also a stage of the progress reporter."""

    def __init__(self, reporter: P.Reporter) -> None:
        self.timing: dict[str, float] = {}
        self.reporter = reporter

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        with self.reporter.stage(name):
            yield
        self.timing[name] = round(time.perf_counter() - t0, 2)


def pipeline_stages(cfg: PlanConfig) -> list[str]:
    """The pipeline's stages in order (what the progress lines count as ``stage i/n``)."""
    st = ["load", "phi_id", "indep_id", "phi_class", "calibrate", "inversion", "anchors", "navigation", "render",
          "filter", "export", "utility"]
    return st + (["compare"] if cfg.synthesis.compare else []) + ["figures"]


@torch.no_grad()
def _render(G, w: torch.Tensor, batch: int = 512) -> torch.Tensor:
    dev = G.w_avg.device
    out = [G.render(w[i : i + batch].to(dev)).cpu() for i in range(0, len(w), batch)]
    return torch.cat(out) if out else torch.zeros(0, G.channels, G.size, G.size)


def _f(x: float) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _method_stats(scores, accept: np.ndarray) -> dict[str, Any]:
    n = len(scores)
    s = dcr_summary(scores.dcr)
    return {
        "n": n,
        "mean_dcr": _f(s["mean_dcr"]),
        "p05_dcr": _f(s["p05_dcr"]),
        "mean_max_id_prob": _f(scores.max_id_prob.mean()) if n else None,
        "mean_indep_id_prob": _f(scores.indep_id_prob.mean()) if n else None,
        "accept_rate": _f(accept.mean()) if n else None,
        "n_accepted": int(accept.sum()),
    }


def _utility(cfg: PlanConfig, ds: ImageDataset, x_tr, y_tr, x_te, y_te, seed: int, desc: str, device,
             progress: bool = True) -> dict[str, Any]:
    if len(x_tr) < 2:
        return {"n_train": int(len(x_tr)), "accuracy": None, "balanced_accuracy": None, "qwk": None}
    model = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes).to(device)
    spec = spec_from(cfg.classes, epochs=cfg.classes.utility_epochs, balanced=True)
    torch.manual_seed(seed)
    train_classifier(model, x_tr, y_tr, spec, seed=seed, desc=desc, recalibrate=True, progress=progress)
    pred = predict_logits(model, x_te).argmax(1).numpy()
    rep = {k: _f(v) for k, v in classification_report(y_te, pred).items()}
    rep["n_train"] = int(len(x_tr))
    return rep


def _compare_methods(cfg: PlanConfig, ds: ImageDataset, cand: dict[str, Any], exported: str,
                     utility: dict[str, Any], x_tr, x_te, y_te, device, progress: bool) -> dict[str, Any]:
    """Privacy-utility point of every method on the same anchors (the report's privacy-utility plot).

    For each method: the utility classifier trained on that method's filter-passing images
    and tested on the real test split, and the distance membership inference (pixel space,
    members = train, non-members = test) against those images: AUC with its 95 % bootstrap
    interval, |AUC - 0.5| and TPR at 1 % FPR. ``real`` is the reference *site alone*: the same
    utility recipe trained on the site's real train split (sharing those images: AUC 1).
    """
    from client.evaluate import distance_mia

    out: dict[str, Any] = {}
    for name, c in cand.items():
        idx = np.flatnonzero(c["accept"])
        if name == exported:
            util = utility["synthetic"]
        else:
            util = _utility(cfg, ds, c["images"][idx], c["labels"][idx], x_te, y_te, cfg.seed + 21,
                            f"utility ({name})", device, progress)
        mia = distance_mia(x_tr, x_te, c["images"][idx])
        out[name] = {"accuracy": util.get("accuracy"), "qwk": util.get("qwk"), "n": int(len(idx)),
                     **{k: _f(v) for k, v in mia.items()}}
    real = distance_mia(x_tr, x_te, x_tr)
    out["real"] = {"accuracy": utility["real"].get("accuracy"), "qwk": utility["real"].get("qwk"), "n": int(len(x_tr)),
                   **{k: _f(v) for k, v in real.items()}}
    return out


def run_site_pipeline(
    cfg: PlanConfig,
    dataset: ImageDataset,
    generator_ckpt: str | Path,
    out_dir: str | Path,
    method: Optional[str] = None,
    generator_round: Optional[int] = None,
    progress: bool = True,
    reporter: Optional[P.Reporter] = None,
) -> dict[str, Any]:
    """Run B1-B6 on ``dataset`` with the generator checkpoint; write ``out_dir``; return the report.

    Progress goes to ``reporter`` (its stages: :func:`pipeline_stages`), else to the active
    one (plan_shared.progress.active), else to the ``plan.progress`` log (and tqdm bars
    when ``progress``).
    """
    rep = reporter or P.current()
    own = rep is None
    rep = rep or P.Reporter(cfg.site_id, [P.LogSink()], show_bars=progress)
    rep.stages = pipeline_stages(cfg)
    try:
        with P.active(rep):
            return _run_site_pipeline(cfg, dataset, generator_ckpt, out_dir, method, generator_round, progress, rep)
    finally:
        if own:
            rep.close()


def _run_site_pipeline(cfg: PlanConfig, dataset: ImageDataset, generator_ckpt: str | Path, out_dir: str | Path,
                       method: Optional[str], generator_round: Optional[int], progress: bool,
                       rep: P.Reporter) -> dict[str, Any]:
    method = method or cfg.synthesis.method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "images").exists() and any((out / "images").rglob("*.png")):
        raise FileExistsError(f"{out}/images already holds images; choose an empty output dir")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tm = _Timer(rep)
    t_all = time.perf_counter()
    ds = dataset
    report: dict[str, Any] = {"site_id": cfg.site_id, "dataset": ds.name, "method": method, "device": str(device)}

    with tm.stage("load"):
        G = load_generator(generator_ckpt, device)
        gen_sha = generator_digest(G)  # the weights alone: the same at every site and at the coordinator
        if (G.channels, G.size) != (ds.channels, ds.size):
            raise ValueError(
                f"generator makes {G.channels}x{G.size}x{G.size} images but the data are "
                f"{ds.channels}x{ds.size}x{ds.size}; set data.size / data.channels to match"
            )
        x_tr, y_tr = to_tensor(ds.train.images), torch.as_tensor(ds.train.labels)
        x_va, y_va = to_tensor(ds.val.images), torch.as_tensor(ds.val.labels)
        x_te, y_te = to_tensor(ds.test.images), ds.test.labels
        n_train = len(x_tr)
        patient = ds.train.patient_ids  # one phi_id identity per patient where the source knows patients
        if patient is not None:
            _, id_labels = np.unique(patient, return_inverse=True)
        else:
            id_labels = np.arange(n_train)
        id_labels = torch.as_tensor(id_labels, dtype=torch.long)
        n_id = int(id_labels.max()) + 1
    report["data"] = {"n_train": n_train, "n_val": len(x_va), "n_test": len(x_te), "n_identities": n_id,
                      "identity_unit": "patient" if patient is not None else "image", "classes": ds.class_names}

    # ---------------------------------------------------------------- B1 identity models
    idc = cfg.identity
    id_spec = spec_from(idc)
    with tm.stage("phi_id"):
        torch.manual_seed(cfg.seed)
        phi_id = build_classifier(n_id, ds.channels, ds.size, idc, head="cosine").to(device)
        train_classifier(phi_id, x_tr, id_labels, id_spec, seed=cfg.seed, desc="phi_id", progress=progress, recalibrate=True)
    with tm.stage("indep_id"):
        s2 = cfg.seed + idc.indep_seed_offset
        torch.manual_seed(s2)
        indep = build_classifier(n_id, ds.channels, ds.size, idc, head="cosine", width=idc.indep_width).to(device)
        train_classifier(indep, x_tr, id_labels, id_spec, seed=s2, desc="independent id", progress=progress, recalibrate=True)
    with torch.no_grad():
        pm = lambda m, x: torch.softmax(predict_logits(m, x), 1).max(1).values  # noqa: E731
        report["identity"] = {
            "phi_id_acc_augmented_train": augmented_accuracy(phi_id, x_tr, id_labels, id_spec, seed=cfg.seed + 7),
            "phi_id_acc_train": accuracy_of(phi_id, x_tr, id_labels),
            "phi_id_mean_max_prob_members": float(pm(phi_id, x_tr).mean()),
            "phi_id_mean_max_prob_val": float(pm(phi_id, x_va).mean()) if len(x_va) else None,
            "indep_acc_augmented_train": augmented_accuracy(indep, x_tr, id_labels, id_spec, seed=cfg.seed + 8),
            "indep_mean_max_prob_members": float(pm(indep, x_tr).mean()),
            "indep_mean_max_prob_val": float(pm(indep, x_va).mean()) if len(x_va) else None,
            "embedding": "L2-normalised features of the independent identity model",
        }

    # ---------------------------------------------------------------- B2 class classifier
    with tm.stage("phi_class"):
        torch.manual_seed(cfg.seed + 1)
        phi_class = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes).to(device)
        val = (x_va, y_va) if len(x_va) else None
        hist = train_classifier(phi_class, x_tr, y_tr, spec_from(cfg.classes), val=val, seed=cfg.seed + 1,
                                desc="phi_class", progress=progress, recalibrate=True)
        report["classes"] = {
            "phi_class_val_acc": _f(accuracy_of(phi_class, x_va, y_va)) if len(x_va) else None,
            "phi_class_test_acc": _f(accuracy_of(phi_class, x_te, torch.as_tensor(y_te))),
            "best_epoch": hist["best_epoch"],
        }

    # ---------------------------------------------------------------- filter calibration
    fc = cfg.filter
    with tm.stage("calibrate"):
        # symmetric exclusion zone: every protected real image (members and held-out alike), delta
        # calibrated on a seeded part of a held-out split against all the other protected images
        split_x = {"train": x_tr, "val": x_va, "test": x_te}
        protected_x = {k: split_x[k] for k in fc.protect if len(split_x[k])}
        if "test" not in fc.protect:
            LOG.warning("filter.protect leaves out test, the non-members of the distance membership inference: "
                        "members are excluded and non-members are not, which is itself a membership signal")
        cal_split = fc.calibration_split
        if cal_split not in protected_x:
            other = next((k for k in ("val", "test") if k in protected_x), None)
            if other is None:
                raise ValueError(f"filter.protect={fc.protect}: no protected held-out split with images to calibrate delta")
            LOG.warning("calibration split %s has no images: delta is calibrated on %s", cal_split, other)
            cal_split = other
        zone = build_zone({k: embed(indep, v) for k, v in protected_x.items()}, fc.delta_quantile, cal_split,
                          fc.calibration_fraction, cfg.seed + 17, split_pixels=protected_x if fc.pixel_zone else None)
        protected_emb, protected_pix, d_pix = zone.embeddings, zone.pixels, zone.delta_pixel
        delta = zone.delta
        th = Thresholds(float(fc.tau_id), float(fc.tau_indep), delta)

    # ---------------------------------------------------------------- B3 inversion
    ic = cfg.inversion
    with tm.stage("inversion"):
        if ic.max_images is not None and ic.max_images < n_train:
            inv_idx = stratified_subsample(ds.train.labels, ic.max_images, cfg.seed)
        else:
            inv_idx = np.arange(n_train)
        t0 = time.perf_counter()
        sigma_w = w_std(G, seed=cfg.seed)
        # encoder: start from a learned encoder's E(x) (inversion.encoder) and refine, else from w_avg
        w_init, enc_rep = encoder_init(G, x_tr[inv_idx], ic, gen_sha, device, progress, cfg.seed, sigma_w)
        inv = invert(G, x_tr[inv_idx], ic, sigma_w, feature_net=phi_id, w_init=w_init, progress=progress)
        w_real, err = inv.w, inv.mse
        dt = time.perf_counter() - t0
        with torch.no_grad():
            base = (G.render(G.w_avg[None]).cpu() - x_tr[inv_idx]).pow(2).flatten(1).mean(1)
        report["inversion"] = {
            "n_inverted": int(len(inv_idx)), "n_train": n_train, "subsampled": bool(len(inv_idx) < n_train),
            "steps": inv.steps, "batch_size": ic.batch_size, "lr": ic.lr, "sigma_w": sigma_w,  # encoder: inv.steps
            "generator_evals_per_image": inv.generator_evals / max(len(inv_idx), 1), "encoder": enc_rep,  # encoder:
            "mean_mse": _f(err.mean()) if len(err) else None,
            "mean_mse_at_w_avg": _f(base.mean()),
            "seconds_per_image": _f(dt / max(len(inv_idx), 1)),
            "image_steps_per_s": _f(len(inv_idx) * inv.steps / max(dt, 1e-9)),  # encoder: inv.steps
        }

    # ---------------------------------------------------------------- B4 anchors + pairs
    with tm.stage("anchors"):
        y_inv = ds.train.labels[inv_idx]
        anc = k_same_anchors(w_real.to(device), y_inv, cfg.anchors.k)
        pairs_all = nearest_pairs(anc.anchors, anc.labels, cfg.anchors.pairs_m)
        pairs = spread_pairs(pairs_all, anc.labels, cfg.synthesis.max_paths, cfg.seed)
        report["anchors"] = anc.summary() | {
            "k": cfg.anchors.k, "pairs_m": cfg.anchors.pairs_m, "n_pairs_available": len(pairs_all), "n_paths": len(pairs),
            "skipped_class_names": [ds.class_names[c] for c in anc.skipped_classes],
        }
        for c, n in anc.skipped_classes.items():
            LOG.warning("class %s has %d inverted images < k=%d: no anchor", ds.class_names[c], n, cfg.anchors.k)
    if not pairs and method != "random":
        LOG.warning("no anchor pairs (too few images per class for k=%d): no path candidates", cfg.anchors.k)

    # ---------------------------------------------------------------- B5 paths + baselines
    nc = cfg.navigation
    T = nc.T
    cand: dict[str, dict[str, Any]] = {}
    pa = torch.as_tensor([p[0] for p in pairs], dtype=torch.long)
    pb = torch.as_tensor([p[1] for p in pairs], dtype=torch.long)
    wa, wb = anc.anchors[pa].to(device), anc.anchors[pb].to(device)
    plabels = torch.as_tensor(anc.labels[pa.numpy()] if len(pairs) else np.zeros(0, np.int64))
    with tm.stage("navigation"):
        if len(pairs):
            hist_nav: list = []
            t0 = time.perf_counter()
            full_plan = optimise_paths(
                G, phi_id, phi_class, wa, wb, plabels, T=T, steps=nc.steps, lr=nc.lr,
                weights=NavWeights(nc.lambda_dist, nc.lambda_id, nc.lambda_class), chunk=nc.chunk,
                max_offset=nc.max_offset, progress=progress, history=hist_nav, w_scale=sigma_w,
            ).cpu()
            dt = time.perf_counter() - t0
            report["navigation"] = {
                "T": T, "steps": nc.steps, "lr": nc.lr, "lambda_dist": nc.lambda_dist, "lambda_id": nc.lambda_id,
                "lambda_class": nc.lambda_class, "chunk": nc.chunk, "w_scale": sigma_w, "max_offset": nc.max_offset, "paths": len(pairs),
                "path_steps_per_s": _f(len(pairs) * nc.steps / max(dt, 1e-9)),
                "loss_first": hist_nav[0] if hist_nav else None, "loss_last": hist_nav[-1] if hist_nav else None,
            }
        else:
            full_plan = torch.zeros(0, T, G.w_dim)
        full_lin = linear_paths(wa, wb, T).cpu() if len(pairs) else torch.zeros(0, T, G.w_dim)
    n_path_cands = len(pairs) * (T - 2)
    with tm.stage("render"):
        for name, full in (("plan", full_plan), ("linear", full_lin)):
            w = full[:, 1:-1].reshape(-1, G.w_dim)
            cand[name] = {
                "images": _render(G, w),
                "labels": plabels.repeat_interleave(T - 2).numpy(),
                "path_id": np.repeat(np.arange(len(pairs)), T - 2),
                "position": np.tile(np.arange(1, T - 1), len(pairs)),
            }
        n_rand = cfg.synthesis.random_samples or max(n_path_cands, 1)
        w_r = random_samples(G, n_rand, cfg.synthesis.truncation, seed=cfg.seed + 11)
        img_r = _render(G, w_r)
        cand["random"] = {
            "images": img_r,
            "labels": predict_logits(phi_class, img_r).argmax(1).numpy(),
            "path_id": None,
            "position": None,
        }

    # ---------------------------------------------------------------- B6 filter
    with tm.stage("filter"):
        for name, c in cand.items():
            c["scores"] = score_images(c["images"], phi_id, indep, protected_emb, protected_pixels=protected_pix)
            c["accept"] = accept_mask(c["scores"], th, d_pix)
        # planted near-duplicates of train images: the blocking sensitivity test (method.md B6)
        planted_x, planted_src = plant_duplicates(x_tr, fc.planted, seed=cfg.seed + 13)
        # the planted images go through the same scoring as the candidates of the exported method
        mixed = torch.cat([cand[method]["images"], planted_x])
        mixed_scores = score_images(mixed, phi_id, indep, protected_emb, protected_pixels=protected_pix)
        mixed_accept = accept_mask(mixed_scores, th, d_pix)
        n_m = len(cand[method]["images"])
        planted_accept = mixed_accept[n_m:]
        planted_scores = mixed_scores.subset(np.arange(n_m, len(mixed)))
        assert np.array_equal(mixed_accept[:n_m], cand[method]["accept"])
        if planted_accept.any():
            LOG.error("filter FAILED its sensitivity test: %d of %d planted near-duplicates passed",
                      int(planted_accept.sum()), len(planted_accept))
        sensitivity_ok = not bool(planted_accept.any())
        blocked = (not sensitivity_ok) and fc.block_on_planted
        # diagnostic, not blocking: light copies of protected held-out images. The identity models know only
        # the train patients, so only dcr / pixel_dcr can catch these; how many are caught is reported.
        held_rows = np.flatnonzero(zone.split != "train")
        held_x = torch.cat([v for k, v in protected_x.items() if k != "train"]) if len(held_rows) else x_tr[:0]
        ph_x, ph_src = plant_duplicates(held_x, fc.planted, seed=cfg.seed + 14)
        ph_scores = score_images(ph_x, phi_id, indep, protected_emb, protected_pixels=protected_pix)
        ph_accept = accept_mask(ph_scores, th, d_pix) if len(ph_x) else np.zeros(0, bool)
        report["filter"] = {
            "sensitivity_ok": sensitivity_ok, "export_blocked": blocked,
            "tau_id": th.tau_id, "tau_indep": th.tau_indep, "delta": th.delta, "delta_quantile": fc.delta_quantile,
            "planted_total": int(len(planted_x)), "planted_rejected": int((~planted_accept).sum()),
            "planted_reject_reasons": reject_reasons(planted_scores, th, d_pix),
            "planted_mean_dcr": _f(planted_scores.dcr.mean()) if len(planted_x) else None,
            "planted_mean_max_id_prob": _f(planted_scores.max_id_prob.mean()) if len(planted_x) else None,
            "planted_heldout_total": int(len(ph_x)), "planted_heldout_rejected": int((~ph_accept).sum()),
            "planted_heldout_by_split": zone.nearest_splits(held_rows[ph_src]) if len(ph_x) else {},
            "planted_heldout_reject_reasons": reject_reasons(ph_scores, th, d_pix) if len(ph_x) else {},
            "reject_reasons": reject_reasons(cand[method]["scores"], th, d_pix),
            "delta_pixel": d_pix,
            # dcr rejections by the split of the closest protected image: members and non-members alike
            "dcr_reject_nearest_split": zone.nearest_splits(
                cand[method]["scores"].nearest[cand[method]["scores"].dcr <= th.delta]),
            "zone": zone.summary(),
            "heldout_dcr": dcr_summary(zone.calib_dcr) | {"split": cal_split, "n": int(len(zone.calib))},
        }
        report["methods"] = {name: _method_stats(c["scores"], c["accept"]) for name, c in cand.items()}
        report["methods_note"] = ("plan/linear: all interior path points of the same anchor pairs, before the "
                                  "filter; random: plain GAN samples (truncation %.2f) labelled by phi_class"
                                  % cfg.synthesis.truncation)

    # ---------------------------------------------------------------- export
    with tm.stage("export"):
        c = cand[method]
        passed_idx = np.flatnonzero(c["accept"])  # per-image thresholds
        acc_idx = passed_idx[:0] if blocked else passed_idx
        if blocked:
            LOG.error("export blocked: the filter let planted near-duplicates through (filter.block_on_planted)")
        imgs8 = to_uint8_hwc(c["images"][acc_idx]) if len(acc_idx) else np.zeros((0,))
        records: list[ImageRecord] = []
        cnames = safe_class_names(ds.class_names)  # the source's names, as folder/record names
        for j, i in enumerate(acc_idx):
            s = c["scores"]
            assert s.max_id_prob[i] < th.tau_id and s.indep_id_prob[i] < th.tau_indep and s.dcr[i] > th.delta
            assert d_pix is None or s.pixel_dcr[i] > d_pix
            label = int(c["labels"][i])
            cname = cnames[label]
            if c["path_id"] is not None:
                pid, pos = int(c["path_id"][i]), int(c["position"][i])
                iid = f"{method}_p{pid:04d}_t{pos:03d}"
            else:
                pid = pos = None
                iid = f"{method}_{int(i):05d}"
            rel = ImageRecord.expected_file(cname, iid)
            save_png(imgs8[j], out / rel)
            rec = ImageRecord(
                id=iid, file=rel, sha256=file_sha256(out / rel), label=label, class_name=cname, method=method,
                path_id=pid, position=pos, max_id_prob=float(s.max_id_prob[i]), indep_id_prob=float(s.indep_id_prob[i]),
                dcr=float(s.dcr[i]), thresholds=th,
            )
            assert rec.passes(), rec.failures()
            records.append(rec)
        man = SiteManifest(
            site_id=cfg.site_id, generator_sha256=gen_sha, config_sha256=cfg.digest(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), images=records,
            generator_round=generator_round,
        )
        write_site_manifest(out / "manifest.json", man)

    # ---------------------------------------------------------------- utility
    with tm.stage("utility"):
        # on the images that pass the per-image filter (= the exported ones unless export is blocked)
        xs = c["images"][passed_idx]
        ys = c["labels"][passed_idx]
        report["utility"] = {
            "synthetic": _utility(cfg, ds, xs, ys, x_te, y_te, cfg.seed + 21, "utility (synthetic)", device, progress),
            "real": _utility(cfg, ds, x_tr, y_tr.numpy(), x_te, y_te, cfg.seed + 21, "utility (real)", device, progress),
            "classifier": "classes-section architecture, utility_epochs, class-balanced sampling, tested on the real test split",
            "synthetic_set": "images passing the per-image filter" + (" (export blocked: not exported)" if blocked else ""),
        }
        report["utility"]["synthetic"]["per_class_train"] = {ds.class_names[k]: int((ys == k).sum()) for k in range(ds.num_classes)}

    # ---------------------------------------------------------------- per-method comparison
    if cfg.synthesis.compare:
        with tm.stage("compare"):
            report["compare"] = _compare_methods(cfg, ds, cand, method, report["utility"], x_tr, x_te, y_te,
                                                 device, progress)

    # ---------------------------------------------------------------- figures
    with tm.stage("figures"):
        rows = []
        for p in range(min(cfg.synthesis.strip_pairs, len(pairs))):
            for name, full in (("linear", full_lin), ("plan", full_plan)):
                img = _render(G, full[p])
                sc = score_images(img, phi_id, indep, protected_emb)
                rows.append({"title": f"{name} #{p} ({ds.class_names[int(plabels[p])]})", "images": img,
                             "id_prob": sc.max_id_prob, "dcr": sc.dcr})
        figs = {}
        if rows:
            figs["path_strips"] = path_strips(rows, out / "path_strips.png").name
        show = c["images"][acc_idx] if len(acc_idx) else c["images"]
        if len(show):
            figs["samples"] = sample_grid(show, out / "samples.png").name
        series = {k: cand[k]["scores"].dcr for k in ("plan", "linear") if len(cand[k]["scores"])}
        series[f"real {cal_split} (calibration)"] = zone.calib_dcr
        figs["dcr_hist"] = dcr_histogram(series, th.delta, out / "dcr_hist.png").name
        report["figures"] = figs

    report["n_candidates"] = int(len(c["images"]))
    report["n_accepted"] = int(len(acc_idx))
    report["generator"] = {"checkpoint": str(generator_ckpt), "sha256": gen_sha, "round": generator_round}
    report["config_sha256"] = cfg.digest()
    tm.timing["total"] = round(time.perf_counter() - t_all, 2)
    report["timing"] = tm.timing
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return report


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _f(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
