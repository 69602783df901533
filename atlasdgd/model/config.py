"""The model's architecture and priors as one JSON-serialisable record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`~atlasdgd.model.module.DGDModule` (not its weights).

    ``modalities`` maps modality name -> number of features; ``covariates`` maps covariate
    name -> number of classes. Defaults are multiDGD's (see docs/dgd-model.md).
    """

    modalities: dict[str, int]
    latent_dim: int = 20
    n_components: int = 1
    covariates: dict[str, int] = field(default_factory=dict)
    covariate_dim: int = 2
    hidden: tuple[int, ...] = (100, 100)
    head_layers: int = 1
    # basal GMM
    radius: float = 2.0
    sharpness: float = 5.0
    dirichlet_alpha: float = 1.0
    sigma0: float | None = None
    # covariate GMMs
    covariate_radius: float = 2.0
    covariate_sharpness: float = 5.0
    covariate_dirichlet_alpha: float = 2.0
    covariate_loss_scale: str = "one"  # "one" (the MAP objective) or "n_classes" (the reference)
    # dispersion r = exp(rho) + floor
    dispersion_floor: float = 1.0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if not self.modalities:
            raise ValueError("ModelConfig needs at least one modality")
        for name, n in self.modalities.items():
            if not name.isidentifier():
                raise ValueError(f"modality name {name!r} must be a Python identifier (letters, digits, _)")
            if n < 1:
                raise ValueError(f"modality {name!r} has {n} features; it needs at least one")
        for name, c in self.covariates.items():
            if c < 1:
                raise ValueError(f"covariate {name!r} has {c} classes; it needs at least one")
        if self.covariate_loss_scale not in ("one", "n_classes"):
            raise ValueError("covariate_loss_scale must be 'one' or 'n_classes'")

    @property
    def representation_dim(self) -> int:
        """Width of a cell's full representation: basal then each covariate block."""
        return self.latent_dim + self.covariate_dim * len(self.covariates)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}: was this model written by a newer atlasdgd?")
        return cls(**d)
