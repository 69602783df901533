"""Devices and precision: one resolver, refusals before any work, models that load anywhere."""

import numpy as np
import pytest
import torch

import atlasdgd
from atlasdgd.cli import main
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.runtime.device import DeviceError, resolve_device
from atlasdgd.simulate import SimulationConfig, simulate

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py "
                                                                       "runs the GPU path on a GPU machine)")


def test_device_names_resolve_and_auto_falls_back_to_the_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    for bad in ("gpu0", "tpu", "cuda:x"):
        with pytest.raises(DeviceError, match="device"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda")


@no_cuda
@pytest.mark.parametrize("command", ["train", "embed", "map", "predict", "perturb", "sample", "evaluate", "demo"])
def test_every_computing_command_refuses_cuda_without_a_gpu_and_writes_nothing(command, tmp_path, capsys):
    out = tmp_path / "out"
    args = {
        "train": ["train", str(tmp_path / "in.h5ad"), "--out", str(out)],
        "embed": ["embed", str(tmp_path / "model"), "--out", str(out)],
        "map": ["map", str(tmp_path / "model"), str(tmp_path / "q.h5ad"), "--out", str(out)],
        "predict": ["predict", str(tmp_path / "model"), str(tmp_path / "q.h5ad"), "--out", str(out)],
        "perturb": ["perturb", str(tmp_path / "model"), str(tmp_path / "q.h5ad"), "--gene", "g1", "--out", str(out)],
        "sample": ["sample", str(tmp_path / "model"), "--cells", "5", "--out", str(out)],
        "evaluate": ["evaluate", str(tmp_path / "model"), str(tmp_path / "q.h5ad"), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
    }[command]
    assert main(args + ["--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def small():
    return simulate(SimulationConfig(n_cells=400, n_types=3, n_batches=2, n_genes=50, n_peaks=0, seed=4))


@no_cuda
def test_the_api_refuses_cuda_before_reading_or_training(small, tmp_path):
    with pytest.raises(DeviceError):
        atlasdgd.DGD(small, label_key="cell_type", device="cuda")
    with pytest.raises(DeviceError):
        atlasdgd.DGD.load(tmp_path / "no-model-needed", device="cuda")


def test_bf16_mixed_precision_keeps_the_likelihood_in_fp32_and_close_to_fp32(small):
    from atlasdgd.data.adapters import prepare

    data = prepare(small, label_key="cell_type", covariate_keys=["batch"])
    module = DGDModule(ModelConfig(modalities={"rna": 50}, latent_dim=3, n_components=3, covariates={"batch": 2}),
                       generator=torch.Generator().manual_seed(0))
    batch = next(iter(data.loader(np.arange(64), 64, shuffle=False)))
    z = torch.randn(64, module.config.representation_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = module.losses(batch, z)
        module.autocast_dtype = torch.bfloat16
        mixed = module.losses(batch, z)
    assert mixed.reconstruction["rna"].dtype == torch.float32
    torch.testing.assert_close(mixed.reconstruction["rna"], full.reconstruction["rna"], rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(mixed.basal_prior, full.basal_prior, rtol=0, atol=0)  # priors never autocast
    model = atlasdgd.DGD(small, label_key="cell_type", covariate_keys=["batch"], device="cpu")
    history = model.train(max_epochs=2, min_epochs=2, heldout_epochs=1, precision="bf16-mixed", progress=False)
    assert np.isfinite(history["train_loss"]).all() and model.train_config.precision == "bf16-mixed"


def test_a_saved_model_loads_on_the_requested_device_with_the_same_outputs(small, tmp_path):
    model = atlasdgd.DGD(small, label_key="cell_type", covariate_keys=["batch"], device="cpu")
    model.train(max_epochs=2, min_epochs=2, heldout_epochs=1, progress=False)
    model.save(tmp_path / "m")
    from safetensors.torch import load_file

    assert all(t.device.type == "cpu" for t in load_file(str(tmp_path / "m" / "weights.safetensors")).values())
    target = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = atlasdgd.DGD.load(tmp_path / "m", device=target)
    assert all(p.device.type == target for p in loaded.module.parameters())
    z = model.representation[:20]
    a, b = model.log_fractions(z), loaded.log_fractions(z)
    for m in a:
        np.testing.assert_allclose(a[m], b[m], rtol=1e-5, atol=1e-5)
    mapped = loaded.map(small[:30].copy(), epochs=1, progress=False)
    assert np.isfinite(mapped.obsm["X_dgd"]).all()


@needs_cuda
def test_training_and_mapping_on_cuda_match_the_cpu(small, tmp_path):
    runs = {}
    for device in ("cpu", "cuda"):
        model = atlasdgd.DGD(small, label_key="cell_type", covariate_keys=["batch"], device=device, seed=0)
        history = model.train(max_epochs=2, min_epochs=2, heldout_epochs=1, progress=False)
        runs[device] = history["train_loss"].to_numpy()
        model.save(tmp_path / device)
    np.testing.assert_allclose(runs["cpu"], runs["cuda"], rtol=1e-3)
    on_cpu = atlasdgd.DGD.load(tmp_path / "cuda", device="cpu")
    assert np.isfinite(on_cpu.map(small[:30].copy(), epochs=1, progress=False).obsm["X_dgd"]).all()
