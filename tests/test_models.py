"""The model zoo: published parameter counts, torchvision's names, shapes, bad arguments."""

import pytest
import torch

from sepconv import models

# parameter counts at width 1.0 (Keras' MobileNet trainable count; torchvision's docs)
PUBLISHED = {models.mobilenet_v1: 4_231_976, models.mobilenet_v2: 3_504_872,
             models.shufflenet_v2: 2_278_604}


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


@pytest.mark.parametrize("call,match", [
    (lambda: models.mobilenet_v2(width_mult=0), "width_mult"),
    (lambda: models.mobilenet_v1(num_classes=0), "num_classes"),
    (lambda: models.shufflenet_v2(width_mult=0.75), "0.5, 1.0, 1.5, 2.0"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
