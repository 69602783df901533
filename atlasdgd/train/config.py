"""Training settings as one JSON-serialisable record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


# training cells per worker from which compile="auto" compiles the step on a CPU: it saves ~1.3-3 ms per
# step of 128 cells, so the minimum 50 epochs of 50k cells save 25-60 s against a 20-30 s compile
AUTO_COMPILE_CELLS = 50_000


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow docs/dgd-model.md except where measurement said
    otherwise (see README, "Defaults and why")."""

    max_epochs: int = 1000
    min_epochs: int = 50
    patience: int = 10
    batch_size: int = 128
    lr_decoder: float = 1e-3  # spec: 1e-4; 1e-3 reached a lower validation NLL in 1/6 of the epochs on Kang
    lr_representation: float = 1e-2
    lr_basal_gmm: float = 1e-3  # spec: 1e-2; at 1e-2 the mixture outruns the representations (SNARE ARI 0.28 vs 0.35)
    lr_covariate_gmm: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.7)
    weight_decay: float = 1e-4  # decoupled (AdamW), decoder only
    hyperprior: str = "cell"  # "cell": log p(phi) once per cell (reference; keeps variances near sigma0);
    # "dataset": once per epoch (the objective as written; variances shrink and clusters drift)
    l1: float = 0.0  # L1 penalty on decoder weights per minibatch (reference: 1.0)
    init: str = "pca"  # "pca": batch-centred PCA of log-normalised counts; "zero": the reference
    gmm_init: str = "auto"  # mixture start (init="pca"): "labels", "kmeans", "leiden"; auto = labels if given,
    # else leiden (Kang without labels: ARI 0.974 vs 0.637 from k-means)

    mixture_step: str = "adam"  # basal mixture: "adam" every minibatch (spec), or "em": its exact optimum
    # given the representations once per epoch, dead components re-seeded by splitting the largest
    representation_steps: int = 1  # representation Adam steps per minibatch visit
    heldout_epochs: int = 20  # refinement epochs for test-cell representations after training
    seed: int = 0
    precision: str = "32"  # "bf16-mixed": decoder matrix products in bf16, likelihood and priors in fp32
    compile: bool | str = "auto"  # torch.compile the training step (forward, backward, row Adam;
    # atlasdgd.train.compiled_step): ~2x per CPU step on 50k x 2,000 simulated cells, 20-30 s to compile
    # once per process. "auto": on for CPU training of >= AUTO_COMPILE_CELLS cells per worker, where the
    # compile pays back within the minimum epochs (see README, "Devices and precision")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {self.compile!r}")
        if self.precision not in ("32", "bf16-mixed"):
            raise ValueError(f"precision must be '32' or 'bf16-mixed', got {self.precision!r}")
        if self.hyperprior not in ("dataset", "cell"):
            raise ValueError("hyperprior must be 'dataset' or 'cell'")
        if self.init not in ("pca", "zero"):
            raise ValueError("init must be 'pca' or 'zero'")
        if self.gmm_init not in ("auto", "leiden", "kmeans", "labels"):
            raise ValueError("gmm_init must be 'auto', 'leiden', 'kmeans' or 'labels'")
        if self.mixture_step not in ("adam", "em"):
            raise ValueError("mixture_step must be 'adam' or 'em'")
        for name in ("max_epochs", "batch_size", "representation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_epochs < 0 or self.patience < 1:
            raise ValueError("min_epochs must be >= 0 and patience >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def compiles_step(config: TrainConfig, cells_per_worker: int, device: torch.device) -> bool:
    """Whether training compiles its step: ``config.compile``, with "auto" resolved for this run (CPUs only:
    the compiled step is measured on CPUs; on a GPU it is there to ask for, not yet a default)."""
    if config.compile == "auto":
        return device.type == "cpu" and cells_per_worker >= AUTO_COMPILE_CELLS
    return bool(config.compile)
