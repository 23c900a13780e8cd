"""The inference-tuned network copy computes what the plain network computes."""

from __future__ import annotations

import pytest
import torch

from AttentionUNetSegmentLib.model.acceleration import InstanceNormReLU, OneDNNConv3d, optimize_for_inference
from AttentionUNetSegmentLib.model.network import AttentionUNet


@pytest.fixture(scope="module")
def model() -> AttentionUNet:
    torch.manual_seed(0)
    return AttentionUNet(1, 3, (4, 8, 16)).eval()


@pytest.mark.parametrize("batch", [1, 2])
def test_tuned_copy_matches_logits_and_attention(model, batch):
    tuned = optimize_for_inference(model, "cpu")
    x = torch.randn(batch, 1, 20, 28, 12)  # odd-ish sizes: resizes to explicit skip sizes
    with torch.inference_mode():
        plain, fast = model.forward_with_aux(x), tuned.forward_with_aux(x)
    torch.testing.assert_close(fast.logits, plain.logits, atol=2e-4, rtol=1e-4)
    for a, b in zip(fast.attention, plain.attention):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_original_is_untouched_and_copy_is_tuned(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = optimize_for_inference(model, "cpu")
    assert tuned is not model
    assert any(isinstance(m, InstanceNormReLU) for m in tuned.modules())
    assert any(isinstance(m, OneDNNConv3d) for m in tuned.modules())
    assert not any(isinstance(m, (InstanceNormReLU, OneDNNConv3d)) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_each_switch_alone_keeps_outputs(model):
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        reference = model(x)
        for switches in ({"channels_last": False, "fused_norm": False}, {"onednn_convs": False},
                         {"channels_last": False}):
            torch.testing.assert_close(optimize_for_inference(model, "cpu", **switches)(x), reference,
                                       atol=2e-4, rtol=1e-4)
