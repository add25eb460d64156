"""Typed configuration: the one place where every default is documented.

A configuration is YAML in, a validated :class:`PlanConfig` out. Unknown keys are
refused, and every error names the file, the dotted key and the bad value::

    cfg = load_config("site.yaml", overrides={"gan.steps": 200})

Each field's ``description`` is its documentation; ``plan-client config show``
prints the resolved configuration.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Method = Literal["plan", "linear", "random"]
"""A synthesis method: PLAN paths, linear interpolation between anchors, random samples (the baselines)."""
METHODS: tuple[Method, ...] = get_args(Method)
SynthesisMethod = Literal["auto", "plan", "linear", "random"]
"""``synthesis.method``: a :data:`Method` forced, or ``auto`` (the method the site's own verdict supports)."""
SYNTHESIS_METHODS: tuple[SynthesisMethod, ...] = get_args(SynthesisMethod)


class ConfigError(ValueError):
    """A configuration could not be read or validated; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomConfig(_Section):
    """dicom source: the labels CSV next to the DICOM files and how pixels become 8-bit images."""

    labels_csv: str | None = Field(
        None,
        description="CSV mapping each DICOM file to its class; a relative path is taken inside data.path. "
        "null = data.path/labels.csv.",
    )
    file_column: str = Field(
        "file", description="Column with the file's path relative to data.path (a row is matched by it when present)."
    )
    uid_column: str = Field(
        "sop_instance_uid",
        description="Column with the SOP Instance UID (0008,0018); used to match rows when the CSV has no file column, "
        "checked against the header when it has both.",
    )
    label_column: str = Field("label", description="Column with the class; its distinct values become the class names.")
    patient: Literal["auto", "column", "header", "none"] = Field(
        "auto",
        description="Identity unit for phi_id: column = the CSV's patient_column, header = PatientID (0010,0020) read "
        "from each file, none = one identity per image, auto = column when the CSV has it, else none. With patients, "
        "the split is by patient (no patient in two splits) and phi_id has one class per training patient.",
    )
    patient_column: str = Field("patient_id", description="CSV column with a patient key (any text; kept on the site).")
    no_window: Literal["minmax", "bits_stored"] = Field(
        "minmax",
        description="Grey files without a VOI LUT or window centre/width: minmax = stretch each image's own "
        "(rescaled) min..max to 0..255; bits_stored = map the full range of BitsStored (after rescale) to 0..255.",
    )


class DataConfig(_Section):
    """Where the real images come from and how they are shaped."""

    source: Literal["medmnist", "imagefolder", "csv", "dicom"] = Field(
        "medmnist",
        description="medmnist (.npz), imagefolder (one sub-folder per class), csv (APTOS style) or dicom (a folder "
        "of DICOM files + labels CSV, see data.dicom).",
    )
    name: str | None = Field(
        "pneumoniamnist",
        description="MedMNIST flag (e.g. pneumoniamnist); looked up as <name>.npz in $PLAN_DATA_DIR, "
        "else downloaded through the medmnist package when online.",
    )
    path: str | None = Field(
        None,
        description="Explicit path: a MedMNIST-format .npz, an ImageFolder root, the CSV manifest, or the DICOM folder.",
    )
    image_dir: str | None = Field(None, description="csv source: folder holding the images (default: next to the CSV).")
    id_column: str = Field("id_code", description="csv source: column with the image id (file stem).")
    label_column: str = Field("diagnosis", description="csv source: column with the label: integers (names are the numbers) or class names (sorted: label 0, 1, ...).")
    extension: str = Field(".png", description="csv source: image file extension appended to the id.")
    size: int | None = Field(
        32, ge=8, le=1024, description="Resize every image to size x size. null keeps the native size (all must agree)."
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Convert to 1 (grey) or 3 (RGB) channels. null keeps the native channels (all must agree)."
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Seeded stratified split where the source has none.")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="Seeded stratified split where the source has none.")
    max_train: int | None = Field(
        None, ge=2, description="Use at most this many training images (stratified subsample; stated in reports)."
    )
    download: bool = Field(
        True,
        description="medmnist source: when the .npz is not found locally and the medmnist package is installed, "
        "download it through that package into $PLAN_DATA_DIR (or ~/.medmnist). false = never download.",
    )
    dicom: DicomConfig = Field(default_factory=DicomConfig)


class PartitionConfig(_Section):
    """How a simulated federation splits one data set into sites."""

    sites: int = Field(3, ge=1, le=1000, description="Number of sites (hospitals).")
    scheme: Literal["iid", "dirichlet"] = Field("dirichlet", description="iid, or Dirichlet(alpha) label skew.")
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration; small = strong label skew.")
    min_per_site: int = Field(10, ge=1, description="Resample until every site holds at least this many train images.")


class GeneratorConfig(_Section):
    """Style-based generator: mapping z->w, synthesis from a learned constant."""

    z_dim: int = Field(64, ge=1)
    w_dim: int = Field(64, ge=1, description="Dimension of W, the space PLAN navigates in.")
    mapping_layers: int = Field(3, ge=1)
    base_channels: int = Field(128, ge=4, description="Channels at 4x4; halved per doubling down to min_channels.")
    min_channels: int = Field(32, ge=4)
    w_avg_beta: float = Field(0.995, gt=0.0, lt=1.0, description="EMA factor of the tracked mean w.")


class DiscriminatorConfig(_Section):
    base_channels: int = Field(16, ge=4, description="Channels at full resolution; doubled per halving.")
    max_channels: int = Field(128, ge=4)
    mbstd_group: int = Field(4, ge=1, description="Minibatch standard deviation group size.")


class GanConfig(_Section):
    """Local GAN training (also the per-round step of the federated client)."""

    steps: int = Field(1200, ge=1, description="Generator steps of a local (non-federated) run (1200 x 32 images: ~8.5 min on 2 CPU cores).")
    batch_size: int = Field(32, ge=2)
    lr_g: float = Field(0.0025, gt=0.0)
    lr_d: float = Field(0.0025, gt=0.0)
    beta1: float = Field(0.0, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    r1_gamma: float = Field(0.2, ge=0.0, description="R1 weight; keep small on tiny data (method.md section 6).")
    r1_every: int = Field(4, ge=1, description="Lazy R1: penalty every N D-steps, scaled by N.")
    ema_kimg: float = Field(2.0, gt=0.0, description="EMA half-life of G_ema in thousands of images.")
    ema_rampup: float = Field(0.05, ge=0.0, description="Half-life ramp-up as a fraction of images seen (0 = off).")
    mapping_lr_mul: float = Field(0.01, gt=0.0, description="Learning-rate multiplier of the mapping network.")
    style_mixing: float = Field(0.0, ge=0.0, le=1.0, description="Probability of style mixing in a G step.")
    augment: list[Literal["translation", "cutout", "color"]] = Field(
        default_factory=lambda: ["translation", "color"],  # type: ignore[arg-type]  # pydantic validates the literals
        description="DiffAugment policies applied to real and fake images before D.",
    )
    sample_every: int = Field(200, ge=1, description="Write a sample grid PNG every N steps.")
    checkpoint_every: int = Field(400, ge=1, description="Write a checkpoint every N steps (and at the end).")
    fast: bool = Field(
        True,
        description="Optimised step, same computation as the reference step (false) within float rounding: one D "
        "pass over real+fake on steps without R1 (minibatch-std groups kept within each half), losses kept on the "
        "device and read once per call, foreach Adam and EMA updates, G and D in channels_last (NHWC) memory "
        "format, each ToImage as one batched matrix product. Measured with benchmarks/gan_step.py at 32 px, batch "
        "32, on 2 shared cores under load 5-7: 1.20-1.37x the reference's steps/s at 1 thread, 1.85x at 2 threads "
        "(noisy); convolutions (the same in both) are ~65% of the optimised 1-thread step.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile G and D for the steps without R1 (R1 needs double backward and stays eager; "
        "random draws keep eager semantics). on/off force it; auto = on only when one training call runs at least "
        "compile_min_steps steps on a CUDA device. On CPU auto stays off: compiling G+D took ~230 s on 2 shared cores "
        "(again ~506 s at load 8-9 with channels_last G/D: benchmarks/gan_step.py --compile on --threads 1, warm-up "
        "510.5 s vs 4.0 s eager for 4 steps; a 40-step Flower message runs ~40 s eager), "
        "more than a federated round's local steps, and convolutions (not fusable) dominate the CPU step.",
    )
    compile_min_steps: int = Field(
        500, ge=1, description="gan.compile=auto: fewest steps in one training call (one Flower train message or one "
        "local run) for which compiling is worth its one-off cost.",
    )
    watch_fd_samples: int = Field(
        256, ge=0,
        description="Per-round FD watch-point of the federated GAN (metrics.jsonl watch.fd, figures/gan-rounds.png): "
        "at the start of each round every site renders this many samples of the global G_ema it received (fixed z "
        "seed, the same every round) and takes their Frechet distance to as many of its own train images (a fixed "
        "subset; all when it has fewer) in a fixed random-weight conv feature space (plan_shared/gan.py "
        "RandomFeatureNet); the coordinator averages the sites' values weighted by train-set size. Round r thus "
        "scores the model after round r-1 (round 1: the initial G). 0 = off; otherwise at least 2. Measured at 32 px "
        "with the default generator on one core (under load): 256 samples 0.5-0.9 s CPU per site-round, rendering "
        "~90% of it (128 samples: 0.2-0.3 s); a process's first call ~1.8 s (scipy import, first render).",
    )

    @model_validator(mode="after")
    def _watch_fd_samples_not_one(self) -> GanConfig:
        if self.watch_fd_samples == 1:
            raise ValueError("gan.watch_fd_samples must be 0 (off) or at least 2 (an FD needs a covariance), got 1")
        return self


class ClassifierConfig(_Section):
    """What the three classifier sections (``identity``, ``classes``, ``downstream``) share: the
    network (plan_shared.models) and its training (plan_shared.classifiers.spec_from).

    A section states only the defaults in which it differs from these.
    """

    width: int = Field(16, ge=4, description="Channels of the first stage; doubled per stage.")
    depth: int = Field(3, ge=1, le=6, description="Number of downsampling stages.")
    feature_dim: int = Field(64, ge=8, description="Size of the feature vector before the head.")
    epochs: int = Field(8, ge=1, description="Epochs over the training images.")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    augment_shift: float = Field(0.0625, ge=0.0, le=0.5, description="Random translation fraction during training.")


class PlainRecipeConfig(_Section):
    """The "plain" downstream recipe (plan_shared/recipes.py): what a researcher would train without our tricks.

    torchvision ResNet-18 adapted to small images (3x3 stem, no max-pool at <= 32 px), fixed
    epochs of SGD (Nesterov momentum) with a cosine schedule, random translation as the only
    augmentation; no synthetic-validation selection, no class balancing; the last epoch is kept.
    """

    epochs: int = Field(3, ge=1, description="Fixed number of epochs (the last epoch's weights are kept).")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(
        0.01, gt=0.0, description="SGD learning rate (Nesterov momentum, cosine to 0). Measured on 600 pneumoniamnist "
        "images, 3 Dirichlet(0.5) sites, 3 epochs / 3 FedAvg rounds (benchmarks/fedreal_bn.py): 0.05 sends the "
        "federated model to one class at every site (accuracy 0.18 / 0.85 / 0.43), 0.01 does not (0.90 / 0.75 / 0.81) "
        "and is no worse for site alone or central real.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    augment_shift: float = Field(0.0625, ge=0.0, le=0.5, description="Random translation fraction (reflect padding).")
    stem_stride: int = Field(
        1, ge=1, le=2, description="Stride of the 3x3 stem convolution: 1 at 28/32 px (CIFAR-style ResNet-18); 2 "
        "quarters the cost (CPU budgets such as the demo).",
    )
    recalibrate_bn: bool = Field(
        True, description="After training, set every BatchNorm's running statistics to the exact mean over the "
        "training images (one label-free forward pass): with few optimiser steps the EMA statistics stay near "
        "their initial values and the model predicts one class.",
    )


class FederatedRealConfig(_Section):
    """The *federated real* reference: each recipe trained with FedAvg over the sites' real train splits.

    A Flower phase after phi_down (server/downstream.py, client/fedreal.py): per round one
    message per site with the global weights; the site trains ``local_epochs`` of the recipe
    on its own real train split and answers with its weights and image count (FedAvg's weight).
    ``bn`` says how BatchNorm running statistics are handled. Every local step ends by
    recomputing them exactly over the site's own train images (label-free), so FedAvg
    averages exact statistics, not EMAs that after a few steps still sit near their initial
    values (the cause of the chance-level federated reference). ``average`` scores the
    averaged model as it is; ``recalibrate`` lets each site recompute the statistics on its
    own train images first. Measured (benchmarks/fedreal_bn.py, 600 pneumoniamnist images,
    3 Dirichlet(0.5) sites, 3 rounds, accuracy pooled over the sites' test splits): phi_down
    0.50 with EMA statistics averaged, 0.73 exact + average, 0.67 exact + recalibrate;
    plain 0.82 average, 0.72 recalibrate.
    """

    enabled: bool = Field(True, description="Run the federated-real reference phase.")
    rounds: int = Field(3, ge=1, description="FedAvg rounds per recipe.")
    local_epochs: int = Field(1, ge=1, description="Epochs of the recipe at each site per round.")
    bn: Literal["average", "recalibrate"] = Field(
        "average", description="BatchNorm statistics of the federated model at a site (see the section's text)."
    )


class DownstreamConfig(ClassifierConfig):
    """phi_down: the researcher's classifier trained on the pooled synthetic images (stage D).

    Trained class-balanced on the pulled pool, the epoch kept is the best on a held-out
    synthetic validation split; each site scores it on its real test split, next to the
    same architecture trained on that site's real train split (the reference).
    """

    epochs: int = Field(10, ge=1, description="Epochs over the pooled images.")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="Share of the pooled images held out to select the epoch.")
    # fedreal: the downstream recipes and the real references they are compared with (issue 11 items 4, 5)
    recipes: list[Literal["phi_down", "plain"]] = Field(
        ["phi_down", "plain"], min_length=1,
        description="Downstream recipes (plan_shared/recipes.py) trained on the pool and on every real reference "
        "(site alone, federated real, central real); report key utility.recipes.",
    )
    plain: PlainRecipeConfig = Field(default_factory=lambda: PlainRecipeConfig(),
                                     description="The plain ResNet-18 recipe (see PlainRecipeConfig).")
    federated_real: FederatedRealConfig = Field(default_factory=lambda: FederatedRealConfig(),
                                                description="The federated-real reference phase (see FederatedRealConfig).")
    seeds: int = Field(
        1, ge=1, le=16, description="Train every recipe on the pool this many times, with training seeds seed, "
        "seed + 1, ...; each is scored at every site (references pool, pool_s1, ...) and the report gives the "
        "pooled accuracy and kappa as mean, sd and range over the seeds (utility.recipes.by_recipe.<r>.pool_seeds). "
        "Measured (stop 22, benchmarks/utility_recipes.py --seeds 0,1,2 on three demo pools): on one pool the "
        "phi_down seed alone moves the accuracy by 0.06-0.09, so one seed cannot tell two pools apart. Costs one "
        "more training on the pool per seed and recipe (phi_down at the demo's pool: ~30 s on 2 cores).",
    )
    central_real: bool = Field(
        False, description="Simulation only (the coordinator holds the data set): train each recipe on all sites' "
        "train splits pooled, the upper bound. plan-server simulate/demo turn it on.",
    )


class IdentityConfig(ClassifierConfig):
    """B1 identity classifier phi_id and the independent identity model of the filter (method.md B1, B6, section 6).

    One identity per local training image (per patient when the data supply patient ids).
    The head is cosine (normalised features x normalised class weights x learnable scale):
    a linear softmax over thousands of identities does not train (method.md section 6).
    """

    width: int = Field(16, ge=4, description="Channels of the first stage (small: phi_id is evaluated at every path point).")
    feature_dim: int = Field(128, ge=8, description="Size of the feature vector before the cosine head.")
    pool_grid: int = Field(
        4, ge=1, le=8, description="Final features pooled to a grid x grid map (4 keeps the coarse layout). Measured on "
        "800 pneumoniamnist identities, 30 epochs: grid 4 gives 99.5 % top-1 on augmented views, mean max-prob 0.98 "
        "(members) vs 0.45 (val); global pooling (1) gives 95.9 %, 0.83 vs 0.35.",
    )
    epochs: int = Field(
        30, ge=1, description="Epochs over the training images (each image, i.e. each class, is seen once per epoch): "
        "every class weight gets one update per epoch, so phi_id needs many epochs (10 epochs: 48 % top-1; 30: 99.9 %)."
    )
    batch_size: int = Field(32, ge=2, description="Small batches: more optimiser steps per epoch (what phi_id needs).")
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    augment_shift: float = Field(
        0.0625, ge=0.0, le=0.5,
        description="Random translation up to this fraction of the size, so that GAN renderings of near-copies "
        "(slightly shifted, smoothed) are still recognised.",
    )
    augment_noise: float = Field(0.05, ge=0.0, description="Std of additive Gaussian noise (images in [-1, 1]).")
    augment_blur: float = Field(0.3, ge=0.0, le=1.0, description="Probability of a 3x3 blur (GAN renderings are smoother).")
    augment_contrast: float = Field(0.1, ge=0.0, le=1.0, description="Random brightness/contrast jitter amplitude.")
    indep_seed_offset: int = Field(
        1000, ge=1, description="The independent identity model uses seed + this (other init, other batches); "
        "it is never used in navigation."
    )
    indep_width: int = Field(16, ge=4, description="First-stage width of the independent identity model.")


class ClassesConfig(ClassifierConfig):
    """B2 class classifier phi_class (also the downstream/utility classifier trained in the report)."""

    epochs: int = Field(8, ge=1, description="Epochs on the real train split; the epoch with the best val accuracy is kept.")
    utility_epochs: int = Field(
        8, ge=1, description="Epochs of the utility classifier (same architecture) trained on accepted synthetic images "
        "and, for reference, on the real train split; both tested on the real test split."
    )
    utility_balanced: bool = Field(
        False, description="The utility recipe (site-level TSTR of every method, compare's sets prevalence-matched to "
        "the site's real train priors, and the site-alone reference) samples the classes evenly. Off by default: on a "
        "label-skewed site it moves the decision threshold toward the rare class. Measured (benchmarks/site_tstr.py, "
        "demo site-0 of pneumoniamnist, 768 train / 86 val / 148 test images, majority class 0.818 on its test split, "
        "5 epochs, seeds 21 / 22 / 23, at load 11-30): site-alone TSTR balanced with the last epoch (before) 0.473 / "
        "0.473 / 0.486, below the majority class; without balancing and with the val epoch 0.892 / 0.872 / 0.892 "
        "(192 s vs 198 s per training at that load: no added cost)."
    )
    utility_select_on_val: bool = Field(
        True, description="The utility recipe keeps the epoch with the best accuracy on the site's own real val split "
        "(site-local, never exported; the test split stays untouched). false = the last epoch."
    )


class EncoderConfig(_Section):
    """B3 learned encoder E: image -> w, trained on the generator's own samples (no real image).

    Inversion then starts from E(x) and runs ``refine_steps`` Adam steps of the inversion loss
    instead of ``inversion.steps`` from w_avg (plan_shared.encoder; benchmarks/inversion.py).
    Measured (benchmarks/inversion.py --images 128 --threads 1 --refine 0,5,10,12, real pneumoniamnist
    train images, a 400-step G, one run under load ~7 on 2 shared cores): 60 steps from w_avg pixel MSE
    0.0305, feature loss 0.047 (60 G evaluations per image); these defaults (E trained with
    pixel_weight 30, 400 x 64 samples; refine_lr 0.15, constant) reach MSE 0.0284 / feature loss 0.059
    after E + 12 steps (5x fewer evaluations; 0.0301 / 0.066 after 10 steps, 6x), vs 0.0651 / 0.252 for
    10 steps from w_avg. Before (pixel_weight 0, refine at inversion.lr, same G): 0.0379 / 0.149 after
    E + 10 steps. E's training is 51,200 G evaluations (21.1 per image of the 2428-image train split,
    so 1.8x fewer evaluations in all, not 5x, when the site trains E itself) and took 313 s at 1 thread.
    Stop 24, the demo's federated G (5 x 64 local steps), 256 real images, 1 thread, load ~2: 60 steps
    from w_avg 0.0281 / 0.046; these defaults (E 141 s) + 12 steps 0.0333 / 0.072 (pixel x1.19), E(x)
    alone 0.0287 / 0.390; refine_lr 0.05: + 12 steps 0.0304 / 0.095, + 20 0.0291 / 0.067; pixel_weight
    100 (+ refine_lr 0.05): E(x) 0.0255 / 0.357, + 12 steps 0.0295 / 0.098. The refinement trades
    pixel error for feature loss: at 5x fewer evaluations neither setting reaches both figures of 60
    steps from w_avg on this G (on the central 400-step G above it did for the pixel error).
    Stop 25, site-side adaptation (adapt_epochs; the 5 x 64 demo G of main d2530b6, 768 real train images =
    one site's count, E 400 x 64 samples, 1 thread, load 2-5): 60 steps from w_avg 0.0299 / 0.0526 (60
    evaluations); E + 12 steps (the former defaults) 0.0352 / 0.0842; E + 6 0.0392 / 0.127; these defaults
    (E adapted 4 epochs at 3e-3, batch 8, + 8 steps at refine_lr 0.1, 12 evaluations) **0.0284 / 0.0551**
    (pixel x0.95, feature x1.05, their sum x1.01); E adapted 3 + 3 steps (6 evaluations) 0.0308 / 0.0886.
    The adaptation alone (4 epochs) gives 0.0299 / 0.139 at E(x) (unadapted, 256 images, stop 24: 0.0287 / 0.390).
    """

    enabled: bool = Field(
        True, description="Initialise inversion from a learned encoder and refine for refine_steps "
        "(false = inversion.steps Adam steps from w_avg, the method as published). On since stop 24, when the "
        "coordinator began to train E and ship it with G (train_at): a site then pays refine_steps generator "
        "evaluations per image instead of inversion.steps (5x fewer at 12 vs 60) and trains nothing; "
        "measurements in the class docstring and the stop-24 note."
    )
    train_at: Literal["coordinator", "site"] = Field(
        "coordinator", description="Who trains E. coordinator: plan-server trains it once on the final G_ema's own "
        "samples (no real image), writes <run>/encoder.pt (reused when the digest of G matches) and sends it with G in "
        "every synthesis task; a site checks that it was trained for the G it received. site: every site trains its "
        "own (or loads `path`). A site that receives no encoder (standalone plan-client synthesize) trains its own."
    )
    steps: int = Field(400, ge=1, description="Encoder training steps; each renders `batch` generator samples.")
    batch: int = Field(64, ge=2, description="Generator samples (z -> w -> G(w)) per encoder training step.")
    lr: float = Field(2e-3, gt=0.0, description="Adam learning rate of the encoder (cosine decay to 5 % over `steps`).")
    width: int = Field(
        32, ge=4, description="Channels of the first conv; doubled per stride-2 stage down to 4x4 (capped at 4x width). "
        "32 at 32 px: ~0.4 M parameters."
    )
    pixel_weight: float = Field(
        30.0, ge=0.0, description="Weight of the pixel MSE of G(E(x)) vs x added to the W loss during training "
        "(costs one generator forward+backward per sample; 0 = W loss only). Measured (benchmarks/inversion.py "
        "setup, 128 real images): pixel MSE at E(x) 0.0564 (0) -> 0.0387 (10) -> 0.0322 (30) -> 0.0268 (100), "
        "although the W loss on generator samples rises (0.37 -> 0.52 -> 0.64 -> 0.84 sigma_W^2); after E + 12 "
        "refine steps 0.0302 (10) -> 0.0284 (30) -> 0.0293 (100; feature loss 0.059 at 30, 0.057 at 100)."
    )
    augment_noise: float = Field(
        0.0, ge=0.0, le=1.0, description="Training renders get Gaussian pixel noise of a per-sample std drawn "
        "uniformly from [0, augment_noise] (pixels in [-1, 1], clamped), so E sees images a little off the "
        "generator's manifold, as real images are; 0 = clean renders. Measured (benchmarks/inversion.py setup of the "
        "class docstring with --set inversion.encoder.augment_noise=0.1): 0.1 lowers the pixel MSE at E(x) 0.0322 -> 0.0307 but not after "
        "refinement (E + 12 steps 0.0284 -> 0.0287, E + 10 0.0301 -> 0.0300), so it stays off."
    )
    train_noise_mode: Literal["const", "random"] = Field(
        "const", description="Noise inputs of the training renders: const (what inversion renders with) or random "
        "(fresh per-pixel noise per sample). Measured (class docstring setup, --set "
        "inversion.encoder.train_noise_mode=random): E + 12 steps pixel MSE 0.0291 vs 0.0284 with const."
    )
    refine_steps: int = Field(
        8, ge=0, description="Adam steps of the inversion loss (pixel/feature weights of inversion) from E(x); 0 = E(x) "
        "as is. 8 after adapt_epochs 4 (12 before stop 25, without adaptation): 12 evaluations per image in all, 5x "
        "fewer than inversion.steps=60."
    )
    refine_lr: float | None = Field(
        0.1, gt=0.0, description="Adam learning rate of the refinement from E(x), in units of sigma_W "
        "(null = inversion.lr). 0.1 since stop 25 (was 0.15): after adapt_epochs 4, 8 steps reach pixel MSE / feature "
        "loss 0.0283 / 0.0552 at 0.08, 0.0284 / 0.0551 at 0.1, 0.0287 / 0.0565 at 0.12. Before (E with pixel_weight "
        "10, no adaptation, 12 steps, 128 real images): pixel MSE 0.0308 at 0.1, 0.0302 at 0.15 (constant); cosine "
        "decay was worse (0.0326 at 0.2)."
    )
    refine_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning rate over the refine_steps: constant, or cosine decay from refine_lr "
        "towards 0 (step t of T at refine_lr * (1 + cos(pi t / T)) / 2)."
    )
    adapt_epochs: int = Field(
        4, ge=0, description="Epochs of fine-tuning a copy of E on the site's own real train images with the "
        "inversion loss (pixel_weight x pixel MSE + feature_weight x phi_id feature loss of G(E(x)) vs x) before "
        "encoding them: amortised inversion (plan_shared.encoder.adapt_encoder). Each epoch costs one generator "
        "forward+backward per image, as one refinement step does. The adapted copy has seen patient images: it "
        "stays in the site's memory and is never written to `path` or sent. 0 = E as shipped. 4 (with refine_steps 8: "
        "12 evaluations per image, 5x fewer than inversion.steps) since stop 25; measurements in the class docstring."
    )
    adapt_lr: float = Field(3e-3, gt=0.0, description="Adam learning rate of the adaptation (cosine decay to 0). "
                            "Measured (4 epochs, batch 8, + 8 steps): pixel MSE / feature loss 0.0284 / 0.0551 at 3e-3, "
                            "0.0293 / 0.0648 at 5e-3; 6 epochs at batch 16: 0.0290 / 0.0735 at 1e-3.")
    adapt_batch: int = Field(8, ge=1, description="Real images per adaptation step (4 epochs + 8 steps: 0.0284 / "
                             "0.0551 at 8, 0.0285 / 0.0557 at 4; 6 + 6: 0.0280 / 0.0573 at 8, 0.0286 / 0.0633 at 16).")
    path: str | None = Field(
        None, description="Encoder file: loaded when it exists and was trained for the same generator weights "
        "(digest checked), else trained and written there. null = train in memory for every run. "
        "It holds no patient data (trained on generator samples only)."
    )


class InversionConfig(_Section):
    """B3: one W vector per real training image, Adam from w_avg (or from a learned encoder), batched."""

    steps: int = Field(60, ge=1, description="Adam steps per image (method.md: a few hundred; 60 at a higher lr fits the CPU budget).")
    lr: float = Field(0.05, gt=0.0, description="Adam learning rate in W, in units of sigma_W (mean per-coordinate std of W, measured on the generator).")
    batch_size: int = Field(256, ge=1, description="Images optimised together.")
    max_images: int | None = Field(
        None, ge=1, description="Invert at most this many training images (seeded stratified subsample; null = all, "
        "the default since stop 24: with the encoder each image costs encoder.refine_steps evaluations). Anchors come "
        "only from inverted images and the report states the number. Without the encoder, inversion is the slowest "
        "stage (~425 image-steps/s on 2 cores): 800 was the default then."
    )
    pixel_weight: float = Field(1.0, ge=0.0, description="Weight of the mean squared pixel error.")
    feature_weight: float = Field(
        1.0, ge=0.0, description="Weight of 1 - cosine similarity of phi_id features (a network trained locally, no downloads)."
    )
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)


class AnchorsConfig(_Section):
    """B4 k-same anchors and the pairs of anchors that paths join."""

    k: int = Field(5, ge=1, description="Latents averaged per anchor (k-same); a class with fewer than k images yields none.")
    pairs_m: int = Field(3, ge=1, description="Each anchor is paired with its m nearest anchors of the same class (each pair once).")
    groups: Literal["partition", "neighbourhood"] = Field(
        "partition", description="partition: k-same, the class's latents split into disjoint groups of k..2k-1, one "
        "anchor per group. neighbourhood: every latent averaged with its k-1 nearest latents of its class, one anchor "
        "per distinct group (about k times as many anchors, each still the mean of k images, but the groups overlap, "
        "so two anchors' difference involves fewer than k images: weaker than k-same; anchors never leave the site)."
    )
    far_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of each class's planned paths that join a seeded random pair of "
        "same-class anchors that are not among each other's pairs_m nearest (more distant anchors: variety); the rest "
        "join nearest pairs. Either kind fills in when the other runs out (plan_shared/pool_plan.py)."
    )
    spread: Literal["none", "members", "generator"] = Field(
        "generator", description="Default generator since stop 22, measured (benchmarks/pool_variety.py, g-fed4x40 G, "
        "demo partition, every train image inverted, one run per site, 1 thread): variant gen-T8 (generator, T 8, "
        "spread_max_scale 3) vs "
        "full-plain (none, T 20), site 0 / site 1: PLAN pool recall 0.005 -> 0.207 / 0.038 -> 0.387 (class-quota "
        "random 0.056 / 0.207), precision 0.539 -> 0.283 / 0.833 -> 0.615, exported 932 -> 833 / 1099 -> 942 "
        "(768 / 870 train images), TPR at 1 % FPR vs test 0.005 -> 0.003 / 0.007 -> 0.006, MIA AUC vs val 0.464 -> "
        "0.458 / 0.500 -> 0.516. With the demo's 200 inverted images the pool shrank instead (501 of 768: too few "
        "minority-class anchors for the pairs). Earlier (demo-s18b G, 6-site partition, site 0): anchors' mean "
        "||w - w_avg|| 2.37 -> 4.53 (single inverted latents 3.45, random 4.46). Restore the spread a group mean "
        "loses (its deviation from w_avg is ~1/sqrt(k) of a single "
        "latent's): each anchor's deviation from the generator's w_avg is rescaled along its own direction to a target "
        "length, by a factor clipped to [1, spread_max_scale] (plan_shared/anchors.py spread_anchors). none: the plain "
        "mean (k-same). members: target = the mean deviation length of the group's own k latents. generator: target = "
        "the mean deviation length of the generator's mapping-network samples at synthesis.truncation (the random "
        "baseline's). Both keep each anchor a "
        "function of its k-group only (and of G)."
    )
    spread_max_scale: float = Field(
        1.5, ge=1.0, description="Largest factor anchors.spread may stretch a group mean's deviation from w_avg by; it "
        "bounds one member's influence on its anchor: changing one latent by D moves the anchor by at most "
        "(spread_max_scale + 1) * |D| / k (plain mean: |D| / k). 1.5 since stop 22 (was 3): realism vs variety, "
        "measured (benchmarks/pool_variety.py, g-fed4x40 G, 320 images inverted, T 8, sites 0 / 1, one run each) in a "
        "fixed random-feature net that neither navigation nor the filter sees: PLAN precision / recall at 3: "
        "0.330 / 0.055 and 0.475 / 0.149; at 1.5: 0.569 / 0.047 and 0.677 / 0.080; spread none: 0.812 / 0.005 and "
        "0.860 / 0.009; filtered class-quota random samples 0.683 / 0.035 and 0.695 / 0.174. At 3 the anchors reach "
        "the radius of G's random samples, whose renders at the demo's G are mostly blobs; 1.5 keeps PLAN's realism "
        "near the random samples' with ~9x the recall of none."
    )


class NavigationConfig(_Section):
    """B5 PLAN path optimisation: L = l_dist*L_dist + l_id*L_id + l_class*L_class, interior points free.

    L_dist is the SUM over the T-1 segments of squared W distances; L_id and L_class are MEANS over the
    T-2 interior points. The published code sums chunk-means over chunks of 4 images, i.e. per-image weights
    of about 0.025 (KL) and 0.25 (CE) relative to L_dist. With means over T-2 = 48 points at T = 50,
    l_id = 0.025 * 48 = 1.2 and l_class = 0.25 * 48 = 12 reproduce those per-image weights.
    """

    T: int = Field(50, ge=3, description="Points per path including both anchors (published figures: 50).")
    steps: int = Field(30, ge=0, description="Adam steps (published: 500). 30 keeps plan-client synthesize on pneumoniamnist under 15 min on 2 CPU cores (measured 369 s for 40 steps x 48 paths x T 50).")
    lr: float = Field(0.1, gt=0.0, description="Adam learning rate (published: 0.1). Navigation runs in W standardised by sigma_W (mean per-coordinate std of W), so lr, L_dist and max_offset mean what they mean in StyleGAN2 W (std ~1).")
    lambda_dist: float = Field(1.0, ge=0.0, description="Weight of L_dist (sum over segments).")
    lambda_id: float = Field(1.2, ge=0.0, description="Weight of L_id = mean KL(U || softmax phi_id); 1.2 = 0.025 x 48 (published per-image weight at T = 50).")
    lambda_class: float = Field(12.0, ge=0.0, description="Weight of L_class = mean CE(phi_class, y); 12 = 0.25 x 48 (published per-image weight at T = 50).")
    chunk: int = Field(256, ge=1, description="Images per forward+backward chunk; sets peak memory, independent of paths x T.")
    max_offset: float | None = Field(
        None, gt=0.0, description="Optional bound: after each step every point is projected to within this W distance "
        "of its straight-line start (keeps images near the manifold). null = unbounded (published behaviour)."
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="Early stopping per path: a path stops (its points are no longer rendered) after this "
        "many consecutive steps in which its loss did not fall below (1 - early_stop_rel_tol) x the loss of its last "
        "progress; steps is then the cap, and every path ends on the best point it measured. null = off (every path "
        "runs steps steps and ends on its last point, the published behaviour)."
    )
    early_stop_rel_tol: float = Field(
        1e-3, ge=0.0, lt=1.0, description="Relative improvement of a path's loss that counts as progress for early_stop_patience."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Arithmetic of the generator and classifier passes during navigation. bf16: autocast to "
        "bfloat16 (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16); the path variables, Adam, L_dist and the "
        "losses' sums stay fp32. Measured with benchmarks/navigation.py --time-to-quality --precision fp32,bf16 "
        "(path quality scored in fp32). fp32 where the device has no bf16 units: autocast would emulate it, slower."
    )
    devices: list[str] | None = Field(
        None, min_length=1, description="Devices the paths are sharded over, one worker (thread with its own model copies) "
        "per entry, e.g. [cuda:0, cuda:1]; entries may repeat ([cpu, cpu] = two CPU workers). Each path's optimisation is "
        "independent of the others, so the result equals one worker's up to float rounding. null = all visible GPUs, "
        "else [cpu]."
    )

    @model_validator(mode="after")
    def _check_devices(self) -> NavigationConfig:
        for d in self.devices or []:
            if not re.fullmatch(r"cpu|cuda(:[0-9]+)?|mps", d):
                raise ValueError(f"navigation.devices: {d!r} is not a device (cpu, cuda, cuda:N or mps)")
        return self

    # Robust identity guidance (plan_shared/nav_objectives.py; measured by benchmarks/plan_vs_linear.py, issue #11.1).
    class_target: float | None = Field(
        0.9, gt=0.0, lt=1.0, description="L_class margin: a point's CE counts (and pushes) only while phi_class gives "
        "its class a probability below this, so paths stay as hard as real images instead of being pushed to certainty "
        "(issue #11.4). null = plain CE everywhere (published behaviour). The measured winner of "
        "benchmarks/plan_vs_linear.py (demo G, 80 identities, 8 paths x T 8, 30 steps): attacker id-prob 0.143 vs linear "
        "0.187, DCR 6.82 vs 6.60 px and 0.753 vs 0.662 attacker embedding, TSTR 0.810 vs 0.793, hf share 0.90x linear."
    )
    eot_samples: int = Field(
        0, ge=0, description="Expectation over transformations: L_id and L_class are averaged over this many random "
        "views of each rendered image (Gaussian blur, noise, shift; new draws every step), so a pixel pattern that "
        "fools phi_id on one view cannot lower the loss. 0 = score the plain render (default). Measured at 4: larger DCR "
        "but attacker id-prob above linear's (0.196 vs 0.187; 0.202 vs 0.174 in a 15-step run), so off."
    )
    eot_blur: tuple[float, float] = Field(
        (0.5, 1.2), description="EOT: per-view Gaussian blur sigma drawn uniformly in [lo, hi] pixels (lo > 0 damps "
        "every view's finest frequencies: sigma 0.5 keeps 29 % of the Nyquist amplitude, 1.0 keeps 0.7 %)."
    )
    eot_noise: float = Field(0.05, ge=0.0, description="EOT: std of additive Gaussian noise per view (images in [-1, 1]).")
    eot_shift: int = Field(2, ge=0, description="EOT: random translation of each view by up to this many pixels (reflect padding).")
    lambda_smooth: float = Field(
        0.0, ge=0.0, description="Low-pass bound: weight of L_smooth = mean over interior points of the per-pixel mean "
        "squared high-pass part (image minus its Gaussian blur, sigma smooth_sigma) of the change from the straight-line "
        "point's image; penalises texture added along the path, leaves coarse changes free. 0 = off (default): measured "
        "by benchmarks/plan_vs_linear.py at 400 it changed no measure against the class margin alone (8 paths, 30 steps) "
        "and costs one more render per chunk."
    )
    smooth_sigma: float = Field(1.0, gt=0.0, description="Low-pass bound: Gaussian sigma (pixels) separating coarse from fine.")
    layers: Literal["all", "coarse_middle"] = Field(
        "coarse_middle", description="Which synthesis layers navigation moves (W+ restriction, issue #11.1). all = "
        "every layer gets the optimised point's w (plain W, the published method). coarse_middle (default) = only the "
        "style inputs of the blocks below fine_from px get it; the fine layers get the straight-line w between the same "
        "anchors (the linear path's), so navigation can change shape and contrast but not add pixel-level texture. "
        "Measured by benchmarks/plan_vs_linear.py (demo G, 80 identities, 8 paths x T 12, 25 steps, inversion 30 steps "
        "as in the demo), with the class margin: attacker id-prob 0.120 vs 0.153 (W) and 0.183 (linear), pixel DCR 6.95 "
        "vs 6.28 and 6.27, attacker-embedding DCR 0.752 vs 0.746 and 0.660, TSTR 0.838 vs 0.827 and 0.791, hf share 1.11x "
        "linear vs 1.17x (real 1.37x). With the schema's inversion it still beats linear on all four but W is ahead by "
        "0.006 id-prob and 0.03 embedding DCR."
    )
    fine_from: int = Field(
        32, ge=8, description="With layers coarse_middle: synthesis blocks at this resolution (px) and above are fine "
        "and held on the linear path. StyleGAN's coarse 4-8 / middle 16-32 / fine 64+ split scaled to the 28-32 px "
        "generators: 4-8 coarse, 16 middle, 32 fine (3 of a 32 px generator's 11 style inputs held)."
    )

    trust_ratio: float | None = Field(
        0.35, gt=0.0, description="Trust region relative to the anchor pair (issue #11.1, realism): after each step "
        "every point's W offset from its straight-line start is projected to at most trust_ratio x ||w_b - w_a||, the "
        "distance between the path's two anchors, so L_id cannot drag the coarse layers off the generator's realistic "
        "manifold (far pairs may bend more than near ones). Applied together with max_offset (the tighter bound wins). "
        "null = unbounded (published behaviour). 0.35 (default) measured by benchmarks/plan_vs_linear.py (demo-s18b "
        "round-4 G and its federated D, 80 identities, 16 paths x T 20, 8 steps as in the demo, inversion 30 steps), vs "
        "unbounded W+ and linear: realism (the checkpoint's D, not optimised) D logit -0.75 vs -0.92 and -0.60 (real "
        "0.51), k-NN precision in D features 0.39 vs 0.26 and 0.48, KID 0.119 vs 0.137 and 0.100; attacker id-prob 0.159 "
        "vs 0.148 and 0.172, pixel DCR 6.37 vs 6.69 and 5.96, attacker-embedding DCR 0.738 vs 0.743 and 0.651, TSTR 0.812 "
        "vs 0.833 and 0.756, hf share 0.99x linear vs 1.01x: still ahead of linear on all four, about half the realism "
        "loss recovered; the strips' lateral bright blobs are fainter. The absolute max_offset 1.0 measured alike (D "
        "0.399 precision, id-prob 0.163, TSTR 0.793); 0.5 / max_offset 1.5 recover almost nothing. No extra render."
    )

    lambda_real: float = Field(
        0.0, ge=0.0, description="Realism hinge (issue #11.1): weight of L_real = mean over interior points of "
        "relu(D(G(w_lin)) - D(G(w))), the drop of the discriminator's logit below the straight-line point's; needs the "
        "generator's discriminator (optimise_paths disc=). 0 = off (default): the site pipeline does not pass D yet, "
        "and it doubles a navigation chunk's cost (one more render of the straight-line points + D forward/backward: "
        "measured 6.4 vs 3.4 s per 128-point chunk on the demo G, loaded 2 cores). Measured by benchmarks/plan_vs_linear.py "
        "(same setting as trust_ratio): at 2 with trust_ratio 0.35, k-NN precision in the attacker's embedding (independent "
        "of D) 0.889 vs 0.819 (trust region alone), 0.802 (unbounded) and 0.851 (linear); attacker id-prob 0.153 (linear "
        "0.172), pixel DCR 6.24 (5.96), attacker-embedding DCR 0.707 (0.651), TSTR 0.833 (0.756), hf share 1.03x linear. "
        "The better realism/privacy trade-off once D reaches the site at an affordable cost."
    )

    @model_validator(mode="after")
    def _eot_range(self) -> NavigationConfig:
        lo, hi = self.eot_blur
        if not 0.0 <= lo <= hi:
            raise ValueError(f"eot_blur must be [lo, hi] with 0 <= lo <= hi, got {list(self.eot_blur)}")
        return self


class FilterConfig(_Section):
    """B6 privacy filter: an image leaves only if every condition holds (recorded per image)."""

    tau_id: float = Field(0.5, gt=0.0, le=1.0, description="Accept only if phi_id's max softmax < tau_id (members ~0.99, real non-members ~0.28).")
    tau_indep: float = Field(0.5, gt=0.0, le=1.0, description="Accept only if the independent identity model's max softmax < tau_indep.")
    delta_quantile: float = Field(
        0.05, gt=0.0, lt=1.0, description="delta = this quantile of the calibration images' distances to the closest other "
        "protected real image, in the embedding space (normalised features of the independent identity model); accept "
        "only if the distance to the closest protected real image (dcr) > delta."
    )
    protect: list[Literal["train", "val", "test"]] = Field(
        ["train", "val", "test"], min_length=1, description="Splits whose real images the exclusion zone protects (dcr is "
        "measured to all of them). Every real image at the site is a patient: keep members (train) and non-members "
        "(val, and test, the non-members of the distance membership inference) alike, or distance to the pool reveals "
        "membership. Must contain train."
    )
    calibration_split: Literal["val", "test"] = Field(
        "val", description="Protected held-out split from which the calibration images are drawn (must be in protect)."
    )
    calibration_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of calibration_split drawn (seeded) to calibrate delta against every "
        "OTHER protected image; the drawn images are protected too afterwards."
    )
    identity_classes: Literal["protected", "train"] = Field(
        "protected", description="Classes of the identity models (phi_id: navigation's L_id and tau_id; the independent "
        "model: tau_indep and the dcr embedding). 'protected': one class per protected identity of the exclusion zone's "
        "reference set (train, and val/test except the calibration images, which are never a class), so members and "
        "non-members are rejected and pushed away alike; 'train': train identities only (the identity checks then mark "
        "members: candidates near a member are rejected, candidates near a non-member are not). The held-out images "
        "enter as identities only, never with their class label."
    )
    pixel_zone: bool = Field(
        True, description="Also keep candidates more than delta_pixel from every protected image in pixel space, "
        "delta_pixel calibrated like delta (same quantile, same calibration images). The embedding is learned (never on the "
        "calibration images) and may not catch a light copy of an image it did not learn; pixel distance treats all "
        "splits alike. "
        "Reported as filter.delta_pixel and reject reason pixel_dcr (not a manifest record field)."
    )
    planted: int = Field(50, ge=0, description="Lightly augmented real train images mixed into the candidates; all must be rejected (never exported). "
                         "As many light copies of protected held-out images are scored too and their rejection is reported "
                         "(filter.planted_heldout_rejected), not blocking (with identity_classes 'train' only the distance "
                         "checks can catch them).")
    block_on_planted: bool = Field(
        True, description="If any planted near-duplicate passes the filter, the filter is not trusted and NOTHING is "
        "exported (report: filter.export_blocked); the per-image decisions are still reported for diagnosis."
    )

    @model_validator(mode="after")
    def _zone(self) -> FilterConfig:
        if "train" not in self.protect:
            raise ValueError(f"filter.protect={self.protect}: must contain 'train' (the members are patients to protect)")
        if self.calibration_split not in self.protect:
            raise ValueError(f"filter.calibration_split={self.calibration_split!r} is not in filter.protect={self.protect}")
        if len(set(self.protect)) != len(self.protect):
            raise ValueError(f"filter.protect={self.protect}: a split is listed twice")
        return self


class SynthesisConfig(_Section):
    """What `plan-client synthesize` produces."""

    method: SynthesisMethod = Field(
        "plan", description="Method whose accepted images are exported (report keys method, method_requested, "
        "method_reason). auto: the site's own verdict decides (report key verdict, plan_shared.variety.plan_verdict, "
        "computed in the compare stage, which runs before the export): the site exports verdict.supported, i.e. plan "
        "when PLAN is safer than filtered random samples on the attacker's measures at equal utility (or better in "
        "utility and worse on no measure), random otherwise; when compare is off or the verdict cannot decide (no "
        "utility or no membership inference for plan or random) it exports synthesis.method_fallback. plan / linear / "
        "random force that method whatever the verdict says. The default stays plan because auto, measured, made the "
        "pool worse: in the stop-19 demo (plan-server demo, idle) auto exported random at sites 1 and 2, whose "
        "prevalence-matched random sets held 230 and 52 images (phi_class labels random samples mostly as one "
        "class), so the pool had 1,186 images and pooled phi_down scored 0.571 (kappa 0.141) against 0.863 (0.726) "
        "for the plan pool of the stop-18 demo; the verdict's utility is the site-level TSTR, which a small, "
        "prevalence-matched random set can win. Read each run's verdict: on the same demo it still says PLAN is not "
        "shown safer than filtered random at sites 1 and 2."
    )
    method_fallback: Method = Field(
        "plan", description="With synthesis.method auto: the method exported when compare is off or the verdict "
        "cannot decide (report key method_reason says so)."
    )
    max_paths: int | None = Field(
        48, ge=1, description="At most this many anchor pairs (paths) per method, spread over classes (null = all pairs)."
    )
    random_samples: int | None = Field(
        None, ge=1, description="Candidates of the random baseline (null = as many as the path methods); labelled by phi_class."
    )
    random_per_class: bool = Field(
        True, description="Draw the random baseline to the path methods' class counts: GAN samples are drawn in batches "
        "and labelled by phi_class until each class has as many as PLAN's candidates of that class (scaled to "
        "synthesis.random_samples when that is set) or synthesis.random_max_draws x that many were drawn "
        "(plan_shared/navigation.py draw_to_class_quotas; report keys methods.random.drawn and candidates_per_class). "
        "false: unconditional draws, whose class shares are the generator's as phi_class sees them: measured in the "
        "stop-19/21 demos, 0-13 images of site 1's minority class survived prevalence matching, so random's utility "
        "and pool size measured the class balance, not the method."
    )
    random_max_draws: float = Field(
        8.0, ge=1.0, description="With synthesis.random_per_class: at most this many times the total quota of GAN "
        "samples are drawn; a class the generator (as phi_class labels it) rarely gives then keeps fewer (a warning "
        "and report keys methods.random.quota_per_class / candidates_per_class say so). Measured in the stop-22 demo "
        "at 20: sites 0 / 2 met their quotas after 4.2x / 11.3x draws; site 1's phi_class labelled 2 of 24,960 "
        "random samples 'normal' (quota 192), and those draws cost 142 s of its render stage."
    )
    random_give_up: float = Field(
        0.05, ge=0.0, lt=1.0, description="With synthesis.random_per_class: also stop drawing when every class still "
        "short of its quota could gain less than this share of its quota from the draws left up to "
        "synthesis.random_max_draws, at the one-sided 95 % upper bound of its rate so far (0 = draw to the cap; report "
        "key methods.random.stopped). Only a class phi_class almost never gives stops it: the stop-26 demo's site 1 "
        "drew all 9,984 allowed samples for none of 192 'normal' ones; with 0.05 it stops after 2,560."
    )
    truncation: float = Field(0.7, gt=0.0, le=1.0, description="Truncation of random samples.")
    strip_pairs: int = Field(4, ge=1, description="Pairs shown in the linear-vs-PLAN strip figure.")
    compare: bool = Field(
        True, description="Also train the utility classifier on the filter-passing images of the other methods and run "
        "the distance membership inference on each (report key compare; the privacy-utility plot).",
    )
    match_prevalence: bool = Field(
        True, description="Subsample the accepted images before export so that the exported class shares match the "
        "site's real train priors (plan_shared/prevalence.py; report key prevalence): a pool whose class shares "
        "differ shifts every downstream model's decision threshold.",
    )
    pool_factor: float | None = Field(
        1.0, gt=0.0, description="Full-size pool: plan the paths so that the site exports about pool_factor x its real "
        "train images, each class's share from the site's real train priors (plan_shared/pool_plan.py; report keys "
        "anchors.plan_*). max_paths still caps the paths. null = max_paths pairs spread evenly over classes (no target)."
    )
    planned_accept_rate: float = Field(
        0.7, gt=0.0, le=1.0, description="Filter accept rate the path plan assumes (candidates = target / rate). PLAN's "
        "measured rate: 0.71-0.85 in the demo at 0.6 (which then exported 1.21-1.43x the train images per site: "
        "958/1241/958 for 768/870/790), 0.71 on a 6-site partition (benchmarks/pool_variety.py, site 0: 913 of 1278 "
        "passed, 792 exported after prevalence matching for 874 train images, 0.91x)."
    )
    verdict_utility_tol: float = Field(
        0.02, ge=0.0, le=1.0, description="Verdict (report key verdict): PLAN counts as at equal utility with filtered "
        "random samples when its accuracy is at least random's minus this."
    )
    verdict_tpr_tol: float = Field(
        0.01, ge=0.0, le=1.0, description="Verdict: PLAN's TPR at 1 % FPR of the distance MIA counts as safer / worse "
        "than random's only when it differs by more than this (0.01 = 1 % of the members; less is a few images)."
    )
    verdict_id_prob_tol: float = Field(
        0.01, ge=0.0, le=1.0, description="Verdict: same for the mean max probability of the independent identity model."
    )
    verdict_min_coverage: float = Field(
        0.9, ge=0.0, le=1.0, description="Verdict: a method whose export set fills less than this share of some "
        "class's full-size quota (pool_factor x the site's train images x the class's prior; report key "
        "compare.<method>.coverage) does not win the verdict over one that fills it, unless that costs privacy "
        "(random is not preferred over a safer PLAN; PLAN not over random where PLAN is worse on a measure). Stop 19's "
        "demo exported 52 filtered random images at a site with 790 train images: a researcher's pool lost that site. "
        "0 = off. Has no effect with pool_factor null."
    )
    pr_k: int = Field(
        3, ge=1, description="k of the k-NN manifolds of the per-method precision/recall against the real train split "
        "(Kynkaanniemi et al. 2019), on phi_class's penultimate features (report keys compare.<method>.precision/recall).",
    )

    def exportable_methods(self) -> tuple[Method, ...]:
        """The methods a site may export under this section: the forced one, or every method with ``auto``."""
        return tuple(m for m in METHODS if self.method in ("auto", m))


class FederationConfig(_Section):
    """Federated generator training (Flower): what both roles read alike.

    The coordinator's values rule a run (rounds, local steps, sharing, models). Where each
    role keeps its state and keys and how it is reached are in the ``site`` and
    ``coordinator`` sections.
    """

    rounds: int = Field(10, ge=1, description="Federated rounds R.")
    local_steps: int = Field(50, ge=1, description="Local GAN steps per site and round.")
    share: Literal["gd", "g"] = Field(
        "gd", description="gd: G and D averaged (FedGAN); g: only G averaged, each site keeps its own D between rounds."
    )
    min_nodes: int = Field(
        2, ge=1, description="A round starts with at least this many connected sites and accepts this many replies."
    )
    wait_for_nodes_s: float = Field(300.0, gt=0.0, description="Deadline for min_nodes sites to connect (clear error after).")
    round_timeout_s: float = Field(1800.0, gt=0.0, description="A round stops waiting for late sites after this many seconds.")
    straggler_grace: float | None = Field(
        2.0,
        ge=0.0,
        description="Once min_nodes sites have replied, wait for the others at most this multiple of the time that "
        "took (but at least straggler_min_wait_s); a site still training then is left out of the round and logged. "
        "null: wait for every site until round_timeout_s.",
    )
    straggler_min_wait_s: float = Field(
        30.0, ge=0.0, description="Shortest wait for the remaining sites once min_nodes have replied (see straggler_grace)."
    )
    reply_poll_s: float = Field(
        0.2, gt=0.0, le=10.0, description="Coordinator: seconds between two polls for the sites' replies (server/messaging.py; Flower's own send_and_receive sleeps 3 s)."
    )
    pack_weights: bool = Field(
        True, description="Coordinator: send the weights as one flat array (plan_shared/packing.py) instead of one "
        "Flower object per tensor; each object costs a request on every hop. Sites answer in the form they received.")
    sample_grid: int = Field(64, ge=1, description="Images in the per-round sample grid of G_ema.")
    server_opt: Literal["none", "momentum", "adam"] = Field(
        "none", description="Coordinator: optimiser on the averaged update delta = FedAvg(sites) - global, applied to "
        "G's parameters and, with share gd, D's (buffers and G_ema take the plain average; server/server_opt.py). "
        "none: global = FedAvg (today); momentum: FedAvgM, m = server_momentum*m + delta, global += server_lr*m; "
        "adam: FedAdam with server_adam_beta1/beta2/eps. The state is checkpointed every round (exact resume). "
        "none stays the default, by measurement (benchmarks/federated_vs_central.py --rounds 4 --local-steps 40 "
        "--samples 500 --variants fedavg,fedavgm,fedavgm-b0.5,fedadam,fedavg-g,fedavg-lr2,fedavg-r1x5, pneumoniamnist, "
        "3 Dirichlet(0.5) sites, seed 0, one run): FD vs real val 24.5 (FedAvg), 19.1 (FedAvgM 0.9), 24.2 (FedAvgM 0.5), "
        "18.2 (FedAdam lr 0.01), 21.7 (G only shared), 23.4 (2x lr), 25.5 (5x R1); central at the same 160 sequential "
        "steps 20.7. FedAvgM 0.9 and FedAdam win on FD vs val only: they lose on KID vs val (1.89 and 1.95 vs 1.54), "
        "FD vs test (10.1, 11.4 vs 8.2), KID vs test (1.27, 1.54 vs 0.44) and their "
        "samples carry speckle; no variant draws anatomy at 160 sequential steps (central does by 480).")
    server_lr: float = Field(1.0, gt=0.0, le=10.0, description="Server learning rate of server_opt momentum/adam (1.0 with "
                             "server_momentum 0 is FedAvg).")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="FedAvgM momentum beta (server_opt momentum).")
    server_adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="FedAdam first-moment decay (server_opt adam).")
    server_adam_beta2: float = Field(0.99, ge=0.0, lt=1.0, description="FedAdam second-moment decay (server_opt adam).")
    server_adam_eps: float = Field(1e-3, gt=0.0, description="FedAdam epsilon (tau in Reddi et al.; server_opt adam).")
    post_training: bool = Field(
        False,
        description="After the rounds: synthesis at every site with export to the pool, downstream training on the "
        "pulled pool, federated evaluation and privacy audit, report (needs a pool: coordinator.pool_listen or "
        "coordinator.pool_address; each site exports to its site.pool_address).",
    )


class PoolLimitsConfig(_Section):
    """Limits of the pool service, so that no site can block it and no stored row can break reading it.

    ``plan-server pool serve`` takes each as an option (``--idle-timeout-s`` ...) with these
    defaults; ``plan-server coordinate`` passes the ``pool.limits`` of coordinator.yaml.
    """

    workers: int = Field(16, ge=2, description="Threads serving calls (each open stream holds one).")
    max_streams_per_identity: int = Field(
        4, ge=1, description="Open streaming calls (Offer/Push/Catalog/Fetch) per certificate identity; more are "
        "refused with RESOURCE_EXHAUSTED, so one site's streams cannot take every worker.")
    idle_timeout_s: float = Field(
        60.0, gt=0, description="An Offer/Push stream that sends nothing for this long is aborted (DEADLINE_EXCEEDED) "
        "and its files removed at once.")
    call_timeout_s: float = Field(
        3600.0, gt=0, description="Longest Offer/Push stream, whatever the client's deadline (4 GiB at ~1.2 MB/s).")
    site_quota_mb: float = Field(51200.0, gt=0, description="Bytes (MiB) one site may store, stored bundles plus pushes in flight.")
    site_quota_images: int = Field(5_000_000, ge=1, description="Images one site may store.")
    max_manifest_kb: int = Field(
        131072, ge=1, description="Largest signed bundle manifest, KiB, counted while it arrives (before any parsing); "
        "128 MiB holds 100,000 records.")
    max_field_chars: int = Field(
        256, ge=32, description="Longest text field of a bundle (created, site_id, image id, class name, method); "
        "longer is refused at ingest and cut in List/Catalog replies.")
    keep_interrupted_s: float = Field(
        300.0, ge=0, description="Verified files of a push cut mid-way are kept this long so a retry need not resend "
        "them, then removed (0 = at once). Refused or idle-aborted pushes are always removed at once.")
    page_kb: int = Field(1024, ge=1, description="List/Catalog replies are paged (List) and batched (Catalog) at this many KiB.")

    @model_validator(mode="after")
    def _streams_below_workers(self) -> PoolLimitsConfig:
        if self.max_streams_per_identity >= self.workers:
            raise ValueError(f"max_streams_per_identity ({self.max_streams_per_identity}) must be below workers "
                             f"({self.workers}): otherwise one identity can hold every worker")
        return self


class PoolConfig(_Section):
    """Where synthetic images go (stage C) and where the coordinator reads them back (stage D).

    What both roles read alike: the TLS name, retries, the service's limits. Where the pool
    listens and where a site or the coordinator reaches it, and with which credentials, are
    role keys: ``coordinator.pool_listen`` / ``coordinator.pool_address`` /
    ``coordinator.reader_dir`` and ``site.pool_address`` / ``site.pool_keys_dir``.
    """

    server_name: str | None = Field(None, description="TLS name to expect on the pool's certificate (default: the host).")
    retries: int = Field(
        5, ge=0, description="Retries of a failed pool call (export, ls, pull; `--retries` of each command) after a "
        "transient failure (plan_shared/pool_transport.py lists the retried gRPC codes).")
    backoff_s: float = Field(1.0, ge=0.0, description="Wait before the first retry of a pool call; doubled per retry.")
    max_backoff_s: float = Field(30.0, ge=0.0, description="Longest wait between two retries of a pool call.")
    web_retries: int = Field(
        2, ge=0, description="Retries of a failed call by `pool web` (few: a page waits for them).")
    web_backoff_s: float = Field(0.5, ge=0.0, description="`pool web`: wait before its first retry; doubled per retry.")
    policy_file: str | None = Field(
        None, description="Coordinator: the JSON policy file the pool enforces (`pool serve --policy`). `coordinate` "
        "and `demo` write it from the policy section (default STATE/pool-policy.json) and the ServerApp records the final "
        "generator's digest in it before the synthesis phase. null with an external pool: no policy file."
    )
    limits: PoolLimitsConfig = Field(default_factory=PoolLimitsConfig)


class SiteConfig(_Section):
    """Site (site.yaml): where this hospital keeps its state and keys and how it reaches the coordinator.

    Read by ``plan-client start`` (client/supernode.py); a coordinator's configuration holds
    none of these keys (``load_config(..., role=...)``). The simulation plays every site on
    one machine and reads ``state_dir`` and ``keys_dir`` as the folders of all virtual sites.
    """

    state_dir: str = Field(
        "plan-state", description="This site's state: local discriminator/optimiser state, Flower home, node.toml, "
        "worker key, synthesis output. Simulation: virtual site NAME keeps its state in state_dir/sites/NAME "
        "(`plan-server simulate`/`demo` set it to their output folder).",
    )
    keys_dir: str = Field(
        "certs", description="This site's own keys folder (`plan-client keys init` + `keys install`: node key, "
        "client.crt, client.key, signing.key, ca.crt). Simulation: the folder holding every virtual site's sites/NAME.",
    )
    superlink_address: str = Field(
        "127.0.0.1:9443",
        description="The coordinator's public fleet address (the TLS proxy, which forwards only /v1/fleet/*).",
    )
    supernode_port: int = Field(9094, ge=1, le=65535, description="Local SuperNode runtime port (127.0.0.1; one per SuperNode on a machine).")
    superexec_poll_s: float = Field(
        0.2, ge=0.01, le=60.0, description="Seconds between the SuperNode's SuperExec polls for a new task "
        "(FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's own default is 1.0).")
    worker: bool = Field(
        True, description="`plan-client start` also starts a persistent worker (loopback only, authenticated "
        "by a secret made per start) that keeps torch, the code and the site's images loaded; the per-message "
        "Flower ClientApp process forwards train messages to it instead of importing torch itself.")
    supernode_poll_s: float | None = Field(
        0.25, ge=0.01, le=3.0, description="Longest sleep of the SuperNode's own loop: between two pulls that found "
        "no message (Flower 1.42 hard-codes 3 s: a new round waits 1.5 s on average before a site sees it) and between "
        "two checks for a ClientApp's reply (0.5 s). `plan-client start` runs Flower's SuperNode main through "
        "client/supernode_runner.py, which caps those sleeps of flwr.supernode.start_client_internal at this value "
        "(and warns, running Flower's unchanged, where the installed flwr no longer has them). Each idle site then "
        "sends one pull per supernode_poll_s to the coordinator. null: Flower's own sleeps (plain flower-supernode).")
    clientapp_forkserver: bool = Field(
        True, description="Flower starts a fresh `flwr-clientapp` process per message, which spends ~3 s importing "
        "Flower. `plan-client start` also starts a warm process (client/clientapp_forkserver.py; Flower and the "
        "third-party modules imported, not torch or the app) that forks each of those processes instead; the "
        "SuperExec reaches it through a `flwr-clientapp` launcher in STATE/bin placed first on the SuperNode's PATH "
        "(AF_UNIX socket in STATE, mode 0600, authenticated by a secret made per start). The forked process runs "
        "Flower's own flwr-clientapp main, so the FAB's app is loaded as before; where the fork server cannot be "
        "reached the launcher runs Flower's flwr-clientapp.")
    pool_address: str | None = Field(
        None, description="host:port of the coordinator's pool service, where this site exports its synthetic images "
        "(e.g. coordinator.example.org:9444, the coordinator.pool_listen port); null = no export. In simulation "
        "`demo` sets it to the pool it starts.",
    )
    pool_keys_dir: str | None = Field(
        None, description="Folder with the credentials this site pushes to the pool with (client.crt, client.key, "
        "signing.key, ca.crt); null = keys_dir (in simulation keys_dir/sites/NAME).",
    )


class CoordinatorConfig(_Section):
    """Coordinator (coordinator.yaml): its state, its CA and the services it starts.

    Read by ``plan-server coordinate`` (server/coordinate.py) and the ServerApp; a site's
    configuration holds none of these keys (``load_config(..., role=...)``).
    """

    state_dir: str = Field(
        "plan-state", description="The coordinator's state: Flower state.db, superlink.log, run/ (checkpoints, "
        "samples, metrics, report), pool-store, reader/. Simulation: the output folder.",
    )
    ca_dir: str = Field(
        "certs", description="The CA folder of `plan-server certs init/enroll` (ca.crt/key, server certificate, "
        "registry.json of enrolled sites and readers); holds no site's private key.",
    )
    superlink_port: int = Field(9093, ge=1, le=65535, description="SuperLink HTTPS port, bound to 127.0.0.1 only (the TLS proxy exposes /v1/fleet/*).")
    pool_listen: str | None = Field(
        "0.0.0.0:9444",
        description="host:port on which `plan-server coordinate` starts the pool service (mutual TLS, store "
        "STATE/pool-store) when federation.post_training is true; sites must reach this port. null = do not start "
        "one, pull from an external `plan-server pool serve` at pool_address.",
    )
    pool_address: str | None = Field(
        None, description="host:port where the coordinator pulls the pool from: set automatically when `coordinate` "
        "(pool_listen) or `demo` starts the pool itself; needed only with pool_listen: null (an external pool).",
    )
    reader_dir: str | None = Field(
        None, description="The reader's credentials folder the coordinator pulls the pool with; null = `coordinate` "
        "uses STATE/reader (enrolling reader 'coordinator' there when missing), elsewhere the first ca_dir/readers/NAME.",
    )



class PolicyConfig(_Section):
    """Coordinator: the federation's privacy policy, enforced by the pool on every bundle.

    ``coordinate`` and ``demo`` write it to ``pool.policy_file`` and start the pool with it;
    the ServerApp adds the final generator's weights digest before the synthesis phase, and
    the pool refuses any bundle whose records, report.json or images break it
    (plan_shared/policy.py). A null key takes this configuration's own setting (named in
    each description), so the pool holds every site to what the coordinator asked for.
    """

    max_tau_id: float | None = Field(None, gt=0.0, le=1.0, description="Largest tau_id a record may carry (null = filter.tau_id).")
    max_tau_indep: float | None = Field(None, gt=0.0, le=1.0, description="Largest tau_indep a record may carry (null = filter.tau_indep).")
    min_delta_quantile: float | None = Field(
        None, gt=0.0, lt=1.0, description="Smallest filter.delta_quantile a site's report.json may state (null = filter.delta_quantile)."
    )
    min_k: int | None = Field(None, ge=1, description="Smallest anchors.k a site's report.json may state (null = anchors.k).")
    min_planted: int | None = Field(
        None, ge=0, description="Fewest planted near-duplicates a site's filter must have been tested with (null = filter.planted)."
    )
    all_planted_rejected: bool | None = Field(
        None, description="Refuse a bundle whose report.json says a planted near-duplicate passed (null = filter.block_on_planted)."
    )
    methods: list[Method] | None = Field(
        None, min_length=1, description="Methods whose images the pool accepts (null = [synthesis.method]; "
        "every method when synthesis.method is auto, since each site's verdict picks its own)."
    )
    image_size: int | None = Field(
        None, ge=8, le=1024, description="Exact PNG width = height (null = data.size, else what the sites describe)."
    )
    channels: Literal[1, 3] | None = Field(None, description="PNG channels (null = data.channels, else what the sites describe).")
    num_classes: int | None = Field(None, ge=1, description="Labels must lie in [0, num_classes) (null = what the sites describe).")


class SiteMinimumsConfig(_Section):
    """Site (site.yaml): the loosest synthesis settings this hospital accepts from the coordinator.

    ``plan-client start`` passes them in the node config; a synthesis request whose settings
    are looser is refused at the site, naming the key and both values. null = no local
    minimum for that key (set them in every hospital's site.yaml).
    """

    min_k: int | None = Field(None, ge=1, description="Refuse a request with anchors.k below this.")
    max_tau_id: float | None = Field(None, gt=0.0, le=1.0, description="Refuse a request with filter.tau_id above this.")
    max_tau_indep: float | None = Field(None, gt=0.0, le=1.0, description="Refuse a request with filter.tau_indep above this.")
    min_delta_quantile: float | None = Field(None, gt=0.0, lt=1.0, description="Refuse a request with filter.delta_quantile below this.")
    min_planted: int | None = Field(None, ge=0, description="Refuse a request with filter.planted below this.")
    block_on_planted: bool | None = Field(None, description="true: refuse a request with filter.block_on_planted false.")


class AttackerConfig(_Section):
    """Re-identification attacker of the audit (plan_shared/attacker.py): a model neither navigation nor the filter uses.

    A different architecture (residual BasicBlocks, ResNet-18 style, three stages) and its own recipe (Adam, cosine
    decay, CosFace margin head, crop from zero padding / random erasing / gamma jitter), one class per
    identity of the site's train images. Measured by benchmarks/plan_vs_linear.py.
    """

    width: int = Field(16, ge=4, description="Channels of the first stage; doubled per stage.")
    blocks: list[int] = Field([2, 2, 2], min_length=1, max_length=4, description="BasicBlocks per stage (stride 2 from stage 2 on).")
    feature_dim: int = Field(128, ge=8, description="Embedding size (the space of the attacker DCR).")
    epochs: int = Field(40, ge=1, description="Epochs (each identity's weight is updated about once per epoch).")
    batch_size: int = Field(
        16, ge=2, description="Small batches: more steps per epoch (at 64, 80 identities got 1 step per epoch and the "
        "attacker stayed at chance: mean max-prob 0.065 on its own training images)."
    )
    lr: float = Field(2e-3, gt=0.0, description="Adam learning rate at the start (cosine decay to 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam (coupled L2) weight decay.")
    scale: float = Field(16.0, gt=0.0, description="Cosine logit scale s (softmax over s * cos).")
    margin: float = Field(0.2, ge=0.0, lt=1.0, description="CosFace additive margin on the true identity's cosine in training.")
    crop_pad: int = Field(3, ge=0, description="Random crop from this many pixels of zero (black) padding.")
    erase_p: float = Field(0.3, ge=0.0, le=1.0, description="Probability of erasing one random rectangle (1/8 to 1/3 of each side).")
    gamma: float = Field(0.2, ge=0.0, description="Gamma jitter: exponent exp(U(-gamma, gamma)) on [0, 1] intensities.")
    seed: int = Field(4242, ge=0, description="Its own seed (not derived from the site seed used by phi_id).")
    max_images: int | None = Field(
        None, ge=2, description="Train the attacker on at most this many of the site's train images (a seeded random "
        "subsample, one identity each as in phi_id; its identity probabilities cover those). The attacker DCR is "
        "still taken to every train image. null = all (the audit's full strength); the demo preset sets a budget."
    )


class AuditConfig(_Section):
    """Privacy audit against models the pipeline does not use for navigation or filtering."""

    attacker: AttackerConfig = Field(default_factory=AttackerConfig)
    attacker_in_pipeline: bool = Field(
        True, description="Train the attacker once per site in the pipeline's compare stage (synthesis.compare) and "
        "report, per method, its mean max identity probability and the DCR in its embedding (report.json "
        "compare.<method>.attacker_*, the attacker's own figures under attacker)."
    )


class PlanConfig(BaseModel):
    """The whole configuration of a site, a coordinator or a simulation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, ge=0, description="Drives Python, NumPy, torch and the partitioner.")
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch's default).")
    site_id: str = Field("site-0", min_length=1, description="This site's name (used in bundles and logs).")
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    gan: GanConfig = Field(default_factory=GanConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    classes: ClassesConfig = Field(default_factory=ClassesConfig)
    inversion: InversionConfig = Field(default_factory=InversionConfig)
    anchors: AnchorsConfig = Field(default_factory=AnchorsConfig)
    navigation: NavigationConfig = Field(default_factory=NavigationConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    site: SiteConfig = Field(default_factory=SiteConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    site_minimums: SiteMinimumsConfig = Field(default_factory=SiteMinimumsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _check_device(self) -> PlanConfig:
        d = self.device
        if not (d in ("auto", "cpu", "cuda", "mps") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {d!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """sha256 of the canonical JSON form (recorded in checkpoints and bundles)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_yaml(self) -> str:
        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return text


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: key '{key}' = {value!r}: {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


class _Null:
    """Override value meaning "set this key to null" (a plain ``None`` override means "not given")."""

    def __repr__(self) -> str:
        return "NULL"


NULL: Any = _Null()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = None if value is NULL else value


#: Keys that meant one thing for a site and another for the coordinator, and where each now lives.
MOVED_KEYS: dict[str, str] = {
    "federation.state_dir": "coordinator.state_dir on the coordinator, site.state_dir at a site",
    "federation.certs_dir": "coordinator.ca_dir on the coordinator, site.keys_dir at a site",
    "federation.superlink_port": "coordinator.superlink_port",
    "federation.superlink_address": "site.superlink_address",
    "federation.supernode_port": "site.supernode_port",
    "federation.superexec_poll_s": "site.superexec_poll_s",
    "federation.site_worker": "site.worker",
    "pool.address": "site.pool_address at a site (where it exports), coordinator.pool_address on the coordinator "
                    "(an external pool it pulls from)",
    "pool.listen": "coordinator.pool_listen",
    "pool.credentials": "site.pool_keys_dir at a site, coordinator.reader_dir on the coordinator",
}

Role = Literal["site", "coordinator"]
"""Whose file is read: a site's (site.yaml) or the coordinator's (coordinator.yaml); None = either (simulation)."""

#: The top-level sections only one role reads; the other role's file must not hold them.
ROLE_SECTIONS: dict[str, tuple[str, ...]] = {"site": ("site", "site_minimums"), "coordinator": ("coordinator", "policy")}


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in tree.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, f"{prefix}{k}."))
    return out


def _check_keys(keys: list[str], where: str, role: Role | None) -> None:
    """Refuse a moved key (naming its new home) and, for ``role``, a key of the other role's sections."""
    for key in keys:
        if key in MOVED_KEYS:
            raise ConfigError(f"{where}: {key} moved: use {MOVED_KEYS[key]}")
    if role is None:
        return
    other = "coordinator" if role == "site" else "site"
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]  # name the key as written
    for key in leaves:
        if key.split(".", 1)[0] in ROLE_SECTIONS[other]:
            raise ConfigError(
                f"{where}: key '{key}' belongs to the {other}'s configuration, not to a {role}'s "
                f"(a {role} file holds no {' or '.join(s + ':' for s in ROLE_SECTIONS[other])} section)"
            )


def config_from_dict(
    raw: dict[str, Any] | None,
    source: str = "<config>",
    overrides: dict[str, Any] | None = None,
    role: Role | None = None,
) -> PlanConfig:
    """Validate a plain dict (e.g. parsed YAML) with dotted-key overrides applied on top.

    A key moved to the ``site``/``coordinator`` sections (:data:`MOVED_KEYS`) is refused
    naming its new home; with ``role``, so is a key of the other role's sections
    (:data:`ROLE_SECTIONS`), in the file or in an override.
    """
    tree: dict[str, Any] = dict(raw or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    _check_keys(_dotted_keys(tree), source, role)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(list(given), "override", role)
    for k, v in given.items():
        _set_dotted(tree, k, v)
    try:
        return PlanConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def config_from_stored(raw: dict[str, Any], source: str) -> PlanConfig:
    """A configuration stored by this program (e.g. in a checkpoint), also one written before the
    site/coordinator split: its moved keys named the writer's own folders and ports, which rebuild
    nothing, so they are dropped instead of refused."""
    tree = json.loads(json.dumps(raw))  # a deep copy; the stored record is left as it is
    for key in MOVED_KEYS:
        section, name = key.split(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(name, None)
    return config_from_dict(tree, source)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, role: Role | None = None
) -> PlanConfig:
    """Read a YAML file (or nothing: all defaults) and apply dotted-key overrides.

    ``role`` (``"site"`` or ``"coordinator"``) refuses the other role's sections; None reads
    a file that may hold both (simulation, demo).
    """
    if path is None:
        return config_from_dict({}, "<defaults>", overrides, role)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(raw).__name__}")
    return config_from_dict(raw, str(p), overrides, role)


def describe_defaults() -> str:
    """Markdown table of every key, its default and its description (for docs and `config show --doc`)."""
    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append(f"| `{prefix}{name}` | `{json.dumps(default)}` | {field.description or ''} |")

    walk(PlanConfig, "")
    return "\n".join(rows)


def data_overrides(dataset: str | None = None, data: str | Path | None = None) -> dict[str, Any]:
    """Dotted overrides for the common ``--dataset NAME`` / ``--data PATH`` command-line options.

    A ``.npz`` path is a MedMNIST-format file, a ``.csv`` an APTOS-style manifest, a
    folder holding DICOM files (found by their ``DICM`` preamble) a DICOM source and
    any other folder an ImageFolder root.
    """
    if dataset and data:
        raise ConfigError("give either --dataset or --data, not both")
    if dataset:
        return {"data.source": "medmnist", "data.name": dataset, "data.path": NULL}
    if data:
        p = Path(data)
        if p.suffix.lower() == ".npz":
            return {"data.source": "medmnist", "data.path": str(p)}
        if p.suffix.lower() == ".csv":
            return {"data.source": "csv", "data.path": str(p)}
        if p.is_dir():
            from .data import holds_dicom

            return {"data.source": "dicom" if holds_dicom(p) else "imagefolder", "data.path": str(p)}
        raise ConfigError(f"--data {p}: expected a .npz file, a .csv manifest, an image folder or a DICOM folder")
    return {}


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as dotted overrides (values parsed as YAML: 3, 0.5, true, [a, b])."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set gan.steps=500")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        # an override of None means "not given" (CLI options left unset): null is the explicit NULL
        out[key.strip()] = NULL if parsed is None else parsed
    return out
