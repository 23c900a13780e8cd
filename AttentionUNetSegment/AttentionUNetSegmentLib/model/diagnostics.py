"""The design tutorial's debugging aids as tools: a layer-by-layer summary and a gradient-flow check.

``summarize`` runs one forward pass with hooks and reports every layer's output shape, parameter count and FLOPs.
FLOPs count a multiply-add as two operations:

- ``Conv3d``: ``2 * C_in / groups * k_d * k_h * k_w * C_out * D * H * W`` plus one add per output element for bias;
- ``InstanceNorm3d``/``BatchNorm3d``: 5 per output element (mean, variance, normalise, scale, shift);
- ``ReLU``: 1 per output element; ``MaxPool3d``: ``k_d * k_h * k_w - 1`` comparisons per output element;
- trilinear ``interpolate`` (decoder upsampling, attention-gate resizing): 21 per output element (7 lerps).

The gates' element-wise arithmetic (add, sigmoid, product) is a rounding error next to the convolutions and is
not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

NORM_FLOPS_PER_ELEMENT = 5
TRILINEAR_FLOPS_PER_ELEMENT = 21


@dataclass
class LayerRow:
    """One layer's line in a summary."""

    name: str
    type: str
    output_shape: Tuple[int, ...]
    params: int
    flops: int


@dataclass
class ModelSummary:
    """Rows in execution order plus totals. ``total_params`` counts every parameter of the model once."""

    input_shape: Tuple[int, ...]
    rows: List[LayerRow]
    total_params: int
    trainable_params: int

    @property
    def total_flops(self) -> int:
        return sum(row.flops for row in self.rows)

    def format_table(self) -> str:
        """A fixed-width table with a totals footer."""
        header = ("layer", "type", "output shape", "params", "FLOPs")
        lines = [(row.name, row.type, "x".join(str(s) for s in row.output_shape), f"{row.params:,}",
                  _human(row.flops)) for row in self.rows]
        widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(5)]

        def render(cells: Sequence[str]) -> str:
            return "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(render(header))
        footer = [
            f"input shape (B, C, D, H, W): {tuple(self.input_shape)}",
            f"parameters: {self.total_params:,} ({self.trainable_params:,} trainable, "
            f"{self.total_params * 4 / 2**20:.2f} MiB as float32)",
            f"FLOPs per forward pass: {_human(self.total_flops)} ({self.total_flops:,})",
        ]
        return "\n".join([render(header), rule, *map(render, lines), rule, *footer])


def _human(flops: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return str(flops)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """FLOPs of one leaf layer that produced ``output`` (see the module docstring for the formulas)."""
    elements = output.numel()
    if isinstance(module, nn.Conv3d):
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
        per_output = 2 * (module.in_channels // module.groups) * kernel + (1 if module.bias is not None else 0)
        return per_output * elements
    if isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d)):
        return NORM_FLOPS_PER_ELEMENT * elements
    if isinstance(module, nn.ReLU):
        return elements
    if isinstance(module, nn.MaxPool3d):
        size = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 3
        return (size[0] * size[1] * size[2] - 1) * elements
    return 0


class _InterpolationRecorder(TorchFunctionMode):
    """Records every ``F.interpolate`` call (a function, invisible to module hooks) under the calling module."""

    def __init__(self, current_module: Callable[[], str], rows: List[LayerRow]) -> None:
        super().__init__()
        self.current_module = current_module
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if func is F.interpolate:
            self.rows.append(LayerRow(f"{self.current_module()}.interpolate", "Interpolate", tuple(output.shape), 0,
                                      TRILINEAR_FLOPS_PER_ELEMENT * output.numel()))
        return output


def summarize(model: nn.Module, input_size_zyx: Sequence[int], batch_size: int = 1,
              device: Optional[torch.device] = None) -> ModelSummary:
    """Run one forward pass on zeros of shape ``(batch_size, in_channels, *input_size_zyx)`` and record every
    leaf layer's output shape, own parameters and FLOPs, plus every interpolation, in execution order.

    The model is put in eval mode for the pass (so batch-norm statistics are untouched) and restored afterwards.
    """
    in_channels = getattr(model, "in_channels", 1)
    device = device if device is not None else next(model.parameters()).device
    x = torch.zeros((batch_size, in_channels, *(int(s) for s in input_size_zyx)), device=device)
    rows: List[LayerRow] = []
    stack: List[str] = []
    handles = []
    for name, module in model.named_modules():
        def enter(_module, _inputs, name=name):
            stack.append(name or type(model).__name__)

        def leave(module, _inputs, output, name=name):
            stack.pop()
            if not list(module.children()) and isinstance(output, torch.Tensor):
                rows.append(LayerRow(name, type(module).__name__, tuple(output.shape), _own_params(module),
                                     layer_flops(module, output)))

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _InterpolationRecorder(lambda: stack[-1] if stack else "", rows):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ModelSummary(
        input_shape=tuple(x.shape),
        rows=rows,
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


@dataclass
class ParameterGradient:
    """One parameter's gradient after a backward pass. ``status``: ``ok``, ``none`` (no gradient reached it),
    ``zero`` (gradient exactly zero everywhere) or ``frozen`` (``requires_grad=False``)."""

    name: str
    shape: Tuple[int, ...]
    status: str
    grad_norm: float


@dataclass
class GradientFlowReport:
    loss: float
    parameters: List[ParameterGradient] = field(default_factory=list)

    @property
    def problems(self) -> List[ParameterGradient]:
        return [p for p in self.parameters if p.status != "ok"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"loss: {self.loss:.6g}; {len(self.parameters)} parameter tensors checked"]
        if self.ok:
            lines.append("every parameter received a non-zero gradient")
        else:
            explain = {"none": "no gradient (not connected to the loss, or detached)",
                       "zero": "all-zero gradient (dead ReLUs, zero-initialised path, or a masked loss)",
                       "frozen": "frozen (requires_grad=False)"}
            lines.append(f"{len(self.problems)} parameter tensors need attention:")
            lines += [f"  {p.name} {tuple(p.shape)}: {explain[p.status]}" for p in self.problems]
        smallest = sorted((p for p in self.parameters if p.status == "ok"), key=lambda p: p.grad_norm)[:3]
        if smallest:
            lines.append("smallest gradient norms: " + ", ".join(f"{p.name}={p.grad_norm:.3g}" for p in smallest))
        return "\n".join(lines)


def _segmentation_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits plus every deep-supervision head (target nearest-downsampled to each)."""
    logits = output.logits if hasattr(output, "logits") else output
    loss = F.cross_entropy(logits, target)
    for extra in getattr(output, "deep_supervision", []):
        coarse = F.interpolate(target[:, None].float(), size=extra.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + F.cross_entropy(extra, coarse)
    return loss


def check_gradient_flow(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                        loss_fn: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None) -> GradientFlowReport:
    """One training-mode forward/backward pass; reports every parameter whose gradient is missing or all zero.

    Args:
        inputs: ``(B, C_in, D, H, W)`` float.
        target: ``(B, D, H, W)`` class indices (int64) for the default cross-entropy loss.
        loss_fn: ``loss_fn(output, target)``; ``output`` is ``forward_with_aux``'s result where the model has it
            (so deep-supervision heads are exercised), else the plain forward output.

    The model's gradients are cleared before and after, and its train/eval mode is restored.
    """
    loss_fn = loss_fn or _segmentation_loss
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            output = model.forward_with_aux(inputs) if hasattr(model, "forward_with_aux") else model(inputs)
            loss = loss_fn(output, target)
            loss.backward()
        rows = []
        for name, parameter in model.named_parameters():
            grad = parameter.grad
            if not parameter.requires_grad:
                status, norm = "frozen", 0.0
            elif grad is None:
                status, norm = "none", 0.0
            else:
                norm = float(grad.detach().float().norm())
                status = "zero" if not bool(torch.any(grad != 0)) else "ok"
            rows.append(ParameterGradient(name, tuple(parameter.shape), status, norm))
        return GradientFlowReport(loss=float(loss.detach()), parameters=rows)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
