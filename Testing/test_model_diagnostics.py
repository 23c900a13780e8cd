"""Layer summary (shapes, parameters, FLOPs) and the gradient-flow check."""

from __future__ import annotations

import torch
from torch import nn

from AttentionUNetSegmentLib.model.diagnostics import check_gradient_flow, summarize
from AttentionUNetSegmentLib.model.network import AttentionUNet


def test_single_conv_flops_match_hand_count():
    conv = nn.Conv3d(2, 3, kernel_size=3, padding=1, bias=True)
    summary = summarize(conv, (4, 5, 6))
    (row,) = summary.rows
    assert row.output_shape == (1, 3, 4, 5, 6)
    assert row.params == 3 * 2 * 27 + 3
    # per output voxel and channel: 2 * 2 * 27 multiply-adds + 1 bias add; 3 * 4 * 5 * 6 outputs
    assert row.flops == (2 * 2 * 27 + 1) * 3 * 4 * 5 * 6 == 39240
    assert summary.total_flops == 39240


def test_summary_of_attention_unet_has_every_layer_with_right_shapes():
    model = AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8, 16))
    summary = summarize(model, (9, 12, 15))  # odd sizes on purpose
    rows = {row.name: row for row in summary.rows}
    assert rows["encoders.0.0.0"].output_shape == (1, 4, 9, 12, 15)
    assert rows["encoders.2.1.0"].output_shape == (1, 16, 2, 3, 3)  # two poolings: 9 -> 4 -> 2 etc.
    assert rows["gates.0.psi"].output_shape == (1, 1, 9, 12, 15)
    assert rows["head"].output_shape == (1, 3, 9, 12, 15)
    assert rows["upsamples.0.interpolate"].output_shape == (1, 8, 9, 12, 15)
    assert rows["gates.1.interpolate"].output_shape == (1, 2, 4, 6, 7)  # W_g(g) resized to the skip
    assert sum(row.params for row in summary.rows) == summary.total_params
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert summary.total_flops > 0
    table = summary.format_table()
    assert "encoders.0.0.0" in table and "FLOPs per forward pass" in table
    assert model.training  # summarize restores the mode


def test_gradient_flow_is_clean_for_a_fresh_network():
    torch.manual_seed(0)
    model = AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8), deep_supervision=False)
    report = check_gradient_flow(model, torch.randn(1, 1, 8, 8, 8), torch.randint(0, 3, (1, 8, 8, 8)))
    assert report.ok, report.format()
    assert all(p.grad is None for p in model.parameters())  # gradients are cleared afterwards


def test_gradient_flow_flags_frozen_and_detached_parameters():
    torch.manual_seed(0)
    model = AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8, 16))
    model.encoders[0][0][0].weight.requires_grad_(False)
    # Detach the coarsest encoder's output: nothing below it gets a gradient.
    model.encoders[2].register_forward_hook(lambda _m, _i, output: output.detach())
    report = check_gradient_flow(model, torch.randn(1, 1, 8, 8, 8), torch.randint(0, 3, (1, 8, 8, 8)))
    status = {p.name: p.status for p in report.parameters}
    assert status["encoders.0.0.0.weight"] == "frozen"
    assert status["encoders.2.0.0.weight"] == "none"
    assert status["encoders.2.1.1.bias"] == "none"
    assert status["head.weight"] == "ok"
    assert not report.ok and "encoders.2.0.0.weight" in report.format()


def test_gradient_flow_flags_all_zero_gradients():
    model = AttentionUNet(in_channels=1, out_channels=2, channels=(4, 8))
    with torch.no_grad():
        model.head.weight.zero_()  # nothing flows back through the head into the network
    report = check_gradient_flow(model, torch.randn(1, 1, 8, 8, 8), torch.randint(0, 2, (1, 8, 8, 8)))
    status = {p.name: p.status for p in report.parameters}
    assert status["head.weight"] == "ok"
    assert status["decoders.0.1.0.weight"] == "zero"
