"""Configuration files: --print-config writes a complete file, --config reads it back (checked before
any work), flags win over the file, and the model directory keeps the values the run used."""

import yaml

from atlasdgd.cli import main


def test_print_config_run_and_saved_config_round_trip(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "a.h5ad"), "--cells", "300", "--genes", "30", "--peaks", "0",
                 "--types", "2", "--batches", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"label_key", "covariate_key", "epochs", "batch_size", "latent_dim", "device"} <= set(printed)
    assert "out" not in printed and "config" not in printed  # required flags and meta options stay on the line
    printed.update(label_key="cell_type", covariate_key=["batch"], epochs=2, min_epochs=1, latent_dim=3, seed=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(printed))
    assert main(["train", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "m"), "--config", str(config), "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "m" / "run-config.yaml").read_text())
    assert saved == printed
    # a flag wins over the file, and the saved file says what was used
    assert main(["train", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "m2"), "--config", str(config),
                 "--latent-dim", "4", "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "m2" / "run-config.yaml").read_text())
    assert saved == {**printed, "latent_dim": 4}
    import atlasdgd

    assert atlasdgd.DGD.load(str(tmp_path / "m2")).model_config.latent_dim == 4


def test_bad_config_files_are_refused_before_any_work(tmp_path, capsys):
    cases = {
        "unknown.yaml": ({"epochs": 2, "learning_rat": 0.1}, "learning_rat"),
        "type.yaml": ({"epochs": "many"}, "integer"),
        "choice.yaml": ({"precision": "fp8"}, "one of"),
        "list.yaml": ("just a string", "mapping"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump(content))
        code = main(["train", str(tmp_path / "none.h5ad"), "--out", str(tmp_path / "m"), "--config",
                     str(tmp_path / name), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and words in err, (name, err)
        assert not (tmp_path / "m").exists()
    assert main(["train", "x.h5ad", "--out", str(tmp_path / "m"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["embed", "--print-config"]) == 2
