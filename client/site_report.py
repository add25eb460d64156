"""``SiteReport``: the site pipeline's report.json as typed sections.

Each stage of client/site_stages.py returns its own section; the orchestrator
(client/pipeline.py) assembles them into one :class:`SiteReport`, and
:meth:`SiteReport.to_json` gives exactly the report.json the coordinator, the pool
policy and the tests read (same keys, same order, same values). Sections whose keys
come from the data (class names, splits, reject reasons, the per-method comparison)
stay dicts inside their typed section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from plan_shared.config import Method


def finite(x: Any) -> float | None:
    """``float(x)``, or None for NaN / inf (report.json holds no non-finite number)."""
    v = float(x)
    return None if math.isnan(v) or math.isinf(v) else v


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for the numpy scalars and arrays a report may hold."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return finite(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _plain(section: Any) -> dict[str, Any]:
    """A section dataclass as a dict in field order; ``extra`` (data-named keys) merged where it is declared."""
    out: dict[str, Any] = {}
    for f in fields(section):
        v = getattr(section, f.name)
        if f.metadata.get("merge"):
            out.update(v)
        else:
            out[f.name] = v
    return out


@dataclass
class DataSection:
    n_train: int
    n_val: int
    n_test: int
    n_identities: int
    identity_unit: str  # "patient" where the source knows patients, else "image"
    classes: list[str]


@dataclass
class IdentitySection:
    phi_id_acc_augmented_train: float
    phi_id_acc_train: float
    phi_id_mean_max_prob_members: float
    phi_id_mean_max_prob_val: float | None
    indep_acc_augmented_train: float
    indep_mean_max_prob_members: float
    indep_mean_max_prob_val: float | None  # *_val: over the calibration images, which are in no identity class
    embedding: str = "L2-normalised features of the independent identity model"
    identity_classes: str = "train"  # filter.identity_classes
    n_identity_classes: int | None = None
    identity_classes_by_split: dict[str, int] | None = None


@dataclass
class ClassesSection:
    phi_class_val_acc: float | None
    phi_class_test_acc: float | None
    best_epoch: Any


@dataclass
class InversionSection:
    n_inverted: int
    n_train: int
    subsampled: bool
    steps: int
    batch_size: int
    lr: float
    sigma_w: float
    mean_mse: float | None
    mean_mse_at_w_avg: float | None
    seconds_per_image: float | None
    image_steps_per_s: float | None
    generator_evals_per_image: float | None = None  # (inversion steps + encoder adaptation epochs) x images / images
    # (the encoder's training on generator samples apart)
    encoder: dict[str, Any] | None = None  # inversion.encoder: training cost, error at E(x), refine steps


@dataclass
class AnchorsSection:
    # plan_shared.anchors.AnchorResult.summary() (n_anchors, per_class, ...): merged into the section, not nested
    summary: dict[str, Any] = field(default_factory=dict, metadata={"merge": True})
    k: int = 0
    pairs_m: int = 0
    n_pairs_available: int = 0
    n_paths: int = 0
    skipped_class_names: list[str] = field(default_factory=list)


@dataclass
class NavigationSection:
    T: int
    steps: int
    lr: float
    lambda_dist: float
    lambda_id: float
    lambda_class: float
    chunk: int
    w_scale: float
    max_offset: float | None
    paths: int
    path_steps_per_s: float | None
    loss_first: Any
    loss_last: Any
    steps_run_mean: float | None = None  # with navigation.early_stop_patience, paths stop on their own plateau
    shards: Any = None  # (first path, paths) per device of navigation.devices
    objective: dict[str, Any] | None = None  # the robust-guidance knobs (class margin, EOT views, low-pass bound)


@dataclass
class FilterSection:
    sensitivity_ok: bool
    export_blocked: bool
    tau_id: float
    tau_indep: float
    delta: float
    delta_quantile: float
    planted_total: int
    planted_rejected: int
    planted_reject_reasons: dict[str, int]
    planted_mean_dcr: float | None
    planted_mean_max_id_prob: float | None
    planted_heldout_total: int
    planted_heldout_rejected: int
    planted_heldout_by_split: dict[str, int]
    planted_heldout_reject_reasons: dict[str, int]
    reject_reasons: dict[str, int]
    delta_pixel: float | None
    dcr_reject_nearest_split: dict[str, int]
    zone: dict[str, Any]
    heldout_dcr: dict[str, Any]


@dataclass
class MethodStats:
    """One method's candidates before the filter: their scores and how many pass."""

    n: int
    mean_dcr: float | None
    p05_dcr: float | None
    mean_max_id_prob: float | None
    mean_indep_id_prob: float | None
    accept_rate: float | None
    n_accepted: int
    candidates_per_class: list[int] | None = None  # by the label each candidate carries (random: phi_class's)
    drawn: int | None = None  # random: GAN samples drawn (synthesis.random_per_class: until the quotas were met)
    quota_per_class: list[int] | None = None  # random with synthesis.random_per_class: PLAN's class counts
    stopped: str | None = None  # random with synthesis.random_per_class: why drawing stopped (draw_to_class_quotas)


@dataclass
class UtilityScore:
    """The utility classifier on the real test split (None scores when it had < 2 images to train on)."""

    accuracy: float | None
    balanced_accuracy: float | None
    qwk: float | None
    n_train: int
    per_class_train: dict[str, int] | None = None  # the synthetic set only
    trained: bool = True  # False: too few images, no classifier (not serialised; only the key order differs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.trained:
            out.update(n_train=self.n_train, accuracy=None, balanced_accuracy=None, qwk=None)
        else:
            out.update(accuracy=self.accuracy, balanced_accuracy=self.balanced_accuracy, qwk=self.qwk,
                       n_train=self.n_train)
        if self.per_class_train is not None:
            out["per_class_train"] = self.per_class_train
        return out


UTILITY_RECIPE = "classes-section architecture, utility_epochs, class-balanced sampling, tested on the real test split"


@dataclass
class UtilitySection:
    synthetic: UtilityScore
    real: UtilityScore
    synthetic_set: str
    classifier: str = UTILITY_RECIPE

    def to_json(self) -> dict[str, Any]:
        return {"synthetic": self.synthetic.to_json(), "real": self.real.to_json(), "classifier": self.classifier,
                "synthetic_set": self.synthetic_set}


@dataclass
class ComparePoint:
    """A method's privacy-utility point: utility on its filter-passing images and the distance MIA against them."""

    accuracy: float | None
    qwk: float | None
    n: int
    mia: dict[str, float | None]  # plan_shared.audit.distance_mia keys (mia_auc, its interval, gap, tpr)
    variety: dict[str, Any] | None = None  # precision / recall vs the real train split (plan_shared.variety)
    attacker: dict[str, float | None] | None = None  # plan_shared.audit.attacker_audit: attacker_max_id_prob, attacker_dcr
    coverage: dict[str, Any] | None = None  # plan_shared.variety.export_coverage: exported_per_class, coverage

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "qwk": self.qwk, "n": self.n, **self.mia, **(self.variety or {}),
                **(self.attacker or {}), **(self.coverage or {})}


@dataclass
class GeneratorSection:
    checkpoint: str | None  # None when the generator came as an in-memory snapshot
    sha256: str  # plan_shared.gan.generator_digest: weights only, the same at every site
    round: int | None


@dataclass
class SiteReport:
    """report.json. Optional sections (navigation, compare) are absent from the JSON when None."""

    site_id: str
    dataset: str
    method: Method
    device: str
    data: DataSection
    identity: IdentitySection
    classes: ClassesSection
    inversion: InversionSection
    anchors: AnchorsSection
    navigation: NavigationSection | None
    filter: FilterSection
    methods: dict[str, MethodStats]
    methods_note: str
    utility: UtilitySection
    compare: dict[str, ComparePoint] | None
    figures: dict[str, str]
    n_candidates: int
    n_accepted: int
    generator: GeneratorSection
    config_sha256: str
    timing: dict[str, float]
    prevalence: dict[str, Any] | None = None  # synthesis.match_prevalence: accepted vs exported per class
    attacker: dict[str, float | None] | None = None  # the audit's re-identification attacker (AttackerAudit.attacker)
    verdict: dict[str, Any] | None = None  # plan_shared.variety.plan_verdict (with compare): PLAN vs filtered random
    # autoexport: synthesis.method as asked (auto or a forced method) and why ``method`` was exported
    method_requested: str | None = None
    method_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The report.json object (plain dicts, lists and scalars), keys in today's order."""
        out: dict[str, Any] = {"site_id": self.site_id, "dataset": self.dataset, "method": self.method}
        if self.method_requested is not None:
            out.update(method_requested=self.method_requested, method_reason=self.method_reason)
        out.update({"device": self.device, "data": _plain(self.data), "identity": _plain(self.identity),
                    "classes": _plain(self.classes), "inversion": _plain(self.inversion),
                    "anchors": _plain(self.anchors)})
        if self.navigation is not None:
            out["navigation"] = _plain(self.navigation)
        out["filter"] = _plain(self.filter)
        out["methods"] = {k: _plain(v) for k, v in self.methods.items()}
        out["methods_note"] = self.methods_note
        out["utility"] = self.utility.to_json()
        if self.compare is not None:
            out["compare"] = {k: v.to_json() for k, v in self.compare.items()}
        if self.verdict is not None:
            out["verdict"] = dict(self.verdict)
        if self.prevalence is not None:
            out["prevalence"] = dict(self.prevalence)
        if self.attacker is not None:
            out["attacker"] = dict(self.attacker)
        out.update(figures=dict(self.figures), n_candidates=self.n_candidates, n_accepted=self.n_accepted,
                   generator=_plain(self.generator), config_sha256=self.config_sha256, timing=dict(self.timing))
        return out
