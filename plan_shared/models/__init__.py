"""Networks of the toolkit: style-based generator, discriminator, classifier backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plan_shared.models.classifier import Classifier
from plan_shared.models.discriminator import Discriminator
from plan_shared.models.generator import StyleGenerator, native_resolution

if TYPE_CHECKING:
    from plan_shared.config import PlanConfig

__all__ = ["Classifier", "Discriminator", "StyleGenerator", "native_resolution", "build_generator", "build_discriminator"]


def build_generator(cfg: PlanConfig, size: int, channels: int) -> StyleGenerator:
    """From a :class:`plan_shared.config.PlanConfig` (its ``generator`` and ``gan`` sections)."""
    g = cfg.generator
    return StyleGenerator(
        z_dim=g.z_dim,
        w_dim=g.w_dim,
        size=size,
        channels=channels,
        mapping_layers=g.mapping_layers,
        base_channels=g.base_channels,
        min_channels=g.min_channels,
        mapping_lr_mul=cfg.gan.mapping_lr_mul,
        w_avg_beta=g.w_avg_beta,
    )


def build_discriminator(cfg: PlanConfig, size: int, channels: int) -> Discriminator:
    d = cfg.discriminator
    return Discriminator(size, channels, d.base_channels, d.max_channels, d.mbstd_group)
