"""atlasdgd: Deep Generative Decoder models (scDGD / multiDGD) for single-cell atlases."""

__version__ = "0.1.0"

from atlasdgd.api import DGD  # noqa: E402
from atlasdgd.simulate import SimulationConfig, simulate  # noqa: E402

__all__ = ["DGD", "SimulationConfig", "simulate", "__version__"]
