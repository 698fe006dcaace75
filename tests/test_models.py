"""Model families: forward shapes, rebuild from a checkpoint description, config checks."""

import pytest
import torch

import models


@pytest.mark.parametrize("family, cfg", [("cnn", models.cnn.Config(channels=(4, 8), hidden=16)),
                                          ("mlp", models.mlp.Config(hidden=(32,)))])
def test_forward_shape_and_rebuild(family, cfg):
    m = models.build(family, cfg, (1, 8, 8), 10).eval()
    x = torch.randn(5, 1, 8, 8)
    assert m(x).shape == (5, 10)
    desc = models.describe(family, cfg, (1, 8, 8), 10)
    clone = models.rebuild(desc)
    clone.load_state_dict(m.state_dict())
    assert torch.equal(clone.eval()(x), m(x))


def test_unknown_family_names_the_choices():
    with pytest.raises(KeyError, match="cnn"):
        models.family("resnet")


def test_config_validation():
    with pytest.raises(ValueError, match="`dropout`"):
        models.cnn.Config(dropout=1.5)
    with pytest.raises(ValueError, match="`hidden`"):
        models.mlp.Config(hidden=(0,))
