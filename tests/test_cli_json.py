"""--json on every command: the last stdout line is one object a strict parser accepts (no NaN),
saying what was written where; errors give ok=false with the message. Logging goes to stderr and
--log-file."""

import json

import pytest

from atlasdgd.cli import main


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _run(capsys, args: list[str]) -> dict:
    code = main(args + ["--json", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = _strict(out[-1])
    assert summary["ok"] is (code == 0), summary
    return summary


def test_every_command_prints_a_strict_json_summary_last(tmp_path, capsys):
    d = tmp_path
    s = _run(capsys, ["simulate", "--out", f"{d}/a.h5ad", "--cells", "400", "--genes", "40", "--peaks", "0",
                      "--types", "3", "--batches", "2"])
    assert s["out"] == f"{d}/a.h5ad" and s["cells"] == 400
    _run(capsys, ["simulate", "--out", f"{d}/q.h5ad", "--cells", "120", "--genes", "40", "--peaks", "0", "--types", "3",
                  "--batches", "2", "--seed", "3"])
    # in the input's order: the atlas below adopts this store with a model trained on the .h5ad itself
    s = _run(capsys, ["ingest", f"{d}/a.h5ad", f"{d}/a.zarr", "--label-key", "cell_type", "--covariate-key", "batch",
                      "--order", "input"])
    assert s["cells"] == 400 and s["features"] == {"rna": 40}
    s = _run(capsys, ["train", f"{d}/a.h5ad", "--out", f"{d}/m", "--label-key", "cell_type", "--covariate-key", "batch",
                      "--epochs", "2", "--min-epochs", "1", "--latent-dim", "3", "--components", "3"])
    assert s["epochs"] == 2 and s["out"] == f"{d}/m" and "val_recon" in s["final"]
    assert _run(capsys, ["embed", f"{d}/m", "--out", f"{d}/e.h5ad"])["obsm"][0] == "X_dgd"
    query = ["--epochs", "1", "--two-step", "0"]
    assert _run(capsys, ["map", f"{d}/m", f"{d}/q.h5ad", "--out", f"{d}/mapped.h5ad"] + query)["cells"] == 120
    assert _run(capsys, ["predict", f"{d}/m", f"{d}/q.h5ad", "--out", f"{d}/p.h5ad"] + query)["modalities"] == ["rna"]
    assert _run(capsys, ["perturb", f"{d}/m", f"{d}/q.h5ad", "--gene", "gene_00000", "--out", f"{d}/pt.csv"] + query)["rows"] > 0
    assert _run(capsys, ["de", f"{d}/m", "--groupby", "cell_type", "--n-samples", "200", "--out", f"{d}/de.csv"])["rows"] > 0
    assert _run(capsys, ["sample", f"{d}/m", "--cells", "20", "--out", f"{d}/s.h5ad"])["cells"] == 20
    # evaluate has metrics that can be undefined (NaN in numpy): they must come out as null
    s = _run(capsys, ["evaluate", f"{d}/m", f"{d}/q.h5ad", "--label-key", "cell_type", "--batch-key", "batch",
                      "--out", f"{d}/metrics.json"] + query)
    assert isinstance(s["metrics"], dict)
    _strict((d / "metrics.json").read_text())
    s = _run(capsys, ["atlas", "create", f"{d}/atlas", "--store", f"{d}/a.zarr", "--model", f"{d}/m"])
    assert s["version"] == 1 and s["command"] == "atlas create"
    import anndata as ad

    new = ad.read_h5ad(d / "q.h5ad")
    new.obs_names = [f"new_{n}" for n in new.obs_names]  # an atlas refuses cell names it already has
    new.write_h5ad(d / "new.h5ad")
    s = _run(capsys, ["atlas", "update", f"{d}/atlas", f"{d}/new.h5ad", "--epochs", "1"])
    assert s["version"] == 2 and s["added"] == 120
    assert _run(capsys, ["atlas", "rollback", f"{d}/atlas", "1"])["cells"] == 400
    assert _run(capsys, ["plot", f"{d}/m", "--kind", "training", "--out", f"{d}/t.png"])["out"] == f"{d}/t.png"
    s = _run(capsys, ["demo", "--out", f"{d}/demo", "--cells", "300", "--epochs", "2", "--workers", "1"])
    assert s["out"] == f"{d}/demo" and s["epochs"] == 2
    assert main(["atlas", "log", f"{d}/atlas", "--json"]) == 0  # the exception: the list of version records
    assert [r["version"] for r in _strict(capsys.readouterr().out.strip().splitlines()[-1])] == [1, 2, 3]
    # a failure: ok false, the message, nothing else claimed
    s = _run(capsys, ["train", f"{d}/missing.h5ad", "--out", f"{d}/m2"])
    assert s == {"command": "train", "ok": False, "error": s["error"]} and "does not exist" in s["error"]


def test_log_levels_and_log_file(tmp_path, capsys):
    log = tmp_path / "run.log"
    assert main(["simulate", "--out", str(tmp_path / "a.h5ad"), "--cells", "200", "--genes", "30", "--peaks", "0",
                 "--quiet"]) == 0
    capsys.readouterr()
    code = main(["train", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "m"), "--epochs", "1", "--min-epochs", "1",
                 "--latent-dim", "3", "--components", "2", "--log-file", str(log), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "INFO" not in err  # --quiet keeps warnings and errors only
    text = log.read_text()
    assert "INFO" in text and "DEBUG" in text  # the file gets everything
    for stage in ("reading", "start", "training", "writing"):
        assert stage in text.lower(), (stage, text)
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])


def test_tensorboard_gets_every_epochs_losses(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["simulate", "--out", str(tmp_path / "a.h5ad"), "--cells", "200", "--genes", "30", "--peaks", "0",
                 "--quiet"]) == 0
    assert main(["train", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "m"), "--epochs", "3", "--min-epochs", "3",
                 "--latent-dim", "3", "--components", "2", "--tensorboard", str(tmp_path / "tb"), "--quiet"]) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    history = pd.read_csv(tmp_path / "m" / "history.csv")
    logged = events.Scalars("loss/train_recon")
    assert [e.step for e in logged] == history["epoch"].tolist()
    assert [e.value for e in logged] == pytest.approx(history["train_recon"].tolist(), rel=1e-6)
    assert [e.wall_time for e in logged] == pytest.approx(history["wall_time"].tolist(), rel=0, abs=1e-3)  # the epochs' own clock
