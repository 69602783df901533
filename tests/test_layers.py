"""The package's shape: layers that import one way, and a core that needs torch and numpy alone."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atlasdgd"

# lowest first; a module may import only from layers strictly below its own (or from itself)
LAYERS = [
    {"errors"},
    {"io", "runtime", "model", "optim"},
    {"data"},
    {"store"},
    {"infer"},
    {"train"},
    {"evaluate", "plotting", "simulate"},
    {"artifact"},
    {"api"},
    {"atlas"},
    {"distributed"},
    {"demo"},
    {"cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
HEAVY = ("anndata", "mudata", "zarr", "ray", "scipy", "pandas", "fsspec", "sklearn", "tiledbsoma", "h5py", "dask")


def _unit(path: Path) -> str:
    """The top-level subpackage or module a file belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _exports() -> dict[str, str]:
    """Names the package root hands out lazily (``atlasdgd.DGD``) -> the unit that defines them."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and "_EXPORTS" in ast.unparse(node).split("=")[0]:
            return {k: v.split(".")[1] for k, v in ast.literal_eval(node.value).items()}
    return {}


def _imports(path: Path):
    """(imported atlasdgd unit, line) for every import in the file, at module level or inside functions:
    absolute (``atlasdgd.x``), relative (``from ..x``) and through the package root (``atlasdgd.DGD``)."""
    exports = _exports()
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module == "atlasdgd":
                names = [f"atlasdgd.{exports.get(a.name, a.name)}" for a in node.names if a.name != "__version__"]
            elif module.startswith("atlasdgd."):
                names = [module]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "atlasdgd":  # the package root: everything it exports
                    names += [f"atlasdgd.{unit}" for unit in set(exports.values())]
                elif a.name.startswith("atlasdgd."):
                    names.append(a.name)
        for name in names:
            yield name.split(".")[1], node.lineno


def test_every_package_unit_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert units <= set(LEVEL), f"give these a layer in tests/test_layers.py: {sorted(units - set(LEVEL))}"


def test_no_module_imports_a_layer_above_or_beside_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        if unit in ("__init__", "__main__"):
            continue
        for target, line in _imports(path):
            if target != unit and LEVEL[target] >= LEVEL[unit]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {unit} -> {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


BLOCKED_CORE = f'''
import importlib.machinery, sys
class Refuse:  # importing a blocked package fails as if it were not installed
    def create_module(self, spec):
        raise ImportError("blocked for this test: " + spec.name)
    def exec_module(self, module):
        pass
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            return importlib.machinery.ModuleSpec(name, Refuse(), origin=None)
        return None
sys.meta_path.insert(0, Block())
import numpy as np, torch
import atlasdgd
import atlasdgd.model.module, atlasdgd.optim.row_adam, atlasdgd.runtime.device, atlasdgd.runtime.sync
import atlasdgd.train, atlasdgd.train.trainer, atlasdgd.train.run, atlasdgd.train.checkpoint, atlasdgd.train.init
import atlasdgd.data.loader, atlasdgd.data.plan, atlasdgd.data.source, atlasdgd.infer.mapping
import atlasdgd.io.uri, atlasdgd.io.manifest, atlasdgd.io.atomic
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.trainer import Trainer
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.data.loader import CellLoader

class Csr:  # counts as plain numpy CSR arrays: no scipy
    def __init__(self, dense):
        nz = dense != 0
        self.indptr = np.concatenate([[0], np.cumsum(nz.sum(1))])
        self.indices = np.nonzero(nz)[1]
        self.data = dense[nz].astype(np.float32)

class Source:
    def __init__(self, x):
        self.x, self.n_cells, self.modalities = x, x.shape[0], ["rna"]
        self.observed = {{"rna": np.ones(self.n_cells, bool)}}
    def n_features(self, m): return self.x.shape[1]
    def library(self, m): return self.x.sum(1).astype(np.float32)
    def covariate_codes(self): return np.zeros((self.n_cells, 0), np.int64)
    def read_rows(self, m, rows): return Csr(self.x[rows])

x = np.random.default_rng(0).poisson(2.0, (64, 30)).astype(np.float32)
module = DGDModule(ModelConfig(modalities={{"rna": 30}}, latent_dim=3, n_components=2))
table = RepresentationTable(torch.zeros(64, 3))
trainer = Trainer(module, TrainConfig(max_epochs=1), table)
stats = trainer.train_epoch(CellLoader(Source(x), np.arange(64), 16, chunk_cells=32))
assert np.isfinite(stats["train_loss"]), stats
loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert not loaded, loaded
print("core ok")
'''


def test_the_core_imports_and_trains_with_torch_and_numpy_alone():
    result = subprocess.run([sys.executable, "-c", BLOCKED_CORE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "core ok" in result.stdout, result.stderr[-3000:]


def test_the_softball_normaliser_without_scipy_agrees_with_scipy_quad():
    from scipy import integrate, special

    from atlasdgd.model.priors import _radial_integral

    for dim in (1, 2, 5, 20, 50):
        for a in (1.0, 5.0, 30.0):
            expected, _ = integrate.quad(lambda u: u ** (dim - 1) * special.expit(-a * (u - 1)), 0, 1 + 60 / a,
                                         points=[1.0], limit=200, epsabs=0, epsrel=1e-12)
            assert abs(_radial_integral(dim, a) / expected - 1) < 1e-12, (dim, a)


def test_the_gpu_check_runs_with_torch_and_numpy_alone():
    """benchmarks/gpu_check.py must run on a bare GPU image; here its CPU half runs with every heavy
    library (scipy too) blocked."""
    blocker = BLOCKED_CORE.split("import numpy as np, torch")[0]
    script = PACKAGE.parent / "benchmarks" / "gpu_check.py"
    code = blocker + (f"import runpy\nsys.argv = [{str(script)!r}, '--cells', '600', '--genes', '40', "
                      "'--batch-sizes', '128', '--epochs', '1']\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["init"] == "zero" and len(summary["cpu_losses"]) == 1
    assert summary["cells_per_s"]["128"]["cpu"] > 0


def test_a_missing_extra_is_named_in_the_error(tmp_path):
    """Ray, TileDB-SOMA and s3fs are extras: without them the rest works and each use names its extra."""
    blocker = BLOCKED_CORE.split("import numpy as np, torch")[0].replace(repr(HEAVY), repr({"ray", "tiledbsoma", "s3fs"}))
    script = blocker + f'''
from atlasdgd.cli import main
from atlasdgd.simulate import SimulationConfig, write_simulation
write_simulation(SimulationConfig(n_cells=200, n_types=2, n_batches=2, n_genes=30, n_peaks=0, seed=0),
                 {str(tmp_path / "a.h5ad")!r}, progress=False)
assert main(["ingest", {str(tmp_path / "a.h5ad")!r}, {str(tmp_path / "a.zarr")!r}, "--quiet"]) == 0
codes = [
    main(["train", {str(tmp_path / "a.zarr")!r}, "--out", {str(tmp_path / "m")!r}, "--workers", "2", "--quiet"]),
    main(["ingest", {str(tmp_path / "a.h5ad")!r}, "soma://{tmp_path / "a.soma"}", "--quiet"]),
    main(["ingest", {str(tmp_path / "a.h5ad")!r}, "s3://bucket/a.zarr", "--quiet"]),
]
print("CODES", codes)
'''
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "CODES [2, 2, 2]" in result.stdout, result.stdout + result.stderr
    for extra in ("ray", "soma", "s3"):
        assert f"pip install 'atlasdgd[{extra}]'" in result.stderr, result.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "a.soma").exists()
