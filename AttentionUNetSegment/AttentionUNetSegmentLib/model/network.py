"""3D Attention U-Net (Oktay et al., 2018) built from small, documented blocks.

Tensor layout everywhere: ``(B, C, D, H, W)``, where ``D, H, W`` are the array axes ``(z, y, x)`` of a
SimpleITK image (``sitk.GetArrayFromImage`` order).

Resampling convention: every trilinear resize in the engine (decoder upsampling, attention-gate resizing,
image resampling) uses ``align_corners=False`` and an explicit ``size=``, so voxel *centres* map as in ITK
and odd sizes round-trip exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORMS = ("instance", "batch")

#: Bias of the attention gates' psi convolution at initialisation: sigmoid(3) ~= 0.95, so every gate starts
#: almost fully open (the skip connection passes nearly unchanged) and learns where to close.
GATE_OPEN_BIAS = 3.0


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"unknown norm {kind!r}: choose one of {', '.join(NORMS)}")


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of ``(B, C, D, H, W)`` to ``size`` (the engine's one resampling convention)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


class ConvNormReLU(nn.Sequential):
    """``Conv3d(k=3, pad=1) -> norm -> ReLU``: ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance") -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two ``ConvNormReLU`` blocks: ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance") -> None:
        super().__init__(ConvNormReLU(in_channels, out_channels, norm), ConvNormReLU(out_channels, out_channels, norm))


class AttentionGate(nn.Module):
    """Additive attention gate that weights a skip connection by a coarser gating signal.

    ``alpha = sigmoid(psi(relu(W_g(g) + W_x(x))))`` and the output is ``x * alpha``.

    Args:
        gate_channels: channels of the gating signal ``g`` (the coarser decoder feature).
        skip_channels: channels of the skip connection ``x``.
        inter_channels: width of the intermediate space; defaults to a quarter of ``skip_channels`` (at least 1).

    Shapes: ``g: (B, C_g, D/2, H/2, W/2)`` (any coarser size), ``x: (B, C_x, D, H, W)`` ->
    ``(x * alpha: (B, C_x, D, H, W), alpha: (B, 1, D, H, W))``. ``W_g(g)`` is resized to the skip's exact size,
    so odd sizes work.

    Initialisation: psi's weights are small (std 1e-2) and its bias is ``GATE_OPEN_BIAS``, so ``alpha`` starts
    near 0.95 everywhere (an open gate) while gradients still reach ``W_g`` and ``W_x`` from the first step.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: Optional[int] = None) -> None:
        super().__init__()
        inter = inter_channels if inter_channels is not None else max(1, skip_channels // 4)
        self.inter_channels = inter
        self.w_g = nn.Conv3d(gate_channels, inter, kernel_size=1, bias=True)
        self.w_x = nn.Conv3d(skip_channels, inter, kernel_size=1, bias=False)
        self.psi = nn.Conv3d(inter, 1, kernel_size=1, bias=True)

    def reset_psi(self) -> None:
        """Open the gate (see the class docstring); called after the network-wide Kaiming initialisation."""
        nn.init.normal_(self.psi.weight, std=1e-2)
        nn.init.constant_(self.psi.bias, GATE_OPEN_BIAS)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        gate = _resize(self.w_g(g), x.shape[2:])
        alpha = torch.sigmoid(self.psi(F.relu(gate + self.w_x(x))))
        return x * alpha, alpha


class UpSample(nn.Module):
    """Trilinear upsampling to an explicit size, then ``ConvNormReLU`` (no transposed convolution, so no
    checkerboard artefacts): ``(B, C_in, d, h, w), size=(D, H, W) -> (B, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.conv = ConvNormReLU(in_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(_resize(x, size))


@dataclass
class NetworkOutput:
    """Everything one forward pass produces.

    ``logits``: ``(B, out_channels, D, H, W)``.
    ``attention``: one ``(B, 1, D_k, H_k, W_k)`` map per gate, index 0 the finest (full resolution), each at its
    own skip's resolution (level k has about ``size / 2**k``).
    ``deep_supervision``: logits of the coarser decoder levels, finest first (empty unless enabled).
    """

    logits: torch.Tensor
    attention: List[torch.Tensor] = field(default_factory=list)
    deep_supervision: List[torch.Tensor] = field(default_factory=list)


class AttentionUNet(nn.Module):
    """3D U-Net whose skip connections pass through attention gates.

    Args:
        in_channels: image channels (1 for a single MRI/CT volume).
        out_channels: classes including background.
        channels: feature widths per level, finest first; ``(64, 128, 256, 512)`` is the design tutorial's network,
            ``(16, 32, 64, 128)`` a CPU-friendly one. Depth is ``len(channels)``; inputs need no particular size
            (odd sizes work) but at least ``2 ** (depth - 1)`` voxels per axis.
        norm: ``"instance"`` (robust for batch sizes 1-2) or ``"batch"`` (the tutorial's choice).
        inter_channels_ratio: attention-gate intermediate width as a fraction of the skip's channels.
        deep_supervision: add 1x1x1 heads on the coarser decoder levels (used by training).
        gradient_checkpointing: recompute each ``DoubleConv`` in the backward pass to save activation memory
            (training only; has no effect in eval mode or under ``torch.no_grad``).

    ``forward(x)`` maps ``(B, in_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``;
    ``forward_with_aux(x)`` also returns every gate's attention map and the deep-supervision logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str = "instance",
        inter_channels_ratio: float = 0.25,
        deep_supervision: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels, e.g. (16, 32, 64, 128)")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.norm = norm
        self.inter_channels_ratio = float(inter_channels_ratio)
        self.gradient_checkpointing = gradient_checkpointing

        self.encoders = nn.ModuleList(
            [DoubleConv(in_channels, channels[0], norm)]
            + [DoubleConv(channels[i - 1], channels[i], norm) for i in range(1, len(channels))]
        )
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        # Decoder level k (k = depth-2 .. 0) merges the gated skip of level k with the upsampled level k+1.
        levels = range(len(channels) - 1)
        self.gates = nn.ModuleList(
            [
                AttentionGate(channels[k + 1], channels[k], max(1, int(round(channels[k] * inter_channels_ratio))))
                for k in levels
            ]
        )
        self.upsamples = nn.ModuleList([UpSample(channels[k + 1], channels[k], norm) for k in levels])
        self.decoders = nn.ModuleList([DoubleConv(2 * channels[k], channels[k], norm) for k in levels])
        self.head = nn.Conv3d(channels[0], out_channels, kernel_size=1)
        self.deep_supervision_heads = nn.ModuleList(
            [nn.Conv3d(channels[k], out_channels, kernel_size=1) for k in range(1, len(channels) - 1)]
            if deep_supervision
            else []
        )
        self._initialise()

    @property
    def deep_supervision(self) -> bool:
        return len(self.deep_supervision_heads) > 0

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def min_input_size(self) -> int:
        """Smallest size per axis that survives every pooling step."""
        return 2 ** (len(self.channels) - 1)

    def config(self) -> Dict[str, object]:
        """Constructor arguments that define the architecture (what a model bundle records)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "norm": self.norm,
            "inter_channels_ratio": self.inter_channels_ratio,
            "deep_supervision": self.deep_supervision,
        }

    def _initialise(self) -> None:
        if any(parameter.is_meta for parameter in self.parameters()):
            return  # shapes only (bundle checks): meta tensors hold no values, and torch's meta init costs ~1.5 s
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for gate in self.gates:
            gate.reset_psi()

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_with_aux(self, x: torch.Tensor) -> NetworkOutput:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = self._block(encoder, x)
            skips.append(x)

        attention: List[torch.Tensor] = [None] * self.num_gates  # type: ignore[list-item]
        decoded: List[torch.Tensor] = [None] * self.num_gates  # type: ignore[list-item]
        for k in reversed(range(self.num_gates)):
            skip = skips[k]
            gated, attention[k] = self.gates[k](x, skip)
            x = self._block(self.decoders[k], torch.cat([gated, self.upsamples[k](x, skip.shape[2:])], dim=1))
            decoded[k] = x

        deep = [head(decoded[k + 1]) for k, head in enumerate(self.deep_supervision_heads)]
        return NetworkOutput(logits=self.head(x), attention=attention, deep_supervision=deep)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` logits; with ``return_attention``,
        ``(logits, maps)``: every gate's ``(B, 1, D_k, H_k, W_k)`` map, finest first (see ``forward_with_aux``)."""
        output = self.forward_with_aux(x)
        return (output.logits, output.attention) if return_attention else output.logits


class AttentionMapRecorder:
    """Collects every attention gate's ``alpha`` through forward hooks, as the design tutorial shows.

    Use as a context manager; ``maps`` holds one detached ``(B, 1, D_k, H_k, W_k)`` tensor per gate, finest first,
    from the most recent forward pass::

        with AttentionMapRecorder(model) as recorder:
            model(x)
        alphas = recorder.maps
    """

    def __init__(self, model: AttentionUNet) -> None:
        self.model = model
        self.maps: List[torch.Tensor] = []
        self._captured: Dict[int, torch.Tensor] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int):
        def record(_module: nn.Module, _inputs: object, output: Tuple[torch.Tensor, torch.Tensor]) -> None:
            self._captured[index] = output[1].detach()
            self.maps = [self._captured[k] for k in sorted(self._captured)]

        return record

    def __enter__(self) -> "AttentionMapRecorder":
        self._handles = [gate.register_forward_hook(self._hook(k)) for k, gate in enumerate(self.model.gates)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def build_network(config: Dict[str, object], **overrides: object) -> AttentionUNet:
    """Construct an ``AttentionUNet`` from a bundle's ``architecture`` dict (unknown keys are refused)."""
    allowed = {"in_channels", "out_channels", "channels", "norm", "inter_channels_ratio", "deep_supervision"}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown architecture keys {sorted(unknown)}; expected a subset of {sorted(allowed)}")
    return AttentionUNet(**{**config, **overrides})  # type: ignore[arg-type]
