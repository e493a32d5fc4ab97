"""Temperature scaling: the 1-D fit, fitting on real NuCLS cells, model files and the calibrate command."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from evaluation_fixtures import (  # noqa: F401
    nucls_class_names,
    nucls_dir,
    nucls_set,
    nucls_work_dir,
    tiny_config,
    trained_tiny_model,
)

from nuclass_qupath.errors import CellsError
from nuclass_qupath.evaluation.metrics import expected_calibration_error
from nuclass_qupath.model import NuClass, load_model, save_model
from nuclass_qupath.model.config import Temperatures
from nuclass_qupath.model.calibration import (
    PATHS,
    fit_output_temperatures,
    fit_temperature,
    fit_temperatures,
    scaled_nll,
    uncalibrated_outputs,
)
from nuclass_qupath.training.trainer import predict_crop_set


def sample_labels(logits: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """Draw one label per row from softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    z = logits / temperature
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    cumulative = probs.cumsum(axis=1)
    return (rng.random((len(z), 1)) > cumulative).sum(axis=1)


# The 1-D fit on synthetic logits ------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 6.0])
def test_fit_temperature_recovers_sampling_temperature(true_temperature):
    logits = np.random.default_rng(1).normal(0, 3, size=(20000, 5))
    labels = sample_labels(logits, true_temperature, seed=2)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)


def test_fit_temperature_scales_with_logits():
    logits = np.random.default_rng(3).normal(0, 2, size=(2000, 4))
    labels = sample_labels(logits, 1.5, seed=4)
    fitted = fit_temperature(logits, labels)
    assert fit_temperature(10 * logits, labels) == pytest.approx(10 * fitted, rel=1e-3)


def test_fit_temperature_is_minimum_of_nll():
    logits = np.random.default_rng(5).normal(0, 2, size=(500, 3))
    labels = sample_labels(logits, 0.7, seed=6)
    fitted = fit_temperature(logits, labels)
    best = scaled_nll(logits, labels, fitted)
    assert best <= scaled_nll(logits, labels, fitted * 1.01)
    assert best <= scaled_nll(logits, labels, fitted / 1.01)


def test_fit_temperature_prefers_one_when_flat():
    # Equal logits in every row: no temperature changes the NLL.
    fitted = fit_temperature(np.zeros((10, 3)), np.arange(10) % 3)
    assert fitted == 1.0


def test_fit_temperature_rejects_non_finite_logits():
    logits = np.zeros((4, 3))
    logits[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 rows of logits are not finite"):
        fit_temperature(logits, np.zeros(4, dtype=int))


def test_fit_scores_before_with_given_temperatures():
    logits = np.random.default_rng(7).normal(0, 2, size=(400, 3))
    labels = sample_labels(logits, 1.5, seed=8)
    outputs = {"local": logits, "global": 2 * logits, "mixture": logits / 2}
    before = Temperatures(local=3.0, global_=0.5, mixture=1.0)
    result = fit_output_temperatures(outputs, labels, before=before)
    assert result.temperatures_before == before
    assert result.nll_before["local"] == pytest.approx(scaled_nll(logits, labels, 3.0))
    assert result.nll_before["global"] == pytest.approx(scaled_nll(2 * logits, labels, 0.5))
    assert result.nll_before["mixture"] == pytest.approx(scaled_nll(logits / 2, labels, 1.0))
    assert "T before" in result.format_table()
    assert result.as_dict()["paths"]["local"]["temperature_before"] == 3.0


def test_fit_output_temperatures_rejects_missing_output():
    with pytest.raises(ValueError, match="mixture"):
        fit_output_temperatures({"local": np.zeros((2, 2)), "global": np.zeros((2, 2))}, np.zeros(2, dtype=int))


# Real cells and a tiny trained model --------------------------------------------


@pytest.fixture(scope="module")
def holdout(nucls_dir, nucls_work_dir):
    return nucls_set(nucls_dir, "holdout", nucls_work_dir)


@pytest.fixture(scope="module")
def calibrated_run(nucls_dir, nucls_work_dir, holdout):
    """The tiny model fitted on the held-out tiles, with its outputs there before and after."""
    _, _, crops = holdout
    model = trained_tiny_model(nucls_dir, nucls_work_dir)
    result = fit_temperatures(model, crops)
    before = predict_crop_set(model, crops, calibrated=False)
    after = predict_crop_set(model, crops, calibrated=True)
    return model, crops, result, before, after


@pytest.mark.slow
def test_fit_temperatures_lowers_nll(calibrated_run):
    _, _, result, _, _ = calibrated_run
    for path in PATHS:
        assert result.nll_after[path] < result.nll_before[path], path


@pytest.mark.slow
def test_fit_temperatures_lowers_ece(calibrated_run):
    _, _, result, _, _ = calibrated_run
    for path in PATHS:
        assert result.ece_after[path] <= result.ece_before[path], path


@pytest.mark.slow
def test_fit_temperatures_writes_model_config(calibrated_run):
    model, crops, result, _, _ = calibrated_run
    temperatures = model.config.temperatures
    assert temperatures == result.temperatures
    assert all(t != 1.0 for t in (temperatures.local, temperatures.global_, temperatures.mixture))
    assert temperatures.fitted_on.startswith(f"{len(crops)} cells")
    assert "train_5" in temperatures.fitted_on


@pytest.mark.slow
def test_calibration_keeps_argmax(calibrated_run):
    _, _, _, before, after = calibrated_run
    for key in ("probs", "probs_local", "probs_global"):
        np.testing.assert_array_equal(after[key].argmax(axis=1), before[key].argmax(axis=1), err_msg=key)
    np.testing.assert_array_equal(after["gate"], before["gate"])


@pytest.mark.slow
def test_calibrated_model_reproduces_fitted_scores(calibrated_run):
    # The model applies the temperatures in combine(), so its outputs must score what the fit measured.
    _, crops, result, _, after = calibrated_run
    labels = crops.labels
    rows = np.arange(len(labels))
    for path, key in (("local", "probs_local"), ("global", "probs_global"), ("mixture", "probs")):
        nll = float(-np.log(after[key][rows, labels].astype(np.float64)).mean())
        assert nll == pytest.approx(result.nll_after[path], abs=1e-4), path
        ece = expected_calibration_error(after[key], labels)
        assert ece == pytest.approx(result.ece_after[path], abs=0.02), path


@pytest.mark.slow
def test_temperatures_survive_save_and_load(calibrated_run, tmp_path):
    model, crops, result, _, after = calibrated_run
    save_model(model, tmp_path / "calibrated")
    loaded = load_model(tmp_path / "calibrated.safetensors")
    assert loaded.config.temperatures == result.temperatures
    assert loaded.calibrated
    few = crops.subset(np.arange(8))
    reloaded = predict_crop_set(loaded, few, calibrated=True)
    np.testing.assert_allclose(reloaded["probs"], after["probs"][:8], atol=1e-5)
    np.testing.assert_allclose(reloaded["probs_local"], after["probs_local"][:8], atol=1e-5)


@pytest.mark.slow
def test_overconfident_model_gets_temperature_above_one(nucls_dir, nucls_work_dir, holdout, calibrated_run):
    _, crops, plain, _, _ = calibrated_run
    model = trained_tiny_model(nucls_dir, nucls_work_dir)
    with torch.no_grad():
        for head in (model.local_head, model.global_head):
            head[-1].weight.mul_(10.0)
            head[-1].bias.mul_(10.0)
    result = fit_temperatures(model, crops)
    for path in PATHS:
        assert result.temperature(path) > 1.0, path
        assert result.temperature(path) > plain.temperature(path), path
        assert result.ece_after[path] < result.ece_before[path], path
    # Logits ten times larger need a temperature ten times larger, inside the search interval.
    if 10 * plain.temperature("local") < 100:
        assert result.temperature("local") == pytest.approx(10 * plain.temperature("local"), rel=1e-3)


def test_fit_temperatures_rejects_other_classes(nucls_dir, holdout):
    _, _, crops = holdout
    model = NuClass(tiny_config(nucls_class_names(nucls_dir)))
    renamed = dataclasses.replace(crops, class_names=["a", "b", "c", "d"])
    with pytest.raises(CellsError, match="'a', 'b', 'c', 'd'"):
        fit_temperatures(model, renamed)


def test_fit_temperatures_rejects_empty_cells(nucls_dir, holdout):
    _, _, crops = holdout
    model = NuClass(tiny_config(nucls_class_names(nucls_dir)))
    with pytest.raises(CellsError, match="no labelled cells"):
        fit_temperatures(model, crops.subset(np.zeros(len(crops), dtype=bool)))


@pytest.mark.slow
def test_refit_reports_previous_temperatures(calibrated_run):
    # A second fit starts from the first fit's temperatures, so its "before" is the first fit's "after".
    model, crops, first, _, _ = calibrated_run
    refit = model_copy_with_temperatures(model, first.temperatures)
    second = fit_temperatures(refit, crops)
    assert second.temperatures_before == first.temperatures
    for path in PATHS:
        assert second.nll_before[path] == pytest.approx(first.nll_after[path], abs=1e-9), path
        assert second.ece_before[path] == pytest.approx(first.ece_after[path], abs=1e-9), path


def model_copy_with_temperatures(model: NuClass, temperatures: Temperatures) -> NuClass:
    copy = NuClass(model.config.model_copy(update={"temperatures": temperatures}))
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.mark.slow
def test_uncalibrated_outputs_ignore_temperatures(calibrated_run):
    model, crops, _, before, _ = calibrated_run
    few = crops.subset(np.arange(6))
    logits = uncalibrated_outputs(model, few)
    np.testing.assert_allclose(logits["local"], before["logits_local"][:6], atol=1e-5)
    np.testing.assert_allclose(np.exp(logits["mixture"]), before["probs"][:6], atol=1e-5)


# The calibrate command ----------------------------------------------------------------


@pytest.fixture
def cli_with_calibrate(monkeypatch):
    """The CLI entry point, with the calibrate command registered even where the command list lacks it."""
    import nuclass_qupath.cli as cli

    if "calibrate" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "calibrate"))
    return cli.main


@pytest.mark.slow
def test_calibrate_command_writes_new_model(nucls_dir, nucls_work_dir, holdout, tmp_path, capsys, cli_with_calibrate):
    images_dir, labels_dir, _ = holdout
    source_weights, source_config = save_model(trained_tiny_model(nucls_dir, nucls_work_dir), tmp_path / "plain")
    weights_before = source_weights.read_bytes()
    config_before = source_config.read_text(encoding="utf-8")

    rc = cli_with_calibrate([
        "calibrate", "--model", str(source_weights), "--images", str(images_dir), "--labels", str(labels_dir),
        "-o", str(tmp_path / "calibrated"),
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ECE before" in out
    assert source_weights.read_bytes() == weights_before
    assert source_config.read_text(encoding="utf-8") == config_before

    calibrated = load_model(tmp_path / "calibrated.safetensors")
    temperatures = calibrated.config.temperatures
    assert temperatures.fitted_on.startswith("70 cells")
    assert not math.isclose(temperatures.local, 1.0)
    assert calibrated.config.training["calibration"]["paths"]["mixture"]["ece_after"] <= (
        calibrated.config.training["calibration"]["paths"]["mixture"]["ece_before"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "calibrated.json", "calibrated.safetensors", "plain.json", "plain.safetensors",
    ]


def test_calibrate_command_reports_missing_model(tmp_path, capsys, cli_with_calibrate):
    (tmp_path / "images").mkdir()
    rc = cli_with_calibrate(["calibrate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "nothing"),
               "--model", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "out")])
    assert rc == 1
    assert "m.safetensors" in capsys.readouterr().err
