"""The model zoo: published parameter counts, torchvision's names, shapes, bad arguments."""

import pytest
import torch

from sepconv import models

# parameter counts at width 1.0 (Keras' MobileNet trainable count; torchvision's docs)
PUBLISHED = {models.mobilenet_v1: 4_231_976, models.mobilenet_v2: 3_504_872,
             models.shufflenet_v2: 2_278_604, models.mobilenet_v3_large: 5_483_032,
             models.efficientnet_b0: 5_288_548}


@pytest.mark.parametrize("build", PUBLISHED, ids=lambda f: f.__name__)
def test_parameter_count_is_the_published_one(build):
    assert sum(p.numel() for p in build().parameters()) == PUBLISHED[build]


@pytest.mark.parametrize("build,width", [(models.mobilenet_v1, 0.25), (models.mobilenet_v1, 1.0),
                                         (models.mobilenet_v2, 0.5), (models.mobilenet_v2, 1.4),
                                         (models.shufflenet_v2, 0.5), (models.shufflenet_v2, 2.0)])
def test_output_shape(build, width):
    model = build(width_mult=width, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("build", [models.mobilenet_v3_large, models.efficientnet_b0])
def test_squeeze_excitation_networks_train(build):
    """One training step (stochastic depth and dropout active) gives every parameter a
    finite gradient; eval is deterministic."""
    torch.manual_seed(0)
    model = build(num_classes=5)
    model(torch.randn(2, 3, 64, 48)).square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) and model(x).shape == (1, 5)


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x1_0", "mobilenet_v3_large",
                                  "efficientnet_b0"])
def test_torchvision_weights_load_and_give_its_outputs(name):
    """torchvision's state_dict loads strictly, and the networks then agree exactly (where
    torchvision imports: not in CI, it has no build for the pinned CPU torch)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name).eval()
    for m in theirs.modules():  # statistics away from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    ours = getattr(models, name.removesuffix("_x1_0"))().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_torchvision_names_and_shapes():
    v2 = models.mobilenet_v2().state_dict()
    assert v2["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # first block: no expansion
    assert v2["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)
    assert v2["features.2.conv.2.weight"].shape == (24, 96, 1, 1)
    assert v2["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert v2["classifier.1.weight"].shape == (1000, 1280)
    s = models.shufflenet_v2().state_dict()
    assert s["stage2.0.branch1.0.weight"].shape == (24, 1, 3, 3)
    assert s["stage2.1.branch2.3.weight"].shape == (58, 1, 3, 3)
    assert s["conv5.0.weight"].shape == (1024, 464, 1, 1)
    assert s["fc.weight"].shape == (1000, 1024)
    v3 = models.mobilenet_v3_large().state_dict()
    assert v3["features.4.block.1.0.weight"].shape == (72, 1, 5, 5)
    assert v3["features.4.block.2.fc1.weight"].shape == (24, 72, 1, 1)
    assert v3["features.16.0.weight"].shape == (960, 160, 1, 1)
    assert v3["classifier.3.weight"].shape == (1000, 1280)
    b0 = models.efficientnet_b0().state_dict()
    assert b0["features.1.0.block.0.0.weight"].shape == (32, 1, 3, 3)
    assert b0["features.2.0.block.2.fc2.weight"].shape == (96, 4, 1, 1)
    assert b0["features.8.0.weight"].shape == (1280, 320, 1, 1)


@pytest.mark.parametrize("call,match", [
    (lambda: models.mobilenet_v2(width_mult=0), "width_mult"),
    (lambda: models.mobilenet_v1(num_classes=0), "num_classes"),
    (lambda: models.shufflenet_v2(width_mult=0.75), "0.5, 1.0, 1.5, 2.0"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
