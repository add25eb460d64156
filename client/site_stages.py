"""The stages of the site pipeline (method.md B1-B6), each callable on its own.

client/pipeline.py runs them in this order (one progress/timing stage each, names in
brackets); every stage takes typed inputs and returns a typed result carrying its
report section (client/site_report.py):

=====================  =====================================  ==========================
stage                  function                               returns
=====================  =====================================  ==========================
[load]                 :func:`load_generator`,                :class:`SiteGenerator`,
                       :func:`load_site_data`                 :class:`SiteData`
B1 [phi_id, indep_id]  :func:`train_identity_model` (twice),  :class:`IdentityModels`
                       :func:`identity_section`
B2 [phi_class]         :func:`train_class_model`              :class:`ClassModel`
[calibrate]            :func:`calibrate_filter`               :class:`Calibration`
B3 [inversion]         :func:`invert_train_images`            :class:`Inversion`
B4 [anchors]           :func:`anchor_pairs`                   :class:`AnchorPairs`
B5 [navigation]        :func:`navigate_paths`                 :class:`Paths`
B5 [render]            :func:`render_candidates`              ``dict[Method, Candidates]``
B6 [filter]            :func:`filter_candidates`              :class:`FilterOutcome`
[compare]              :func:`compare_methods`,               :class:`Comparison`,
                       :func:`verdict_of`                     the verdict (report key verdict)
[export]               :func:`filter_for_export`,             :class:`SiteManifest`
                       :func:`write_site_dir`
[utility]              :func:`utility_of_site`                :class:`UtilitySection`
[figures]              :func:`write_figures`                  figure names
=====================  =====================================  ==========================

The privacy invariants (an exported record passes its own thresholds; the planted test
scored the exported candidates exactly as the filter did) raise
:class:`PrivacyInvariantError`, never ``assert`` (which ``python -O`` removes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.site_report import (
    UTILITY_RECIPE,
    AnchorsSection,
    ClassesSection,
    ComparePoint,
    DataSection,
    FilterSection,
    IdentitySection,
    InversionSection,
    MethodStats,
    NavigationSection,
    UtilityScore,
    UtilitySection,
    finite,
)
from plan_shared.anchors import AnchorResult, WCentre, build_anchors, w_centre
from plan_shared.classifiers import (
    accuracy_of,
    augmented_accuracy,
    build_classifier,
    embed,
    predict_logits,
    spec_from,
    train_classifier,
)
from plan_shared.config import METHODS, SYNTHESIS_METHODS, Method, PlanConfig, SynthesisMethod
from plan_shared.data import ImageDataset, stratified_subsample, to_tensor
from plan_shared.encoder import EncoderPayload, encoder_init
from plan_shared.files import file_sha256
from plan_shared.gan import generator_digest
from plan_shared.gan import load_generator as load_generator_checkpoint
from plan_shared.imaging import save_png, to_uint8_hwc
from plan_shared.inversion import invert
from plan_shared.manifest import (
    ImageRecord,
    SiteManifest,
    Thresholds,
    safe_class_names,
    write_site_manifest,
)
from plan_shared.metrics import classification_report, dcr_summary
from plan_shared.models import build_generator
from plan_shared.models.classifier import Classifier
from plan_shared.models.generator import StyleGenerator
from plan_shared.navigation import draw_to_class_quotas, linear_paths, optimise_paths, path_styles, random_samples, w_std
from plan_shared.plots import dcr_histogram, path_strips, sample_grid
from plan_shared.pool_plan import plan_paths
from plan_shared.prevalence import prevalence_selection
from plan_shared.privacy import (
    ExclusionZone,
    IdentitySet,
    Scores,
    accept_mask,
    build_zone,
    identity_set,
    plant_duplicates,
    reject_reasons,
    score_images,
    zone_rows,
)
from plan_shared.runtime import site_seed
from plan_shared.variety import export_coverage, fixed_precision_recall, method_precision_recall, plan_verdict

LOG = logging.getLogger("plan.pipeline")
Split = str  # "train" | "val" | "test"


class PrivacyInvariantError(RuntimeError):
    """A privacy guarantee of the pipeline does not hold; nothing (more) is exported."""


def check_method(method: str) -> Method:
    """``method`` as a :data:`~plan_shared.config.Method`; ValueError naming the value otherwise."""
    for m in METHODS:
        if method == m:
            return m
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def check_requested_method(method: str) -> SynthesisMethod:
    """autoexport: ``method`` as a synthesis.method value (a method or ``auto``); ValueError naming the value."""
    for m in SYNTHESIS_METHODS:
        if method == m:
            return m
    raise ValueError(f"method must be one of {SYNTHESIS_METHODS}, got {method!r}")


# ---------------------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class GeneratorSnapshot:
    """A generator held in memory: its G_ema weights (keys with or without the ``g_ema.`` prefix) and image shape.

    What the coordinator sends a site; the pipeline builds the network from the site's
    ``generator`` config section, with no checkpoint file in between.
    """

    state: Mapping[str, torch.Tensor]
    channels: int
    size: int
    encoder: EncoderPayload | None = None  # the coordinator's inversion encoder for this G (inversion.encoder.train_at)

    def weights(self) -> dict[str, torch.Tensor]:
        p = "g_ema."
        if any(k.startswith(p) for k in self.state):
            return {k[len(p):]: v for k, v in self.state.items() if k.startswith(p)}
        return dict(self.state)

    def digest(self) -> str:
        return generator_digest(self.weights())


GeneratorSource = str | Path | GeneratorSnapshot


@dataclass
class SiteGenerator:
    G: StyleGenerator
    sha256: str  # weights only (plan_shared.gan.generator_digest)
    checkpoint: str | None  # the file it came from; None for a snapshot
    encoder: EncoderPayload | None = None  # shipped with a snapshot; checked against sha256 where it is used


def load_generator(cfg: PlanConfig, source: GeneratorSource, ds: ImageDataset, device: torch.device) -> SiteGenerator:
    """The EMA generator from a checkpoint path or an in-memory snapshot, checked against the data's shape."""
    if isinstance(source, GeneratorSnapshot):
        if (source.channels, source.size) != (ds.channels, ds.size):
            raise ValueError(
                f"the generator snapshot makes {source.channels}x{source.size}x{source.size} images but the data are "
                f"{ds.channels}x{ds.size}x{ds.size}; set data.size / data.channels to match"
            )
        G = build_generator(cfg, source.size, source.channels)
        try:
            G.load_state_dict(source.weights(), strict=True)
        except RuntimeError as err:
            raise ValueError(f"the generator snapshot does not fit this site's generator config section: {err}") from None
        G = G.to(device).eval().requires_grad_(False)
        checkpoint = None
    else:
        G = load_generator_checkpoint(source, device)
        checkpoint = str(source)
    if (G.channels, G.size) != (ds.channels, ds.size):
        raise ValueError(
            f"generator makes {G.channels}x{G.size}x{G.size} images but the data are "
            f"{ds.channels}x{ds.size}x{ds.size}; set data.size / data.channels to match"
        )
    shipped = source.encoder if isinstance(source, GeneratorSnapshot) else None
    return SiteGenerator(G, generator_digest(G), checkpoint, shipped)  # the digest: the same at every site and at the coordinator


@dataclass
class SiteData:
    """The site's real splits as tensors, and phi_id's identity labels (one per patient, else one per image)."""

    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_va: torch.Tensor
    y_va: torch.Tensor
    x_te: torch.Tensor
    y_te: np.ndarray
    id_labels: torch.Tensor
    n_id: int
    identity_unit: str  # "patient" | "image"
    class_names: list[str]
    heldout_patients: dict[str, np.ndarray | None] = field(default_factory=dict)  # val/test patient ids, if known

    def section(self) -> DataSection:
        return DataSection(len(self.x_tr), len(self.x_va), len(self.x_te), self.n_id, self.identity_unit,
                           list(self.class_names))


def load_site_data(ds: ImageDataset) -> SiteData:
    patient = ds.train.patient_ids  # one phi_id identity per patient where the source knows patients
    if patient is not None:
        _, ids = np.unique(patient, return_inverse=True)
    else:
        ids = np.arange(len(ds.train))
    id_labels = torch.as_tensor(ids.reshape(-1), dtype=torch.long)
    return SiteData(
        x_tr=to_tensor(ds.train.images), y_tr=torch.as_tensor(ds.train.labels),
        x_va=to_tensor(ds.val.images), y_va=torch.as_tensor(ds.val.labels),
        x_te=to_tensor(ds.test.images), y_te=ds.test.labels,
        id_labels=id_labels, n_id=int(id_labels.max()) + 1 if len(id_labels) else 0,
        identity_unit="patient" if patient is not None else "image", class_names=list(ds.class_names),
        heldout_patients={"val": ds.val.patient_ids, "test": ds.test.patient_ids},
    )


# ---------------------------------------------------------------------------------------------- B1 identity
@dataclass
class IdentityModels:
    phi_id: Classifier  # navigation's identity term and the filter's max_id_prob
    indep: Classifier  # independent model: the filter's second opinion and its embedding


def identity_training_set(cfg: PlanConfig, data: SiteData) -> IdentitySet:
    """The identity models' classes (``filter.identity_classes``; plan_shared.privacy.identity_set): by default
    every protected identity of the exclusion zone's reference set, so the identity checks and L_id treat
    members and non-members alike; the calibration rows are the ones :func:`calibrate_filter` draws."""
    protected_x, cal_split = protected_splits(cfg, data)
    fc = cfg.filter
    rows = zone_rows({k: len(v) for k, v in protected_x.items()}, cal_split, fc.calibration_fraction, cfg.seed + 17)
    return identity_set(protected_x, data.id_labels, rows, fc.identity_classes, data.heldout_patients)


def train_identity_model(cfg: PlanConfig, ds: ImageDataset, data: SiteData, device: torch.device, progress: bool,
                         independent: bool = False) -> Classifier:
    """phi_id (or, ``independent``, the second identity model: its own seed and width) on
    :func:`identity_training_set` (train identities first, with their labels in ``data.id_labels``)."""
    idc = cfg.identity
    seed = cfg.seed + idc.indep_seed_offset if independent else cfg.seed
    torch.manual_seed(seed)
    width = {"width": idc.indep_width} if independent else {}
    ids = identity_training_set(cfg, data)  # mia: one class per protected identity (filter.identity_classes)
    model = build_classifier(ids.n_classes, ds.channels, ds.size, idc, head="cosine", **width).to(device)
    train_classifier(model, ids.x, ids.labels, spec_from(idc), seed=seed,
                     desc="independent id" if independent else "phi_id", progress=progress, recalibrate=True)
    return model


@torch.no_grad()
def identity_section(cfg: PlanConfig, data: SiteData, ids: IdentityModels) -> IdentitySection:
    spec = spec_from(cfg.identity)

    def mean_max_prob(m: Classifier, x: torch.Tensor) -> float:
        return float(torch.softmax(predict_logits(m, x), 1).max(1).values.mean())

    idset = identity_training_set(cfg, data)  # mia: the *_val probabilities are over images in no class
    unseen = idset.unseen
    has_val = len(unseen) > 0
    return IdentitySection(
        phi_id_acc_augmented_train=augmented_accuracy(ids.phi_id, data.x_tr, data.id_labels, spec, seed=cfg.seed + 7),
        phi_id_acc_train=accuracy_of(ids.phi_id, data.x_tr, data.id_labels),
        phi_id_mean_max_prob_members=mean_max_prob(ids.phi_id, data.x_tr),
        phi_id_mean_max_prob_val=mean_max_prob(ids.phi_id, unseen) if has_val else None,
        indep_acc_augmented_train=augmented_accuracy(ids.indep, data.x_tr, data.id_labels, spec, seed=cfg.seed + 8),
        indep_mean_max_prob_members=mean_max_prob(ids.indep, data.x_tr),
        indep_mean_max_prob_val=mean_max_prob(ids.indep, unseen) if has_val else None,
        identity_classes=idset.mode, n_identity_classes=idset.n_classes, identity_classes_by_split=idset.by_split,
    )


# ---------------------------------------------------------------------------------------------- B2 class
@dataclass
class ClassModel:
    phi_class: Classifier
    section: ClassesSection


def train_class_model(cfg: PlanConfig, ds: ImageDataset, data: SiteData, device: torch.device,
                      progress: bool) -> ClassModel:
    torch.manual_seed(cfg.seed + 1)
    phi_class = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes).to(device)
    val = (data.x_va, data.y_va) if len(data.x_va) else None
    hist = train_classifier(phi_class, data.x_tr, data.y_tr, spec_from(cfg.classes), val=val, seed=cfg.seed + 1,
                            desc="phi_class", progress=progress, recalibrate=True)
    return ClassModel(phi_class, ClassesSection(
        phi_class_val_acc=finite(accuracy_of(phi_class, data.x_va, data.y_va)) if len(data.x_va) else None,
        phi_class_test_acc=finite(accuracy_of(phi_class, data.x_te, torch.as_tensor(data.y_te))),
        best_epoch=hist["best_epoch"],
    ))


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """The symmetric exclusion zone and the thresholds every candidate is held to."""

    zone: ExclusionZone
    thresholds: Thresholds
    protected_x: dict[str, torch.Tensor]  # the protected real images per split
    split: Split  # the held-out split delta was calibrated on

    @property
    def delta_pixel(self) -> float | None:
        return self.zone.delta_pixel


def protected_splits(cfg: PlanConfig, data: SiteData, warn: bool = False) -> tuple[dict[str, torch.Tensor], Split]:
    """The protected real images per split (``filter.protect`` in its order, empty splits left out) and the
    held-out split delta is calibrated on (``filter.calibration_split``, else the first protected held-out
    split with images). ValueError when no protected held-out split has images."""
    fc = cfg.filter
    split_x = {"train": data.x_tr, "val": data.x_va, "test": data.x_te}
    protected_x: dict[str, torch.Tensor] = {k: split_x[k] for k in fc.protect if len(split_x[k])}
    if warn and "test" not in fc.protect:
        LOG.warning("filter.protect leaves out test, the non-members of the distance membership inference: "
                    "members are excluded and non-members are not, which is itself a membership signal")
    cal_split = fc.calibration_split
    if cal_split not in protected_x:
        other = next((k for k in ("val", "test") if k in protected_x), None)
        if other is None:
            raise ValueError(f"filter.protect={fc.protect}: no protected held-out split with images to calibrate delta")
        if warn:
            LOG.warning("calibration split %s has no images: delta is calibrated on %s", cal_split, other)
        cal_split = other
    return protected_x, cal_split


def calibrate_filter(cfg: PlanConfig, data: SiteData, indep: Classifier) -> Calibration:
    """Every protected real image (members and held-out alike) in the zone; delta calibrated on a seeded
    part of a held-out split against all the other protected images (the rows that
    :func:`identity_training_set` leaves out of every identity class)."""
    fc = cfg.filter
    protected_x, cal_split = protected_splits(cfg, data, warn=True)
    zone = build_zone({k: embed(indep, v) for k, v in protected_x.items()}, fc.delta_quantile, cal_split,
                      fc.calibration_fraction, cfg.seed + 17, split_pixels=protected_x if fc.pixel_zone else None)
    return Calibration(zone, Thresholds(float(fc.tau_id), float(fc.tau_indep), zone.delta), protected_x, cal_split)


# ---------------------------------------------------------------------------------------------- B3 inversion
@dataclass
class Inversion:
    idx: np.ndarray  # train rows inverted (a stratified subsample under inversion.max_images)
    w: torch.Tensor  # their latents: never leave the site
    labels: np.ndarray
    sigma_w: float  # the generator's W scale (inversion lr and navigation offsets are in its units)
    section: InversionSection
    centre: WCentre | None = None  # recall: G's w_avg and sample radius, for anchors.spread


def invert_train_images(cfg: PlanConfig, ds: ImageDataset, data: SiteData, G: StyleGenerator,
                        phi_id: Classifier, generator_sha256: str, device: torch.device, progress: bool,
                        encoder: EncoderPayload | None = None) -> Inversion:
    """B3: the train images (or a stratified subsample) in W; from a learned encoder's E(x) with a few
    refinement steps when ``inversion.encoder.enabled``, else from w_avg (plan_shared.inversion).
    ``encoder``: the one shipped with G (used instead of training one here; its digest must match)."""
    ic = cfg.inversion
    n_train = len(data.x_tr)
    if ic.max_images is not None and ic.max_images < n_train:
        idx = stratified_subsample(ds.train.labels, ic.max_images, cfg.seed)
    else:
        idx = np.arange(n_train)
    t0 = time.perf_counter()
    sigma_w = w_std(G, seed=cfg.seed)
    x = data.x_tr[idx]
    w_init, enc_rep = encoder_init(G, x, ic, generator_sha256, device, progress, cfg.seed, sigma_w, encoder,
                                   feature_net=phi_id)
    res = invert(G, x, ic, sigma_w, feature_net=phi_id, w_init=w_init, progress=progress)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        base = (G.render(G.w_avg[None]).cpu() - x).pow(2).flatten(1).mean(1)
    return Inversion(idx, res.w, ds.train.labels[idx], sigma_w, InversionSection(
        n_inverted=len(idx), n_train=n_train, subsampled=bool(len(idx) < n_train),
        steps=res.steps, batch_size=ic.batch_size, lr=ic.lr, sigma_w=sigma_w,
        mean_mse=finite(res.mse.mean()) if len(res.mse) else None,
        mean_mse_at_w_avg=finite(base.mean()),
        seconds_per_image=finite(dt / max(len(idx), 1)),
        image_steps_per_s=finite(len(idx) * res.steps / max(dt, 1e-9)),
        generator_evals_per_image=finite((res.generator_evals + int(enc_rep.get("adapt_generator_evals") or 0))
                                         / max(len(idx), 1)),  # refinement + the site's adaptation of E
        encoder=enc_rep,
    ), centre=w_centre(G, cfg.synthesis.truncation, seed=cfg.seed))  # recall: anchors.spread rescales around G's w_avg


# ---------------------------------------------------------------------------------------------- B4 anchors
@dataclass
class AnchorPairs:
    anchors: AnchorResult
    pairs: list[tuple[int, int]]  # rows of anchors.anchors: each a PLAN / linear path
    section: AnchorsSection


def anchor_pairs(cfg: PlanConfig, ds: ImageDataset, inv: Inversion, device: torch.device) -> AnchorPairs:
    anc = build_anchors(inv.w.to(device), inv.labels, cfg.anchors, inv.centre)  # fullpool: groups; recall: spread
    # fullpool: paths per class planned from the site's train priors for a full-size pool (plan_shared/pool_plan.py)
    plan = plan_paths(anc, ds.train.labels, ds.num_classes, cfg.navigation.T - 2, cfg.synthesis, cfg.anchors, cfg.seed)
    for c, n in anc.skipped_classes.items():
        LOG.warning("class %s has %d inverted images < k=%d: no anchor", ds.class_names[c], n, cfg.anchors.k)
    return AnchorPairs(anc, [(int(a), int(b)) for a, b in plan.pairs], AnchorsSection(
        summary=anc.summary() | plan.summary(), k=cfg.anchors.k, pairs_m=cfg.anchors.pairs_m,  # fullpool: plan_* keys
        n_pairs_available=int(sum(plan.available)), n_paths=len(plan.pairs),
        skipped_class_names=[ds.class_names[c] for c in anc.skipped_classes],
    ))


# ---------------------------------------------------------------------------------------------- B5 paths
@dataclass
class Paths:
    plan: torch.Tensor  # [P, T, w_dim] PLAN paths, endpoints included
    linear: torch.Tensor  # [P, T, w_dim] the straight baseline between the same anchors
    labels: torch.Tensor  # [P] class of each path
    section: NavigationSection | None  # None when there is no pair


def navigate_paths(cfg: PlanConfig, G: StyleGenerator, phi_id: Classifier, phi_class: Classifier,
                   ap: AnchorPairs, sigma_w: float, device: torch.device, progress: bool) -> Paths:
    nc = cfg.navigation
    T, pairs, anc = nc.T, ap.pairs, ap.anchors
    pa = torch.as_tensor([p[0] for p in pairs], dtype=torch.long)
    pb = torch.as_tensor([p[1] for p in pairs], dtype=torch.long)
    wa, wb = anc.anchors[pa].to(device), anc.anchors[pb].to(device)
    labels = torch.as_tensor(anc.labels[pa.numpy()] if len(pairs) else np.zeros(0, np.int64))
    section = None
    if len(pairs):
        t0 = time.perf_counter()
        res = optimise_paths(G, phi_id, phi_class, wa, wb, labels, nc, w_scale=sigma_w, progress=progress, seed=cfg.seed)
        plan, hist = res.paths.cpu(), res.history
        dt = time.perf_counter() - t0
        steps_run = int(res.steps_run.sum())  # path-steps actually run (fewer than paths x steps with early stopping)
        section = NavigationSection(
            T=T, steps=nc.steps, lr=nc.lr, lambda_dist=nc.lambda_dist, lambda_id=nc.lambda_id,
            lambda_class=nc.lambda_class, chunk=nc.chunk,
            objective=nc.model_dump(include={"class_target", "eot_samples", "lambda_smooth", "layers", "fine_from",
                                             "trust_ratio"}),  # wplus: layers; artefacts: trust_ratio
            w_scale=sigma_w, max_offset=nc.max_offset,
            paths=len(pairs), path_steps_per_s=finite(steps_run / max(dt, 1e-9)),
            loss_first=hist[0] if hist else None, loss_last=hist[-1] if hist else None,
            steps_run_mean=float(res.steps_run.float().mean()), shards=res.shards,
        )
    else:
        plan = torch.zeros(0, T, G.w_dim)
    linear = linear_paths(wa, wb, T).cpu() if len(pairs) else torch.zeros(0, T, G.w_dim)
    return Paths(plan, linear, labels, section)


@dataclass
class Candidates:
    """One method's candidate images before the filter, with where each comes from."""

    method: Method
    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    labels: np.ndarray  # [N] int: the path's class (plan, linear) or phi_class's prediction (random)
    path_id: np.ndarray | None  # [N] path of each image; None for random samples
    position: np.ndarray | None  # [N] interior position 1..T-2 on its path; None for random samples
    draw: dict[str, Any] | None = None  # random: how the samples were drawn (random_candidates)

    def __len__(self) -> int:
        return len(self.images)

    def image_id(self, i: int) -> str:
        """The record id of candidate ``i`` (its file name in the site directory)."""
        if self.path_id is not None and self.position is not None:
            return f"{self.method}_p{int(self.path_id[i]):04d}_t{int(self.position[i]):03d}"
        return f"{self.method}_{int(i):05d}"


@torch.no_grad()
def render(G: StyleGenerator, w: torch.Tensor, batch: int = 512) -> torch.Tensor:
    dev = G.w_avg.device
    out = [G.render(w[i : i + batch].to(dev)).cpu() for i in range(0, len(w), batch)]
    return torch.cat(out) if out else torch.zeros(0, G.channels, G.size, G.size)


def render_candidates(cfg: PlanConfig, G: StyleGenerator, paths: Paths,
                      phi_class: Classifier) -> dict[Method, Candidates]:
    """Every interior path point of PLAN and linear, and as many random GAN samples (or synthesis.random_samples),
    drawn to PLAN's class counts by default (:func:`random_candidates`)."""
    n_paths, T = len(paths.plan), cfg.navigation.T
    cand: dict[Method, Candidates] = {}
    for name, full in (("plan", paths.plan), ("linear", paths.linear)):
        m = check_method(name)
        styles = path_styles(G, full, cfg.navigation)  # wplus: W, or W+ with the fine layers on the linear path
        cand[m] = Candidates(
            m, render(G, styles[:, 1:-1].flatten(0, 1)), paths.labels.repeat_interleave(T - 2).numpy(),
            np.repeat(np.arange(n_paths), T - 2), np.tile(np.arange(1, T - 1), n_paths),
        )
    cand["random"] = random_candidates(cfg, G, phi_class, cand["plan"].labels)
    return cand


def random_candidates(cfg: PlanConfig, G: StyleGenerator, phi_class: Classifier, path_labels: np.ndarray) -> Candidates:
    """The random baseline, labelled by phi_class: drawn to the path methods' class counts
    (synthesis.random_per_class) or unconditionally; ``draw`` says what was asked and drawn."""
    syn = cfg.synthesis
    n_rand = syn.random_samples or max(len(path_labels), 1)
    # every site draws its own random samples (the shared G and seed would give each site the same ones)
    seed = site_seed(cfg.seed, cfg.site_id) + 11

    def render_and_label(w: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        img = render(G, w)
        return img, predict_logits(phi_class, img).argmax(1).numpy()

    if not syn.random_per_class:
        img_r, lab = render_and_label(random_samples(G, n_rand, syn.truncation, seed=seed))
        return Candidates("random", img_r, lab, None, None, {"per_class": False, "drawn": n_rand})
    counts = np.bincount(np.asarray(path_labels, dtype=np.int64), minlength=phi_class.num_classes)
    if counts.sum() == 0:  # no paths: nothing to match, a share per class
        counts = np.ones(phi_class.num_classes, np.int64)
    quota = np.floor(counts * n_rand / counts.sum()).astype(np.int64)
    quota[np.argsort(-(counts * n_rand / counts.sum() - quota), kind="stable")[: n_rand - int(quota.sum())]] += 1
    d = draw_to_class_quotas(G, quota.tolist(), render_and_label, syn.truncation, seed,
                             max_draws=int(np.ceil(syn.random_max_draws * n_rand)), give_up=syn.random_give_up)
    if d.kept != d.quota:
        LOG.warning("%s: random baseline short of its class quotas after %d draws (%s): kept %s of %s",
                    cfg.site_id, d.drawn, d.stopped, d.kept, d.quota)
    return Candidates("random", d.images, d.labels, None, None,
                      {"per_class": True, "drawn": d.drawn, "quota_per_class": d.quota, "stopped": d.stopped})


# ---------------------------------------------------------------------------------------------- B6 filter
@dataclass
class FilterOutcome:
    scores: dict[Method, Scores]
    accept: dict[Method, np.ndarray]  # per-image thresholds passed
    sensitivity_ok: bool  # no planted near-duplicate of a train image passed
    blocked: bool  # sensitivity failed and filter.block_on_planted: nothing is exported
    section: FilterSection
    methods: dict[str, MethodStats]
    planted_checked: list[Method] = field(default_factory=list)  # methods scored in the planted test's batch

    def passed(self, method: Method) -> np.ndarray:
        """Rows of ``method``'s candidates that pass the per-image filter."""
        return np.flatnonzero(self.accept[method])

    def exported(self, method: Method) -> np.ndarray:
        """Rows that are exported: the passing ones, none when the export is blocked."""
        idx = self.passed(method)
        return idx[:0] if self.blocked else idx


def method_stats(scores: Scores, accept: np.ndarray, cand: Candidates | None = None,
                 num_classes: int = 1) -> MethodStats:
    n = len(scores)
    s = dcr_summary(scores.dcr)
    draw = cand.draw if cand is not None and cand.draw is not None else {}
    return MethodStats(
        n=n, mean_dcr=finite(s["mean_dcr"]), p05_dcr=finite(s["p05_dcr"]),
        mean_max_id_prob=finite(scores.max_id_prob.mean()) if n else None,
        mean_indep_id_prob=finite(scores.indep_id_prob.mean()) if n else None,
        accept_rate=finite(accept.mean()) if n else None, n_accepted=int(accept.sum()),
        candidates_per_class=(np.bincount(np.asarray(cand.labels, np.int64), minlength=num_classes).astype(int).tolist()
                              if cand is not None else None),
        drawn=int(draw["drawn"]) if "drawn" in draw else None,
        quota_per_class=list(draw["quota_per_class"]) if "quota_per_class" in draw else None,
        stopped=str(draw["stopped"]) if "stopped" in draw else None,
    )


def filter_candidates(cfg: PlanConfig, method: Method | None, cand: Mapping[Method, Candidates],
                      ids: IdentityModels, cal: Calibration, data: SiteData) -> FilterOutcome:
    """Score every candidate; test the filter on planted near-duplicates (method.md B6).

    The planted duplicates of train images go through the same scoring as the exported
    method's candidates (one batch); the candidates' verdicts in that batch must equal
    their own (PrivacyInvariantError otherwise). ``method`` None (synthesis.method auto: the
    export method is chosen after the compare stage): every method's candidates and the planted
    duplicates are scored in one batch, each method's scores are its rows of that batch (so the
    planted test scored whichever method is exported, at no extra scoring), and the exported
    method's reject reasons come with :func:`filter_for_export`.
    Planted copies of held-out images are a diagnostic (with ``filter.identity_classes="train"``
    only dcr / pixel_dcr can catch them).
    """
    fc, th, d_pix, zone = cfg.filter, cal.thresholds, cal.delta_pixel, cal.zone

    def score(x: torch.Tensor) -> Scores:
        return score_images(x, ids.phi_id, ids.indep, zone.embeddings, protected_pixels=zone.pixels)

    planted_x, _ = plant_duplicates(data.x_tr, fc.planted, seed=cfg.seed + 13)
    if method is None:  # autoexport: one batch of every method's candidates and the planted duplicates
        checked = list(cand)
        mixed = torch.cat([*(cand[m].images for m in checked), planted_x])
        mixed_scores = score(mixed)
        mixed_accept = accept_mask(mixed_scores, th, d_pix)
        ends = np.cumsum([len(cand[m]) for m in checked])
        rows = {m: np.arange(e - len(cand[m]), e) for m, e in zip(checked, ends, strict=True)}
        scores = {m: mixed_scores.subset(r) for m, r in rows.items()}
        accept = {m: mixed_accept[r] for m, r in rows.items()}
        n_m = int(ends[-1]) if len(ends) else 0
    else:
        checked = [method]
        scores = {name: score(c.images) for name, c in cand.items()}
        accept = {name: accept_mask(s, th, d_pix) for name, s in scores.items()}
        mixed = torch.cat([cand[method].images, planted_x])
        mixed_scores = score(mixed)
        mixed_accept = accept_mask(mixed_scores, th, d_pix)
        n_m = len(cand[method])
        if not np.array_equal(mixed_accept[:n_m], accept[method]):
            raise PrivacyInvariantError(
                f"the planted test scored the {method} candidates differently from the filter "
                f"({int((mixed_accept[:n_m] != accept[method]).sum())} of {n_m} verdicts differ): its result says "
                "nothing about the exported images; nothing is exported")
    planted_accept = mixed_accept[n_m:]
    planted_scores = mixed_scores.subset(np.arange(n_m, len(mixed)))
    if planted_accept.any():
        LOG.error("filter FAILED its sensitivity test: %d of %d planted near-duplicates passed",
                  int(planted_accept.sum()), len(planted_accept))
    sensitivity_ok = not bool(planted_accept.any())
    blocked = (not sensitivity_ok) and fc.block_on_planted
    held_rows = np.flatnonzero(zone.split != "train")
    held_x = torch.cat([v for k, v in cal.protected_x.items() if k != "train"]) if len(held_rows) else data.x_tr[:0]
    ph_x, ph_src = plant_duplicates(held_x, fc.planted, seed=cfg.seed + 14)
    ph_scores = score(ph_x)
    ph_accept = accept_mask(ph_scores, th, d_pix) if len(ph_x) else np.zeros(0, bool)
    section = FilterSection(
        sensitivity_ok=sensitivity_ok, export_blocked=blocked,
        tau_id=th.tau_id, tau_indep=th.tau_indep, delta=th.delta, delta_quantile=fc.delta_quantile,
        planted_total=len(planted_x), planted_rejected=int((~planted_accept).sum()),
        planted_reject_reasons=reject_reasons(planted_scores, th, d_pix),
        planted_mean_dcr=finite(planted_scores.dcr.mean()) if len(planted_x) else None,
        planted_mean_max_id_prob=finite(planted_scores.max_id_prob.mean()) if len(planted_x) else None,
        planted_heldout_total=len(ph_x), planted_heldout_rejected=int((~ph_accept).sum()),
        planted_heldout_by_split=zone.nearest_splits(held_rows[ph_src]) if len(ph_x) else {},
        planted_heldout_reject_reasons=reject_reasons(ph_scores, th, d_pix) if len(ph_x) else {},
        reject_reasons={}, delta_pixel=d_pix, dcr_reject_nearest_split={},  # the exported method's: filter_for_export
        zone=zone.summary(),
        heldout_dcr=dcr_summary(zone.calib_dcr) | {"split": cal.split, "n": len(zone.calib)},
    )
    n_cls = max([int(c.labels.max()) + 1 for c in cand.values() if len(c)]
                + [len(c.draw.get("quota_per_class", ())) for c in cand.values() if c.draw], default=1)
    methods = {str(name): method_stats(scores[name], accept[name], cand[name], n_cls) for name in cand}
    out = FilterOutcome(scores, accept, sensitivity_ok, blocked, section, methods, checked)
    return out if method is None else filter_for_export(out, method, cal)


def filter_for_export(flt: FilterOutcome, method: Method, cal: Calibration) -> FilterOutcome:
    """autoexport: ``flt`` with the reject reasons of the ``method`` to export (the filter section's
    ``reject_reasons``, ``dcr_reject_nearest_split``); PrivacyInvariantError when the planted test did not
    score that method's candidates."""
    if method not in flt.planted_checked:
        raise PrivacyInvariantError(f"the planted test did not score the {method} candidates "
                                    f"(only {flt.planted_checked}): nothing is exported")
    exp, th = flt.scores[method], cal.thresholds
    section = replace(flt.section, reject_reasons=reject_reasons(exp, th, cal.delta_pixel),
                      # dcr rejections by the split of the closest protected image: members and non-members alike
                      dcr_reject_nearest_split=cal.zone.nearest_splits(exp.nearest[exp.dcr <= th.delta]))
    return replace(flt, section=section)


# ---------------------------------------------------------------------------------------------- export
def check_exportable(scores: Scores, i: int, th: Thresholds, delta_pixel: float | None, image_id: str) -> None:
    """PrivacyInvariantError unless candidate ``i`` passes every threshold in force (pixel zone included)."""
    fails = []
    if not scores.max_id_prob[i] < th.tau_id:
        fails.append(f"max_id_prob {float(scores.max_id_prob[i]):g} >= tau_id {th.tau_id:g}")
    if not scores.indep_id_prob[i] < th.tau_indep:
        fails.append(f"indep_id_prob {float(scores.indep_id_prob[i]):g} >= tau_indep {th.tau_indep:g}")
    if not scores.dcr[i] > th.delta:
        fails.append(f"dcr {float(scores.dcr[i]):g} <= delta {th.delta:g}")
    if delta_pixel is not None and (scores.pixel_dcr is None or not scores.pixel_dcr[i] > delta_pixel):
        pix = "missing" if scores.pixel_dcr is None else f"{float(scores.pixel_dcr[i]):g}"
        fails.append(f"pixel_dcr {pix} <= delta_pixel {delta_pixel:g}")
    if fails:
        raise PrivacyInvariantError(f"image {image_id} (candidate {i}) would be exported but fails the filter: "
                                    + "; ".join(fails) + "; nothing was written")


def write_site_dir(out: Path, cfg: PlanConfig, cand: Candidates, scores: Scores, idx: np.ndarray, th: Thresholds,
                   delta_pixel: float | None, class_names: list[str], generator_sha256: str,
                   generator_round: int | None) -> SiteManifest:
    """``out/images/<class>/<id>.png`` for the candidates ``idx`` and ``out/manifest.json``.

    Every record is checked against the thresholds before the first file is written
    (PrivacyInvariantError, nothing written, when one fails).
    """
    idx = np.asarray(idx, dtype=np.int64)
    for i in idx:
        check_exportable(scores, int(i), th, delta_pixel, cand.image_id(int(i)))
    cnames = safe_class_names(class_names)  # the source's names, as folder/record names
    imgs8 = to_uint8_hwc(cand.images[idx]) if len(idx) else np.zeros((0,))
    records: list[ImageRecord] = []
    for j, i in enumerate(int(i) for i in idx):
        label = int(cand.labels[i])
        iid = cand.image_id(i)
        rel = ImageRecord.expected_file(cnames[label], iid)
        rec = ImageRecord(
            id=iid, file=rel, sha256="0" * 64, label=label, class_name=cnames[label], method=cand.method,
            path_id=None if cand.path_id is None else int(cand.path_id[i]),
            position=None if cand.position is None else int(cand.position[i]),
            max_id_prob=float(scores.max_id_prob[i]), indep_id_prob=float(scores.indep_id_prob[i]),
            dcr=float(scores.dcr[i]), thresholds=th,
        )
        if not rec.passes():  # the record as stored (float32 -> float) must still pass
            raise PrivacyInvariantError(f"image {iid}: its record fails its thresholds: {rec.failures()}")
        save_png(imgs8[j], out / rel)
        records.append(replace(rec, sha256=file_sha256(out / rel)))
    man = SiteManifest(
        site_id=cfg.site_id, generator_sha256=generator_sha256, config_sha256=cfg.digest(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), images=records,
        generator_round=generator_round,
    )
    write_site_manifest(out / "manifest.json", man)
    return man


# ---------------------------------------------------------------------------------------------- utility
def train_utility(cfg: PlanConfig, ds: ImageDataset, x_tr: torch.Tensor, y_tr: np.ndarray | torch.Tensor,
                  x_te: torch.Tensor, y_te: np.ndarray, seed: int, desc: str, device: torch.device,
                  progress: bool, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> UtilityScore:
    """The utility recipe (classes-section architecture, utility_epochs, classes.utility_balanced) on ``x_tr``, tested
    on ``x_te``;
    with ``val`` (the site's real val split) the epoch with the best val accuracy is kept."""
    if len(x_tr) < 2:
        return UtilityScore(None, None, None, len(x_tr), trained=False)
    model = build_classifier(ds.num_classes, ds.channels, ds.size, cfg.classes).to(device)
    spec = spec_from(cfg.classes, epochs=cfg.classes.utility_epochs, balanced=cfg.classes.utility_balanced)
    torch.manual_seed(seed)
    val = val if val is not None and len(val[0]) else None
    train_classifier(model, x_tr, y_tr, spec, val=val, seed=seed, desc=desc, recalibrate=True, progress=progress)
    pred = predict_logits(model, x_te).argmax(1).numpy()
    rep = classification_report(y_te, pred)
    return UtilityScore(finite(rep["accuracy"]), finite(rep["balanced_accuracy"]), finite(rep["qwk"]), len(x_tr))


def utility_val(cfg: PlanConfig, data: SiteData) -> tuple[torch.Tensor, torch.Tensor] | None:
    """autoexport: the site's real val split for the utility recipe's epoch choice (classes.utility_select_on_val)."""
    return (data.x_va, data.y_va) if cfg.classes.utility_select_on_val and len(data.x_va) else None


def site_utility(cfg: PlanConfig, ds: ImageDataset, data: SiteData, x: torch.Tensor, y: np.ndarray | torch.Tensor,
                 desc: str, device: torch.device, progress: bool) -> UtilityScore:
    """autoexport: the site-level TSTR of ``x, y`` (or the site-alone reference on the real train split): the
    utility recipe tested on the real test split, its epoch chosen on the real val split."""
    return train_utility(cfg, ds, x, y, data.x_te, data.y_te, cfg.seed + 21, desc, device, progress,
                         val=utility_val(cfg, data))


def utility_of_site(cfg: PlanConfig, ds: ImageDataset, data: SiteData, cand: Candidates, passed: np.ndarray,
                    blocked: bool, device: torch.device, progress: bool,
                    known: Mapping[str, UtilityScore] | None = None) -> UtilitySection:
    """Utility of the images passing the per-image filter (= the exported ones unless blocked) and of the real split.

    ``known``: the compare stage's scores (its ``cand.method`` entry was trained on these very ``passed``
    images, ``real`` on the real train split): reused, nothing is trained twice.
    """
    xs, ys = cand.images[passed], cand.labels[passed]
    known = known or {}
    syn = known.get(cand.method)  # autoexport: compare's entry for the exported method
    syn = replace(syn) if syn is not None else site_utility(cfg, ds, data, xs, ys, "utility (synthetic)", device,
                                                            progress)
    real = known.get("real") or site_utility(cfg, ds, data, data.x_tr, data.y_tr.numpy(), "utility (real)", device,
                                             progress)
    syn.per_class_train = {ds.class_names[k]: int((ys == k).sum()) for k in range(ds.num_classes)}
    return UtilitySection(syn, real, synthetic_set="images passing the per-image filter"
                          + (" (export blocked: not exported)" if blocked else ""),
                          classifier=utility_recipe(cfg, data))


def utility_recipe(cfg: PlanConfig, data: SiteData) -> str:
    """autoexport: the utility recipe in words (report key utility.classifier)."""
    text = UTILITY_RECIPE if cfg.classes.utility_balanced else UTILITY_RECIPE.replace(
        "class-balanced sampling", "plain sampling (no class balancing)")
    return text + (", epoch chosen on the site's real val split" if utility_val(cfg, data) is not None else "")


def match_class_shares(cfg: PlanConfig, ds: ImageDataset, cand: Candidates,
                       passed: np.ndarray) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The filter-passing rows to export: with ``synthesis.match_prevalence`` subsampled so that the class
    shares follow the site's real train priors (plan_shared.prevalence); the counts for the report."""
    if not cfg.synthesis.match_prevalence or not len(passed):
        return passed, None
    keep, summary = prevalence_selection(cand.labels[passed], ds.train.labels, ds.num_classes, cfg.seed + 17)
    return passed[keep], dict(summary)


def add_precision_recall(cfg: PlanConfig, compare: dict[str, ComparePoint], phi_class: Classifier, data: SiteData,
                         cand: Mapping[Method, Candidates], flt: FilterOutcome) -> None:
    """Each method's precision / recall against the real train split (its filter-passing images) into ``compare``:
    in phi_class's space (``precision``, ``recall``) and in the fixed random-feature net (``precision_fixed``,
    ``recall_fixed``; plan_shared.variety.fixed_precision_recall)."""
    sets: dict[str, torch.Tensor] = {name: c.images[flt.passed(name)] for name, c in cand.items()}
    fixed = fixed_precision_recall(data.x_tr, sets, cfg.synthesis.pr_k)
    for name, pr in method_precision_recall(phi_class, data.x_tr, sets, cfg.synthesis.pr_k).items():
        if name in compare:
            compare[name].variety = {**pr, **fixed[name]}


@dataclass
class Comparison:
    """autoexport: the compare stage's privacy-utility points and the utility scores behind them."""

    points: dict[str, ComparePoint]  # report key compare: each method and "real"
    utility: dict[str, UtilityScore]  # each method's export set and "real" (the site-alone reference)


def compare_methods(cfg: PlanConfig, ds: ImageDataset, data: SiteData, cand: Mapping[Method, Candidates],
                    flt: FilterOutcome, device: torch.device, progress: bool) -> Comparison:
    """Privacy-utility point of every method on the same anchors (the report's privacy-utility plot).

    Runs before the export, so that the verdict can choose the method to export. For each
    method: the utility classifier trained on the images that method would export (its
    filter-passing images after :func:`match_class_shares`, exactly the export set), epoch chosen
    on the site's real val split and tested on the real test split, and the distance membership
    inference (pixel space, members = train, non-members = test, and again with non-members = val
    as ``mia_val_*``) against its filter-passing images: AUC with its 95 % bootstrap interval,
    |AUC - 0.5| and TPR at 1 % FPR. ``real`` is the reference *site alone*: the same utility
    recipe trained on the site's real train split (sharing those images: AUC 1).
    """
    from plan_shared.audit import distance_mia

    def both_mias(data: SiteData, images: torch.Tensor) -> dict[str, float]:
        # non-members = test (mia_*) and = val (mia_val_*, same source as train; server/report.MIA_PREFIXES)
        mia = distance_mia(data.x_tr, data.x_te, images)
        if len(data.x_va):
            mia.update(distance_mia(data.x_tr, data.x_va, images, prefix="mia_val"))
        return mia

    out: dict[str, ComparePoint] = {}
    scores: dict[str, UtilityScore] = {}
    for name, c in cand.items():
        idx = flt.passed(name)
        export_idx, _ = match_class_shares(cfg, ds, c, idx)  # autoexport: what this method would export
        scores[name] = util = site_utility(cfg, ds, data, c.images[export_idx], c.labels[export_idx],
                                           f"utility ({name})", device, progress)
        mia = both_mias(data, c.images[idx])
        out[name] = ComparePoint(util.accuracy, util.qwk, len(idx), {k: finite(v) for k, v in mia.items()},
                                 coverage=export_coverage(c.labels[export_idx], ds.train.labels, ds.num_classes,
                                                          cfg.synthesis.pool_factor))
    scores["real"] = real_util = site_utility(cfg, ds, data, data.x_tr, data.y_tr.numpy(), "utility (real)", device,
                                              progress)
    real = both_mias(data, data.x_tr)
    out["real"] = ComparePoint(real_util.accuracy, real_util.qwk, len(data.x_tr),
                               {k: finite(v) for k, v in real.items()})
    return Comparison(out, scores)


# wplus: the audit's re-identification attacker in the compare stage (issue #11.1 (b), (c))
def attacker_of_site(cfg: PlanConfig, data: SiteData, cand: Mapping[Method, Candidates], flt: FilterOutcome,
                     compare: dict[str, ComparePoint], device: torch.device,
                     progress: bool) -> dict[str, float | None] | None:
    """The audit's re-identification attacker (plan_shared.audit.attacker_audit), trained once on the site's train
    images: each method's filter-passing images (and ``real``: the train images themselves) scored into
    ``compare``; returns the attacker's own figures (None when ``audit.attacker_in_pipeline`` is off)."""
    from plan_shared.audit import attacker_audit

    if not cfg.audit.attacker_in_pipeline:
        return None
    sets = {name: c.images[flt.passed(name)] for name, c in cand.items()} | {"real": data.x_tr}
    res = attacker_audit(cfg.audit.attacker, data.x_tr, data.id_labels, data.x_te, sets, device, progress)
    for name, vals in res.sets.items():
        if name in compare:
            compare[name].attacker = {k: finite(v) for k, v in vals.items()}
    return {k: finite(v) for k, v in res.attacker.items()}


def verdict_of(cfg: PlanConfig, compare: Mapping[str, ComparePoint], methods: Mapping[str, MethodStats]) -> dict[str, Any]:
    """fullpool: the computed verdict PLAN vs filtered random (plan_shared.variety.plan_verdict) for report.json."""
    points = {k: v.to_json() | {"mean_indep_id_prob": methods[k].mean_indep_id_prob}
              for k, v in compare.items() if k in methods}
    return plan_verdict(points, cfg.synthesis)


# ---------------------------------------------------------------------------------------------- figures
def write_figures(cfg: PlanConfig, out: Path, G: StyleGenerator, paths: Paths, ids: IdentityModels,
                  cal: Calibration, cand: Mapping[Method, Candidates], flt: FilterOutcome, exported: Method,
                  class_names: list[str]) -> dict[str, str]:
    """path_strips.png (the first synthesis.strip_pairs paths), samples.png, dcr_hist.png; their names."""
    rows = []
    for p in range(min(cfg.synthesis.strip_pairs, len(paths.plan))):
        for name, full in (("linear", paths.linear), ("plan", paths.plan)):
            img = render(G, path_styles(G, full[p : p + 1], cfg.navigation)[0])  # wplus: as render_candidates
            sc = score_images(img, ids.phi_id, ids.indep, cal.zone.embeddings)
            rows.append({"title": f"{name} #{p} ({class_names[int(paths.labels[p])]})", "images": img,
                         "id_prob": sc.max_id_prob, "dcr": sc.dcr})
    figs: dict[str, str] = {}
    if rows:
        figs["path_strips"] = path_strips(rows, out / "path_strips.png").name
    acc_idx = flt.exported(exported)
    show = cand[exported].images[acc_idx] if len(acc_idx) else cand[exported].images
    if len(show):
        figs["samples"] = sample_grid(show, out / "samples.png").name
    series = {str(k): flt.scores[k].dcr for k in ("plan", "linear") if k in flt.scores and len(flt.scores[k])}
    series[f"real {cal.split} (calibration)"] = cal.zone.calib_dcr
    figs["dcr_hist"] = dcr_histogram(series, cal.thresholds.delta, out / "dcr_hist.png").name
    return figs
