"""AttentionUNet building blocks and the whole network: shapes, gates, hooks, deep supervision, checkpointing."""

from __future__ import annotations

import pytest
import torch

from AttentionUNetSegmentLib.model.network import (
    GATE_OPEN_BIAS,
    AttentionGate,
    AttentionMapRecorder,
    AttentionUNet,
    UpSample,
    build_network,
)

TINY = (4, 8, 16)


def _tiny(**kwargs) -> AttentionUNet:
    torch.manual_seed(0)
    return AttentionUNet(in_channels=1, out_channels=3, channels=kwargs.pop("channels", TINY), **kwargs)


@pytest.mark.parametrize("size", [(17, 23, 19), (16, 16, 16), (9, 12, 31)])
def test_network_output_matches_odd_input_sizes(size):
    model = _tiny().eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        out = model.forward_with_aux(x)
    assert out.logits.shape == (2, 3, *size)
    assert len(out.attention) == model.num_gates == len(TINY) - 1
    expected = list(size)
    for alpha in out.attention:
        assert alpha.shape == (2, 1, *expected)
        expected = [s // 2 for s in expected]


def test_attention_gate_keeps_odd_skip_shape():
    gate = AttentionGate(gate_channels=8, skip_channels=6)
    assert gate.inter_channels == 1  # a quarter of the skip channels by default
    g, x = torch.randn(1, 8, 4, 5, 3), torch.randn(1, 6, 9, 11, 7)
    gated, alpha = gate(g, x)
    assert gated.shape == x.shape and alpha.shape == (1, 1, 9, 11, 7)
    assert torch.allclose(gated, x * alpha)


def test_upsample_reaches_explicit_odd_size():
    up = UpSample(8, 4)
    assert up(torch.randn(1, 8, 4, 5, 3), (9, 11, 7)).shape == (1, 4, 9, 11, 7)


def test_forward_can_return_every_gates_attention_map():
    model = _tiny().eval()
    x = torch.randn(1, 1, 20, 24, 18) * 5
    with torch.no_grad():
        logits, maps = model(x, return_attention=True)
        plain = model(x)
        aux = model.forward_with_aux(x)
    assert torch.equal(logits, plain) and torch.equal(logits, aux.logits)
    assert len(maps) == len(model.gates) and all(torch.equal(a, b) for a, b in zip(maps, aux.attention))
    # Gate k sits on skip k's grid: full size halved (floor, MaxPool3d) k times.
    for k, alpha in enumerate(maps):
        assert alpha.shape == (1, 1, *(n // 2**k for n in x.shape[2:]))


def test_gates_start_open():
    model = _tiny().eval()
    with torch.no_grad():
        maps = model.forward_with_aux(torch.randn(1, 1, 16, 16, 16)).attention
    open_value = torch.sigmoid(torch.tensor(GATE_OPEN_BIAS))
    for gate, alpha in zip(model.gates, maps):
        assert torch.allclose(gate.psi.bias, torch.full_like(gate.psi.bias, GATE_OPEN_BIAS))
        # psi's weights are tiny, so alpha stays near sigmoid(GATE_OPEN_BIAS) (~0.95) whatever the input.
        assert torch.allclose(alpha, open_value.expand_as(alpha), atol=0.05)


def test_recorder_hooks_capture_the_forward_with_aux_maps():
    model = _tiny().eval()
    x = torch.randn(1, 1, 18, 20, 22)
    with torch.no_grad():
        expected = model.forward_with_aux(x).attention
        with AttentionMapRecorder(model) as recorder:
            model(x)
    assert len(recorder.maps) == len(expected)
    for recorded, direct in zip(recorder.maps, expected):
        assert torch.equal(recorded, direct)
    assert all(not gate._forward_hooks for gate in model.gates)  # hooks removed on exit


def test_deep_supervision_heads_give_coarser_logits():
    model = _tiny(channels=(4, 8, 16, 32), deep_supervision=True).eval()
    size = (24, 20, 16)
    with torch.no_grad():
        out = model.forward_with_aux(torch.randn(1, 1, *size))
    assert out.logits.shape == (1, 3, *size)
    assert [tuple(d.shape) for d in out.deep_supervision] == [(1, 3, 12, 10, 8), (1, 3, 6, 5, 4)]
    assert model.config()["deep_supervision"] is True
    assert not _tiny().deep_supervision


def test_tutorial_network_is_constructible():
    model = AttentionUNet(in_channels=1, out_channels=2, channels=(64, 128, 256, 512), norm="batch")
    assert model.num_gates == 3 and model.min_input_size == 8
    assert [gate.inter_channels for gate in model.gates] == [16, 32, 64]
    rebuilt = build_network(model.config())
    assert rebuilt.config() == model.config()
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_config_rebuilds_the_same_network_when_gate_widths_round():
    # 10 * 0.25 rounds to 2 but 40 * 0.25 = 10: the ratio must come back as given, not as 2 / 10.
    model = AttentionUNet(in_channels=1, out_channels=2, channels=(10, 20, 40), inter_channels_ratio=0.25)
    assert model.config()["inter_channels_ratio"] == 0.25
    build_network(model.config()).load_state_dict(model.state_dict(), strict=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 1, 16, 12, 16)
    target = torch.randint(0, 3, (2, 16, 12, 16))
    grads = []
    for checkpointing in (False, True):
        model = _tiny(gradient_checkpointing=checkpointing).train()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_unknown_norm_and_architecture_keys_are_refused():
    with pytest.raises(ValueError, match="unknown norm"):
        AttentionUNet(norm="group")
    with pytest.raises(ValueError, match="unknown architecture keys"):
        build_network({"channels": [4, 8], "kernel": 3})
