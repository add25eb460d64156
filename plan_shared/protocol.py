"""The messages between the coordinator (server/) and a site (client/), one typed record each.

Every message is a frozen dataclass with ``to_record() -> RecordDict`` and
``from_record(RecordDict)``; a record that lacks a key or holds a value of the wrong
type raises :class:`ProtocolError` naming the message type and the key. No other
module spells a message key.

=================  ==================  =========================================================
task (server ->)   reply (<- site)     what travels
=================  ==================  =========================================================
DescribeTask       DescribeReply       the site's image shape, train-set size, number of classes
TrainTask          TrainReply          global weights + round -> local weights + GAN metrics
SynthesisTask      SynthesisSummary    final G_ema -> counts, filter figures, per-method tables
EvaluationTask     SiteEvaluation      phi_down -> scores and confusion matrices (arrays), audit
FedRealTask        FedRealReply        a recipe's global weights + round -> local weights + image count
ReferenceTask      ReferenceEvaluation every recipe's pool/federated/central models -> scores per reference
=================  ==================  =========================================================

The run configuration travels in full only in the first message to a node (and again
when it changed); later messages carry only its digest (:meth:`PlanConfig.digest`).
The site validates it once and keeps it in its Flower ``Context.state``
(:func:`site_config`); a digest the site holds no configuration for is refused with
:class:`UnknownConfigError`, whose text carries :data:`UNKNOWN_CONFIG_MARK` so the
coordinator can tell it from other failures and send the full configuration again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from plan_shared.config import PlanConfig, config_from_dict

if TYPE_CHECKING:
    from plan_shared.encoder import EncoderPayload

ConfigValue = int | float | str | bytes | bool | list[int] | list[float] | list[str] | list[bytes] | list[bool]
MetricValue = int | float | list[int] | list[float]

UNKNOWN_CONFIG_MARK = "plan-protocol: unknown config digest"


class ProtocolError(ValueError):
    """A record does not match the message it claims to be; the text names the message and the key."""


class UnknownConfigError(ProtocolError):
    """The site has no configuration for the digest a message carries (it restarted, or never got one)."""


# ---------------------------------------------------------------------------------------- decoding helpers

_R = TypeVar("_R", ConfigRecord, MetricRecord, ArrayRecord)


def _section(rd: RecordDict, msg: str, key: str, kind: type[_R]) -> _R:
    if key not in rd:
        raise ProtocolError(f"{msg}: the record has no {key!r} section (it has {sorted(rd.keys())})")
    rec = rd[key]
    if not isinstance(rec, kind):
        raise ProtocolError(f"{msg}: section {key!r} is a {type(rec).__name__}, expected a {kind.__name__}")
    return rec


def _value(rec: ConfigRecord | MetricRecord, msg: str, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in rec:
        raise ProtocolError(f"{msg}: missing key {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise ProtocolError(f"{msg}: key {key!r} is {v!r} ({type(v).__name__}), expected {_kind_name(kind)}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _str(rec: ConfigRecord, msg: str, key: str) -> str:
    return str(_value(rec, msg, key, str))


def _int(rec: ConfigRecord | MetricRecord, msg: str, key: str) -> int:
    return int(_value(rec, msg, key, int))


def _float(rec: ConfigRecord | MetricRecord, msg: str, key: str) -> float:
    return float(_value(rec, msg, key, (int, float)))


def _opt_float(rec: MetricRecord, msg: str, key: str) -> float | None:
    return _float(rec, msg, key) if key in rec else None


def _floats(rec: MetricRecord, msg: str) -> dict[str, float]:
    return {k: _float(rec, msg, k) for k in rec}


def _table(rec: ConfigRecord, msg: str, key: str) -> dict[str, dict[str, float]]:
    """A two-level table of numbers ({row: {column: value}}), carried as JSON text."""
    raw = _str(rec, msg, key)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"{msg}: key {key!r} is not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{msg}: key {key!r} must hold a JSON object, got {type(doc).__name__}")
    out: dict[str, dict[str, float]] = {}
    for row, cols in doc.items():
        if not isinstance(cols, dict):
            raise ProtocolError(f"{msg}: {key}[{row!r}] must be an object of numbers, got {cols!r}")
        for col, v in cols.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ProtocolError(f"{msg}: {key}[{row!r}][{col!r}] is {v!r}, expected a number")
        out[str(row)] = {str(c): float(v) for c, v in cols.items()}
    return out


def _numbers(values: Mapping[str, float | None]) -> dict[str, MetricValue]:
    """The entries that are numbers (None dropped): what a MetricRecord can carry."""
    return {k: float(v) for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class ConfigRef:
    """The run configuration in a task: always its digest, the full JSON only when the node lacks it."""

    digest: str
    config_json: str | None = None

    KEY: ClassVar[str] = "plan"

    @classmethod
    def full(cls, cfg: PlanConfig) -> ConfigRef:
        return cls(cfg.digest(), json.dumps(cfg.to_dict()))

    @classmethod
    def digest_only(cls, cfg: PlanConfig) -> ConfigRef:
        return cls(cfg.digest())

    def record(self) -> ConfigRecord:
        rec: dict[str, ConfigValue] = {"config-digest": self.digest}
        if self.config_json is not None:
            rec["plan-config"] = self.config_json
        return ConfigRecord(rec)

    @classmethod
    def from_task(cls, rd: RecordDict, msg: str) -> ConfigRef:
        rec = _section(rd, msg, cls.KEY, ConfigRecord)
        return cls(_str(rec, msg, "config-digest"), _str(rec, msg, "plan-config") if "plan-config" in rec else None)


_STATE_KEY = "plan-configs"
_VALIDATED: dict[str, PlanConfig] = {}  # digest -> validated config, this process


def site_config(ref: ConfigRef, state: RecordDict, where: str = "coordinator config") -> PlanConfig:
    """The validated run configuration a task refers to, kept in the site's ``Context.state``.

    A task with the full configuration: validated (its digest must match), stored in
    ``state`` for the later tasks of the run. A task with the digest only: the stored
    configuration (validated once per process). Neither: :class:`UnknownConfigError`.
    """
    stored = state.get(_STATE_KEY)
    text = ref.config_json
    if text is None:
        if not isinstance(stored, ConfigRecord) or ref.digest not in stored:
            raise UnknownConfigError(
                f"{UNKNOWN_CONFIG_MARK} {ref.digest[:16]}: this site holds no run configuration with that digest "
                "(it restarted since the coordinator last sent it); the coordinator sends it again"
            )
        if ref.digest in _VALIDATED:
            return _VALIDATED[ref.digest]
        text = str(stored[ref.digest])
    try:
        cfg = config_from_dict(json.loads(text), where)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"{where}: the run configuration is not JSON ({err})") from None
    if cfg.digest() != ref.digest:
        raise ProtocolError(f"{where}: the configuration's digest is {cfg.digest()[:16]}, the message says "
                            f"{ref.digest[:16]}")
    # Keep only the current run configuration (a changed config replaces the old one).
    state[_STATE_KEY] = ConfigRecord({ref.digest: text})
    _VALIDATED[ref.digest] = cfg
    return cfg


# ---------------------------------------------------------------------------------------- describe

def _query(action: str) -> str:
    return f"{MessageType.QUERY}.{action}"


@dataclass(frozen=True)
class DescribeTask:
    """Coordinator -> site: say what your data look like."""

    config: ConfigRef

    ACTION: ClassVar[str] = "describe"
    MESSAGE_TYPE: ClassVar[str] = _query("describe")

    def to_record(self) -> RecordDict:
        return RecordDict({ConfigRef.KEY: self.config.record()})

    @classmethod
    def from_record(cls, rd: RecordDict) -> DescribeTask:
        return cls(ConfigRef.from_task(rd, cls.__name__))


@dataclass(frozen=True)
class DescribeReply:
    """Site -> coordinator: image shape, train-set size and classes, under the site's name."""

    site_id: str
    channels: int
    size: int
    num_train: int
    num_classes: int

    def to_record(self) -> RecordDict:
        return RecordDict({"site": ConfigRecord({
            "site-id": self.site_id, "channels": self.channels, "size": self.size, "num-train": self.num_train,
            "num-classes": self.num_classes})})

    @classmethod
    def from_record(cls, rd: RecordDict) -> DescribeReply:
        m = cls.__name__
        s = _section(rd, m, "site", ConfigRecord)
        return cls(_str(s, m, "site-id"), _int(s, m, "channels"), _int(s, m, "size"), _int(s, m, "num-train"),
                   _int(s, m, "num-classes"))


# ---------------------------------------------------------------------------------------- train

@dataclass(frozen=True)
class TrainTask:
    """Coordinator -> site: the global weights of round ``server_round``; run ``local_steps`` GAN steps."""

    weights: ArrayRecord
    server_round: int
    channels: int
    size: int
    local_steps: int
    run_digest: str
    config: ConfigRef

    MESSAGE_TYPE: ClassVar[str] = MessageType.TRAIN

    def to_record(self) -> RecordDict:
        return RecordDict({
            "arrays": self.weights,
            "round": ConfigRecord({"server-round": self.server_round, "channels": self.channels, "size": self.size,
                                   "local-steps": self.local_steps, "run-digest": self.run_digest}),
            ConfigRef.KEY: self.config.record(),
        })

    @classmethod
    def from_record(cls, rd: RecordDict) -> TrainTask:
        m = cls.__name__
        r = _section(rd, m, "round", ConfigRecord)
        return cls(_section(rd, m, "arrays", ArrayRecord), _int(r, m, "server-round"), _int(r, m, "channels"),
                   _int(r, m, "size"), _int(r, m, "local-steps"), _str(r, m, "run-digest"),
                   ConfigRef.from_task(rd, m))


@dataclass(frozen=True)
class TrainMetrics:
    """One site's round: FedAvg weights by ``num_examples``; the rest is averaged into the round's metrics."""

    num_examples: int
    loss_g: float
    loss_d: float
    r1: float
    d_real: float
    d_fake: float
    images_seen: int
    steps: int
    train_s: float
    handler_s: float
    fd: float | None = None  # the FD watch-point of the received global G_ema (gan.watch_fd_samples; absent when off)
    fd_s: float | None = None  # seconds the FD took at the site (with fd)

    # field -> metric name (metrics.jsonl and FedAvg's weighted_by_key use these names)
    NAMES: ClassVar[dict[str, str]] = {
        "num_examples": "num-examples", "loss_g": "loss_g", "loss_d": "loss_d", "r1": "r1", "d_real": "d_real",
        "d_fake": "d_fake", "images_seen": "images-seen", "steps": "steps", "train_s": "train-s",
        "handler_s": "handler-s",
    }
    WEIGHT_KEY: ClassVar[str] = "num-examples"

    def as_dict(self) -> dict[str, MetricValue]:
        d: dict[str, MetricValue] = {name: getattr(self, f) for f, name in self.NAMES.items()}
        if self.fd is not None:
            d["fd"] = self.fd
        if self.fd_s is not None:
            d["fd-s"] = self.fd_s
        return d

    @classmethod
    def from_metric_record(cls, rec: MetricRecord, msg: str) -> TrainMetrics:
        n = cls.NAMES

        def i(k: str) -> int:
            return _int(rec, msg, n[k])

        def f(k: str) -> float:
            return _float(rec, msg, n[k])

        return cls(i("num_examples"), f("loss_g"), f("loss_d"), f("r1"), f("d_real"), f("d_fake"), i("images_seen"),
                   i("steps"), f("train_s"), f("handler_s"), _opt_float(rec, msg, "fd"),
                   _opt_float(rec, msg, "fd-s"))


@dataclass(frozen=True)
class TrainReply:
    """Site -> coordinator: its weights after the local steps, its metrics, its name."""

    weights: ArrayRecord
    metrics: TrainMetrics
    site_id: str

    def to_record(self) -> RecordDict:
        return RecordDict({"arrays": self.weights, "metrics": MetricRecord(self.metrics.as_dict()),
                           "site": ConfigRecord({"site-id": self.site_id})})

    @classmethod
    def from_record(cls, rd: RecordDict) -> TrainReply:
        m = cls.__name__
        return cls(_section(rd, m, "arrays", ArrayRecord),
                   TrainMetrics.from_metric_record(_section(rd, m, "metrics", MetricRecord), m),
                   _str(_section(rd, m, "site", ConfigRecord), m, "site-id"))


# ---------------------------------------------------------------------------------------- synthesis

@dataclass(frozen=True)
class SynthesisTask:
    """Coordinator -> site: the final G_ema; run the PLAN pipeline with ``method`` and export to the pool.

    ``encoder``: the inversion encoder the coordinator trained on this G's own samples
    (``inversion.encoder.train_at: coordinator``), tied to G's digest; None = the site trains or
    loads its own. Sections ``encoder`` (weights) and ``encoder-meta`` travel only when it is set,
    so a task without them still parses.
    """

    generator: ArrayRecord
    channels: int
    size: int
    generator_round: int
    method: str
    config: ConfigRef
    encoder: EncoderPayload | None = None

    ACTION: ClassVar[str] = "synthesize"
    MESSAGE_TYPE: ClassVar[str] = _query("synthesize")

    def to_record(self) -> RecordDict:
        rd = RecordDict({
            "generator": self.generator,
            "synthesis": ConfigRecord({"channels": self.channels, "size": self.size,
                                       "generator-round": self.generator_round, "method": self.method}),
            ConfigRef.KEY: self.config.record(),
        })
        if self.encoder is not None:
            rd["encoder"] = ArrayRecord(self.encoder.state)
            meta: dict[str, ConfigValue] = dict(self.encoder.meta())
            rd["encoder-meta"] = ConfigRecord(meta)
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> SynthesisTask:
        m = cls.__name__
        s = _section(rd, m, "synthesis", ConfigRecord)
        encoder = None
        if "encoder" in rd or "encoder-meta" in rd:
            from plan_shared.encoder import EncoderPayload  # torch: only for a task that carries E

            weights = _section(rd, m, "encoder", ArrayRecord).to_torch_state_dict()
            meta = dict(_section(rd, m, "encoder-meta", ConfigRecord))
            try:
                encoder = EncoderPayload.from_meta(weights, meta, f"{m}: section 'encoder-meta'")
            except ValueError as err:
                raise ProtocolError(str(err)) from None
        return cls(_section(rd, m, "generator", ArrayRecord), _int(s, m, "channels"), _int(s, m, "size"),
                   _int(s, m, "generator-round"), _str(s, m, "method"), ConfigRef.from_task(rd, m), encoder)


@dataclass(frozen=True)
class SynthesisSummary:
    """Site -> coordinator after synthesis: numbers only, never images.

    ``compare``: per method (and ``real``), the site-level utility and distance-MIA figures
    (``accuracy``, ``qwk``, ``n``, ``mia_auc`` with ``mia_auc_lo``/``mia_auc_hi``, ...);
    ``methods``: per method, candidate statistics (``n``, ``mean_dcr``, ``p05_dcr``,
    ``mean_max_id_prob``, ``accept_rate``); ``utility``: accuracy per utility classifier;
    ``timing``: seconds per pipeline stage. Figures a site could not compute are absent.
    """

    site_id: str
    bundle_id: str
    export_status: str
    n_candidates: int
    n_accepted: int
    planted_total: int
    planted_rejected: int
    tau_id: float
    delta: float
    num_classes: int
    synthesis_s: float
    compare: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    methods: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    utility: Mapping[str, float] = field(default_factory=dict)
    timing: Mapping[str, float] = field(default_factory=dict)
    method: str = ""  # autoexport: the method the site exported (its report's method; "" = not stated)
    method_reason: str = ""  # why: forced, or what the site's verdict supports

    _COUNTS: ClassVar[tuple[str, ...]] = ("n_candidates", "n_accepted", "planted_total", "planted_rejected",
                                          "num_classes")
    _FIGURES: ClassVar[tuple[str, ...]] = ("tau_id", "delta", "synthesis_s")

    def to_record(self) -> RecordDict:
        summary: dict[str, MetricValue] = {k: int(getattr(self, k)) for k in self._COUNTS}
        summary.update({k: float(getattr(self, k)) for k in self._FIGURES})
        return RecordDict({
            "site": ConfigRecord({"site-id": self.site_id, "bundle-id": self.bundle_id,
                                  "export-status": self.export_status, "method": self.method,
                                  "method-reason": self.method_reason}),
            "summary": MetricRecord(summary),
            "tables": ConfigRecord({"compare": json.dumps(self.compare), "methods": json.dumps(self.methods)}),
            "utility": MetricRecord(_numbers(self.utility)),
            "timing": MetricRecord(_numbers(self.timing)),
        })

    @classmethod
    def from_record(cls, rd: RecordDict) -> SynthesisSummary:
        m = cls.__name__
        site = _section(rd, m, "site", ConfigRecord)
        s = _section(rd, m, "summary", MetricRecord)
        t = _section(rd, m, "tables", ConfigRecord)
        return cls(
            _str(site, m, "site-id"), _str(site, m, "bundle-id"), _str(site, m, "export-status"),
            n_candidates=_int(s, m, "n_candidates"), n_accepted=_int(s, m, "n_accepted"),
            planted_total=_int(s, m, "planted_total"), planted_rejected=_int(s, m, "planted_rejected"),
            tau_id=_float(s, m, "tau_id"), delta=_float(s, m, "delta"), num_classes=_int(s, m, "num_classes"),
            synthesis_s=_float(s, m, "synthesis_s"),
            compare=_table(t, m, "compare"), methods=_table(t, m, "methods"),
            utility=_floats(_section(rd, m, "utility", MetricRecord), m),
            timing=_floats(_section(rd, m, "timing", MetricRecord), m),
            method=_str(site, m, "method") if "method" in site else "",
            method_reason=_str(site, m, "method-reason") if "method-reason" in site else "",
        )


# ---------------------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class EvaluationTask:
    """Coordinator -> site: phi_down's weights and architecture; score it and audit the site's export."""

    model: ArrayRecord
    num_classes: int
    channels: int
    size: int
    config: ConfigRef

    ACTION: ClassVar[str] = "evaluate"
    MESSAGE_TYPE: ClassVar[str] = _query("evaluate")

    @property
    def arch(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "channels": self.channels, "size": self.size}

    def to_record(self) -> RecordDict:
        return RecordDict({"model": self.model,
                           "arch": ConfigRecord({"num-classes": self.num_classes, "channels": self.channels,
                                                 "size": self.size}),
                           ConfigRef.KEY: self.config.record()})

    @classmethod
    def from_record(cls, rd: RecordDict) -> EvaluationTask:
        m = cls.__name__
        a = _section(rd, m, "arch", ConfigRecord)
        return cls(_section(rd, m, "model", ArrayRecord), _int(a, m, "num-classes"), _int(a, m, "channels"),
                   _int(a, m, "size"), ConfigRef.from_task(rd, m))


@dataclass(frozen=True)
class ClassifierScore:
    """A classifier on a site's real test split: its scores and its k x k confusion matrix (rows = truth)."""

    accuracy: float | None
    balanced_accuracy: float | None
    qwk: float | None
    n: int
    confusion: np.ndarray = field(compare=False)

    SCORES: ClassVar[tuple[str, ...]] = ("accuracy", "balanced_accuracy", "qwk")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClassifierScore):
            return NotImplemented
        same = all(_same(getattr(self, k), getattr(other, k)) for k in self.SCORES)
        return same and self.n == other.n and np.array_equal(self.confusion, other.confusion)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], num_classes: int) -> ClassifierScore:
        """From client/evaluate.py's ``score_classifier`` output."""
        cm = np.asarray(d["confusion"], dtype=np.int64).reshape(num_classes, num_classes)

        def score(k: str) -> float | None:
            return None if d.get(k) is None else float(d[k])

        return cls(score("accuracy"), score("balanced_accuracy"), score("qwk"), int(d["n"]), cm)

    def as_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.SCORES}, "n": self.n, "confusion": self.confusion.tolist()}


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclass(frozen=True)
class SiteEvaluation:
    """Site -> coordinator after evaluation: phi_down and the site-alone reference, and the privacy audit."""

    site_id: str
    num_classes: int
    evaluate_s: float
    synthetic: ClassifierScore
    real: ClassifierScore
    privacy: Mapping[str, float]

    SCORED: ClassVar[tuple[str, ...]] = ("synthetic", "real")

    def to_record(self) -> RecordDict:
        rd = RecordDict({
            "site": ConfigRecord({"site-id": self.site_id}),
            "summary": MetricRecord({"num_classes": self.num_classes, "evaluate_s": float(self.evaluate_s)}),
            "privacy": MetricRecord(_numbers(self.privacy)),
            "confusion": ArrayRecord({w: Array(getattr(self, w).confusion) for w in self.SCORED}),
        })
        for w in self.SCORED:
            sc: ClassifierScore = getattr(self, w)
            rec = _numbers({k: getattr(sc, k) for k in sc.SCORES})
            rec["n"] = sc.n
            rd[w] = MetricRecord(rec)
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> SiteEvaluation:
        m = cls.__name__
        s = _section(rd, m, "summary", MetricRecord)
        k = _int(s, m, "num_classes")
        cms = _section(rd, m, "confusion", ArrayRecord)
        scores = {}
        for w in cls.SCORED:
            rec = _section(rd, m, w, MetricRecord)
            if w not in cms:
                raise ProtocolError(f"{m}: the 'confusion' arrays lack {w!r}")
            cm = cms[w].numpy()
            if cm.shape != (k, k) or not np.issubdtype(cm.dtype, np.integer):
                raise ProtocolError(f"{m}: confusion[{w!r}] is {cm.dtype} {cm.shape}, expected integers ({k}, {k})")
            where = f"{m}.{w}"
            scores[w] = ClassifierScore(_opt_float(rec, where, "accuracy"), _opt_float(rec, where, "balanced_accuracy"),
                                        _opt_float(rec, where, "qwk"), _int(rec, where, "n"), cm.astype(np.int64))
        return cls(_str(_section(rd, m, "site", ConfigRecord), m, "site-id"), k, _float(s, m, "evaluate_s"),
                   scores["synthetic"], scores["real"], _floats(_section(rd, m, "privacy", MetricRecord), m))

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``evaluation.json``)."""
        return {"status": "ok", "site_id": self.site_id, "num_classes": self.num_classes,
                "evaluate_s": self.evaluate_s, "synthetic": self.synthetic.as_dict(), "real": self.real.as_dict(),
                "privacy": dict(self.privacy)}


# ---------------------------------------------------------------------------------------- downstream references
# fedreal: the federated-real reference (FedAvg of a downstream recipe over the sites' real train splits) and
# the evaluation of every recipe against its real references (issue 11 items 4, 5).

REFERENCES = ("pool", "site_alone", "federated_real", "central_real")  # what a recipe was trained on
SENT_REFERENCES = ("pool", "federated_real", "central_real")  # trained away from the site, sent as weights
POOL_SEED_PREFIX = "pool_s"  # "pool_s<i>": the recipe trained on the pool again with seed + i (downstream.seeds)


def pool_seed_reference(i: int) -> str:
    """The reference name of the pool model trained with training seed ``downstream seed + i`` (i = 0 is "pool")."""
    if i < 0:
        raise ValueError(f"pool seed index must be >= 0, got {i}")
    return "pool" if i == 0 else f"{POOL_SEED_PREFIX}{i}"


def pool_seed_index(reference: str) -> int | None:
    """``i`` of a pool reference ("pool" -> 0, "pool_s2" -> 2); None for any other reference."""
    if reference == "pool":
        return 0
    tail = reference.removeprefix(POOL_SEED_PREFIX)
    if tail != reference and tail.isdigit() and tail[0] != "0":
        return int(tail)
    return None


def is_reference(reference: str, sent: bool = False) -> bool:
    """A known reference (``sent``: one trained away from the site), pool seeds included."""
    return reference in (SENT_REFERENCES if sent else REFERENCES) or pool_seed_index(reference) is not None


def _model_key(recipe: str, reference: str) -> str:
    return f"model-{recipe}-{reference}"


@dataclass(frozen=True)
class FedRealTask:
    """Coordinator -> site: round ``server_round`` of FedAvg for ``recipe``: train it from ``weights`` on your real train split."""

    weights: ArrayRecord
    recipe: str
    server_round: int
    num_classes: int
    channels: int
    size: int
    config: ConfigRef

    ACTION: ClassVar[str] = "fedreal"
    MESSAGE_TYPE: ClassVar[str] = _query("fedreal")

    @property
    def arch(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "channels": self.channels, "size": self.size}

    def to_record(self) -> RecordDict:
        return RecordDict({
            "arrays": self.weights,
            "fedreal": ConfigRecord({"recipe": self.recipe, "server-round": self.server_round,
                                     "num-classes": self.num_classes, "channels": self.channels, "size": self.size}),
            ConfigRef.KEY: self.config.record(),
        })

    @classmethod
    def from_record(cls, rd: RecordDict) -> FedRealTask:
        m = cls.__name__
        r = _section(rd, m, "fedreal", ConfigRecord)
        return cls(_section(rd, m, "arrays", ArrayRecord), _str(r, m, "recipe"), _int(r, m, "server-round"),
                   _int(r, m, "num-classes"), _int(r, m, "channels"), _int(r, m, "size"), ConfigRef.from_task(rd, m))


@dataclass(frozen=True)
class FedRealReply:
    """Site -> coordinator: the recipe's weights after the local epochs; ``num_examples`` is FedAvg's weight."""

    weights: ArrayRecord
    num_examples: int
    train_s: float
    site_id: str

    WEIGHT_KEY: ClassVar[str] = "num-examples"

    def to_record(self) -> RecordDict:
        return RecordDict({"arrays": self.weights,
                           "metrics": MetricRecord({self.WEIGHT_KEY: self.num_examples, "train-s": float(self.train_s)}),
                           "site": ConfigRecord({"site-id": self.site_id})})

    @classmethod
    def from_record(cls, rd: RecordDict) -> FedRealReply:
        m = cls.__name__
        met = _section(rd, m, "metrics", MetricRecord)
        return cls(_section(rd, m, "arrays", ArrayRecord), _int(met, m, cls.WEIGHT_KEY), _float(met, m, "train-s"),
                   _str(_section(rd, m, "site", ConfigRecord), m, "site-id"))


@dataclass(frozen=True)
class ReferenceTask:
    """Coordinator -> site: every recipe's models trained away from the site (pool, federated real, central real).

    ``models[(recipe, reference)]``; the site trains each recipe of ``recipes`` on its own
    train split (site alone) and scores them all on its real test split.
    """

    models: Mapping[tuple[str, str], ArrayRecord]
    recipes: tuple[str, ...]
    num_classes: int
    channels: int
    size: int
    config: ConfigRef

    ACTION: ClassVar[str] = "references"
    MESSAGE_TYPE: ClassVar[str] = _query("references")

    @property
    def arch(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "channels": self.channels, "size": self.size}

    def to_record(self) -> RecordDict:
        for recipe, ref in self.models:
            if recipe not in self.recipes or not is_reference(ref, sent=True):
                raise ProtocolError(f"{type(self).__name__}: model ({recipe!r}, {ref!r}) is not one of recipes "
                                    f"{list(self.recipes)} x {list(SENT_REFERENCES)} (or {POOL_SEED_PREFIX}<i>)")
        rd = RecordDict({"arch": ConfigRecord({"num-classes": self.num_classes, "channels": self.channels,
                                               "size": self.size, "recipes": list(self.recipes)}),
                         ConfigRef.KEY: self.config.record()})
        for (recipe, ref), arrays in self.models.items():
            rd[_model_key(recipe, ref)] = arrays
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> ReferenceTask:
        m = cls.__name__
        a = _section(rd, m, "arch", ConfigRecord)
        recipes = _value(a, m, "recipes", list)
        if not all(isinstance(r, str) for r in recipes):
            raise ProtocolError(f"{m}: key 'recipes' must be a list of names, got {recipes!r}")
        models: dict[tuple[str, str], ArrayRecord] = {}
        for key in rd:
            recipe, _, ref = key.removeprefix("model-").rpartition("-")
            if key.startswith("model-") and recipe in recipes and is_reference(ref, sent=True):
                models[(recipe, ref)] = _section(rd, m, key, ArrayRecord)
        return cls(models, tuple(recipes), _int(a, m, "num-classes"), _int(a, m, "channels"), _int(a, m, "size"),
                   ConfigRef.from_task(rd, m))


@dataclass(frozen=True)
class ReferenceEvaluation:
    """Site -> coordinator: every (recipe, reference) scored on the site's real test split."""

    site_id: str
    num_classes: int
    evaluate_s: float
    scores: Mapping[tuple[str, str], ClassifierScore]

    def to_record(self) -> RecordDict:
        rd = RecordDict({
            "site": ConfigRecord({"site-id": self.site_id}),
            "summary": MetricRecord({"num_classes": self.num_classes, "evaluate_s": float(self.evaluate_s)}),
            "confusion": ArrayRecord({_model_key(r, ref): Array(sc.confusion) for (r, ref), sc in self.scores.items()}),
        })
        for (r, ref), sc in self.scores.items():
            if not is_reference(ref):
                raise ProtocolError(f"{type(self).__name__}: unknown reference {ref!r} (known: {list(REFERENCES)}, "
                                    f"{POOL_SEED_PREFIX}<i>)")
            rec = _numbers({k: getattr(sc, k) for k in sc.SCORES})
            rec["n"] = sc.n
            rd[_model_key(r, ref)] = MetricRecord(rec)
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> ReferenceEvaluation:
        m = cls.__name__
        s = _section(rd, m, "summary", MetricRecord)
        k = _int(s, m, "num_classes")
        cms = _section(rd, m, "confusion", ArrayRecord)
        scores: dict[tuple[str, str], ClassifierScore] = {}
        for key in cms:
            recipe, _, ref = key.removeprefix("model-").rpartition("-")
            if not key.startswith("model-") or not is_reference(ref) or not recipe:
                raise ProtocolError(f"{m}: confusion key {key!r} is not model-<recipe>-<reference>")
            cm = cms[key].numpy()
            if cm.shape != (k, k) or not np.issubdtype(cm.dtype, np.integer):
                raise ProtocolError(f"{m}: confusion[{key!r}] is {cm.dtype} {cm.shape}, expected integers ({k}, {k})")
            rec = _section(rd, m, key, MetricRecord)
            where = f"{m}.{key}"
            scores[(recipe, ref)] = ClassifierScore(
                _opt_float(rec, where, "accuracy"), _opt_float(rec, where, "balanced_accuracy"),
                _opt_float(rec, where, "qwk"), _int(rec, where, "n"), cm.astype(np.int64))
        return cls(_str(_section(rd, m, "site", ConfigRecord), m, "site-id"), k, _float(s, m, "evaluate_s"), scores)
