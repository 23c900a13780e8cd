"""Inference-only speed-ups for ``AttentionUNet`` that keep its outputs (to float32 rounding) unchanged.

``optimize_for_inference(model, device)`` returns a tuned *copy* of a trained network; the original is left as it
is (training, bundles and ``state_dict`` never see the tuned modules). On the CPU it applies what measured faster
on a 2-core AVX2 machine (``Testing/benchmarks/bench_model_forward.py``, about 1.4-2x per 96^3 window):

- channels-last 3D weights (``NDHWC``), so oneDNN convolutions skip their per-call layout reorders;
- instance norm + ReLU as one module that computes the statistics with the channels-last batch-norm kernel when a
  batch holds one window (per-window statistics are then exactly instance norm's), instead of
  ``F.instance_norm``, which copies its input back to ``NCDHW`` on every call;
- every convolution through oneDNN (PyTorch sends small-batch 3D convolutions with few input planes, such as the
  first 1-channel layer, to a slow im2col path).

What measured slower here and is not applied: bf16 autocast (CPUs without native bf16 emulate it, ~200x slower),
``torch.compile`` (about 20% faster per window but ~90 s of compilation per process), TorchScript freezing (no
gain). On CUDA the model is returned unchanged; the inference code runs it under bf16/fp16 autocast.
"""

from __future__ import annotations

import copy
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .network import AttentionUNet, ConvNormReLU


class InstanceNormReLU(nn.Module):
    """``relu(instance_norm(x))`` with a trained ``nn.InstanceNorm3d``'s affine parameters, for inference.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)`` in ``x``'s memory format. With ``B == 1`` the batch-norm kernel
    with batch statistics computes exactly the per-channel statistics of instance norm and keeps channels-last
    tensors channels-last; larger batches use ``F.instance_norm``.
    """

    def __init__(self, norm: nn.InstanceNorm3d) -> None:
        super().__init__()
        if not norm.affine:
            raise ValueError("InstanceNormReLU expects an affine InstanceNorm3d (what AttentionUNet builds)")
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        else:
            out = F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        return out.relu_()


class OneDNNConv3d(nn.Module):
    """A trained ``nn.Conv3d`` evaluated with oneDNN for float32 CPU tensors (any batch size or width);
    other devices and dtypes use the ordinary convolution. ``(B, C_in, D, H, W) -> (B, C_out, D', H', W')``."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("OneDNNConv3d supports zero padding given as numbers only")
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32:
            return torch.ops.aten.mkldnn_convolution(
                x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
            )
        return conv(x)


def _replace_cpu_modules(module: nn.Module, fused_norm: bool, onednn_convs: bool) -> None:
    for name, child in module.named_children():
        if fused_norm and isinstance(child, ConvNormReLU) and isinstance(child[1], nn.InstanceNorm3d):
            child[1] = InstanceNormReLU(child[1])
            child[2] = nn.Identity()
        if onednn_convs and isinstance(child, nn.Conv3d):
            setattr(module, name, OneDNNConv3d(child))
        else:
            _replace_cpu_modules(child, fused_norm, onednn_convs)


def cpu_optimizations_available() -> bool:
    """Whether this PyTorch build has oneDNN (MKL-DNN), which the CPU optimisations rely on."""
    return torch.backends.mkldnn.is_available()


def optimize_for_inference(
    model: AttentionUNet,
    device: Union[str, torch.device] = "cpu",
    channels_last: bool = True,
    fused_norm: bool = True,
    onednn_convs: bool = True,
) -> AttentionUNet:
    """A copy of ``model`` (in eval mode) tuned for inference on ``device``; see the module docstring.

    The copy computes the same ``forward``/``forward_with_aux`` outputs (logits agree to about 1e-3 absolute in
    float32; argmax labels are unchanged except at near-ties) but must not be trained: its norm layers ignore
    training mode. The three switches exist so the benchmarks can measure each CPU optimisation on its own.
    """
    device = torch.device(device)
    if device.type != "cpu" or not cpu_optimizations_available():
        return model.eval()
    tuned = copy.deepcopy(model).eval()
    _replace_cpu_modules(tuned, fused_norm, onednn_convs)
    return tuned.to(memory_format=torch.channels_last_3d) if channels_last else tuned
