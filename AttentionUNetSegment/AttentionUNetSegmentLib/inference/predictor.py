"""Sliding-window inference and the ``Predictor`` that maps a whole image to labels and attention maps.

Pipeline of ``Predictor.predict``: optional ROI crop -> ``preprocess`` (reorient, resample, normalise) ->
``sliding_window_inference`` (Gaussian-weighted windows, optional mirror TTA) -> class probabilities resampled
linearly onto the exact input grid -> argmax -> label map (pasted back into the full grid for an ROI).

Attention maps are blended across windows like the probabilities but stay at each gate's own resolution: gate
``k`` lives on the padded preprocessed grid pooled by ``2**k`` (spacing ``* 2**k``, origin moved by
``(2**k - 1) / 2`` fine voxels along every index axis), so each coarse voxel is exactly the block of fine voxels it
summarises and the map overlays the input in world space without being upsampled.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import autocast, autocast_dtype, resolve_device
from ..errors import AttentionUNetError, CancelledError
from ..fileio.imageio import validate_image
from ..model.acceleration import optimize_for_inference
from ..model.bundle import LabelInfo
from ..model.network import AttentionUNet
from ..preprocessing.preprocess import PreparedImage, crop_to_roi, orientation_of, preprocess, resample_to_reference
from ..progress import scaled
from .postprocessing import keep_central_component, keep_largest_component

if TYPE_CHECKING:
    from ..preprocessing.localization import LocalizerSpec, Registration

LOGGER = logging.getLogger(__name__)

#: Lower bound of the Gaussian importance map (its corners are ~1e-11 otherwise, which reduced-precision
#: accumulators cannot hold; nnU-Net and MONAI clamp likewise).
IMPORTANCE_FLOOR = 1e-3
#: Voxels of context kept around a region of interest (the network sees them; the labels outside are dropped).
ROI_MARGIN_VOXELS = 8
#: An ROI at most this many times the model's field of view along every axis is segmented in one window centred
#: on it, as the localiser's boxes are; a larger one is tiled with sliding windows.
ONE_VIEW_ROI_FACTOR = 1.25
#: Windows per forward pass when the caller does not say.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 4}

ProgressCallback = Callable[[str, float, str], None]
CancelCallback = Callable[[], bool]

# Fractions of one prediction at which its stages start (what ``progress`` reports).
_STAGE_START = {"preprocess": 0.0, "inference": 0.05, "resample": 0.9, "postprocess": 0.97}


@dataclass
class Prediction:
    """Everything ``Predictor.predict`` produces for one image.

    ``labels``: uint8 (int16 with label values above 255, see ``label_dtype``) on the input grid (size, origin,
    spacing, direction).
    ``attention``: float32 in [0, 1], one image per gate, finest first, each on its gate's own coarse grid.
    ``probabilities``: label value (0 = background included) -> float32 image on the input grid; empty unless
    asked for. ``timings``: seconds per stage. ``device``: what actually ran (``"cpu"``, ``"cuda:0"``).
    """

    labels: sitk.Image
    attention: List[sitk.Image] = field(default_factory=list)
    probabilities: Dict[int, sitk.Image] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    #: The label set that ran when it is not the bundle's own (the per-side segments of a localised run).
    segments: Optional[List[LabelInfo]] = None
    #: The report's ``localization`` (boxes in the input's RAS mm, registration quality), or None.
    localization: Optional[Dict[str, object]] = None
    #: Domain-guard and localisation warnings for the report.
    warnings: List[str] = field(default_factory=list)


@dataclass
class SlidingWindowResult:
    """Output of ``sliding_window_inference`` for a ``(C_in, Z, Y, X)`` volume.

    ``scores``: ``(C_out, Z, Y, X)`` float32 on the CPU: softmax probabilities (or raw logits) blended across
    windows, on the input volume's own grid (padding removed).
    ``attention``: one ``(Z_k, Y_k, X_k)`` float32 CPU tensor per gate (finest first) in [0, 1].
    ``attention_start``: per gate, the ``(z, y, x)`` index in the input volume of the first fine voxel under coarse
    voxel ``(0, 0, 0)`` (zero or negative: coarse voxels may straddle the padding). Coarse voxel ``j`` of gate
    ``k`` covers fine voxels ``start + j * 2**k`` .. ``start + (j + 1) * 2**k - 1`` on each axis.
    """

    scores: torch.Tensor
    attention: List[torch.Tensor] = field(default_factory=list)
    attention_start: List[Tuple[int, int, int]] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def gaussian_importance_map(
    patch_size: Tuple[int, int, int], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Separable Gaussian of shape ``patch_size`` ``(D, H, W)`` centred on the patch, sigma = patch / 8 per axis,
    maximum 1 and floored at ``IMPORTANCE_FLOOR``. Cached per size/device/dtype: never modify the result."""
    profiles = []
    for size in patch_size:
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        profiles.append(torch.exp(-0.5 * (offsets / (size / 8)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights = (weights / weights.max()).clamp_(min=IMPORTANCE_FLOOR)
    return weights.to(device=device, dtype=dtype)


def window_starts(size: int, patch: int, overlap: float, align: int) -> List[int]:
    """Start indices of windows of ``patch`` voxels covering ``size`` voxels with about ``overlap`` overlap.

    ``size`` and ``patch`` are multiples of ``align`` and ``size >= patch``; starts are multiples of ``align``
    spread evenly from 0 to ``size - patch``.
    """
    if size <= patch:
        return [0]
    step = max(1.0, patch * (1.0 - overlap))
    count = math.ceil((size - patch) / step) + 1
    slots = (size - patch) // align
    return sorted({int(round(i * slots / (count - 1))) * align for i in range(count)})


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


#: Tensor dim of a ``(B, C, D, H, W)`` = ``(B, C, z, y, x)`` batch that mirroring along a bundle axis flips (the
#: axes are the canonical orientation's ITK axes, as training's ``flip_axes``: ``x`` is the last array axis).
MIRROR_DIMS = {"z": 2, "y": 3, "x": 4}


def mirror_sets(axes: Sequence[str]) -> List[Tuple[int, ...]]:
    """Tensor dims to flip for TTA along ``axes`` (``"x"``, ``"y"``, ``"z"``): every combination, the unflipped
    copy first; ``[()]`` (no mirroring) when ``axes`` is empty."""
    dims = sorted(MIRROR_DIMS[axis] for axis in axes)
    return [combo for n in range(len(dims) + 1) for combo in itertools.combinations(dims, n)]


class FoldEnsemble(nn.Module):
    """The networks of a fold ensemble (same architecture), which ``sliding_window_inference`` runs on every
    window and averages (softmax probabilities and attention maps, each mirrored copy of each fold weighted
    equally). Exposes what the sliding window reads of one network: ``min_input_size``, ``num_gates``,
    ``out_channels`` and ``parameters()`` (for the device)."""

    def __init__(self, members: Sequence[AttentionUNet]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two networks")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.min_input_size, self.num_gates, self.out_channels = first.min_input_size, first.num_gates, \
            first.out_channels


Network = Union[AttentionUNet, FoldEnsemble]


def _predict_tiles(
    model: Network,
    tiles: torch.Tensor,
    mirror_axes: Sequence[str],
    attention: bool,
    softmax: bool,
    compute_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``tiles (B, C_in, d, h, w)`` -> ``(scores (B, C_out, d, h, w), [alpha_k (B, 1, d_k, h_k, w_k)])`` in float32,
    averaged over the copies mirrored along ``mirror_axes`` and, for a ``FoldEnsemble``, over its folds."""
    members = list(model.members) if isinstance(model, FoldEnsemble) else [model]
    runs = [(member, dims) for member in members for dims in mirror_sets(mirror_axes)]
    scores: Optional[torch.Tensor] = None
    alphas: List[torch.Tensor] = []
    for member, dims in runs:
        flipped = tiles.flip(dims) if dims else tiles
        with autocast(tiles.device, compute_dtype):
            output = member.forward_with_aux(flipped)
        logits = output.logits.float()
        result = torch.softmax(logits, dim=1) if softmax else logits
        result = result.flip(dims) if dims else result
        scores = result if scores is None else scores.add_(result)
        if attention:
            maps = [(a.float().flip(dims) if dims else a.float()) for a in output.attention]
            alphas = maps if not alphas else [total.add_(a) for total, a in zip(alphas, maps)]
    assert scores is not None
    if len(runs) > 1:
        scores /= len(runs)
        alphas = [a / len(runs) for a in alphas]
    return scores, alphas


def sliding_window_inference(
    volume: torch.Tensor,
    model: Network,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 1,
    mirror_axes: Sequence[str] = (),
    attention: bool = True,
    softmax: bool = True,
    device: Union[str, torch.device, None] = None,
    precision: str = "auto",
    accumulate_dtype: Optional[torch.dtype] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[CancelCallback] = None,
) -> SlidingWindowResult:
    """Gaussian-weighted sliding-window inference of ``model`` over a whole volume.

    The volume is zero-padded (centred) to at least one patch and to a multiple of ``model.min_input_size`` per
    axis; window starts are multiples of ``min_input_size`` spread evenly with about ``overlap`` overlap, so every
    gate's coarse map of a window lands exactly on the pooled grid of the padded volume.

    Args:
        volume: ``(C_in, Z, Y, X)`` or ``(1, C_in, Z, Y, X)`` float tensor (normalised image).
        model: the network in eval mode (already on ``device``), or a ``FoldEnsemble`` of them (every window is
            run by every fold, their softmax probabilities (logits with ``softmax=False``) and attention averaged).
        patch_size: window size ``(z, y, x)`` in voxels; rounded up to a multiple of ``min_input_size``.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        mirror_axes: test-time augmentation: average every window's copies mirrored along these axes (``"x"``,
            ``"y"``, ``"z"`` of the volume, ``x`` = last axis): 2 copies per axis, ``2**len(axes)`` in all.
        attention: also blend every gate's attention map.
        softmax: blend softmax probabilities (``True``) or raw logits (``False``, e.g. to compare with MONAI).
        device: where the windows run (default: the model's device).
        precision: one of ``constants.PRECISIONS`` (see there); outputs are float32 whatever the arithmetic.
        accumulate_dtype: dtype of the ``(C_out, Z, Y, X)`` accumulator: default float16 on CUDA (as nnU-Net;
            blended probabilities stay within a few 1e-3 of float32, see the tests) and float32 on the CPU.
            Weights and attention accumulate in float32; nothing is ever float64.
        progress: called as ``progress(windows_done, windows_total)`` after every batch.
        cancel: polled before every batch; returning True raises ``CancelledError``.

    Returns:
        ``SlidingWindowResult`` (tensors on the CPU).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap {overlap} must be in [0, 1)")
    if volume.dim() == 5:
        if volume.shape[0] != 1:
            raise ValueError(f"expected one volume (1, C, Z, Y, X), got {tuple(volume.shape)}")
        volume = volume[0]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    compute_dtype = autocast_dtype(precision, device)
    align = model.min_input_size
    num_gates = model.num_gates if attention else 0
    patch = tuple(_round_up(p, align) for p in patch_size)
    grid = _PaddedGrid.around(tuple(int(s) for s in volume.shape[1:]), patch, align)
    image = F.pad(volume.to(device=device, dtype=torch.float32), grid.padding())
    if accumulate_dtype is None:
        accumulate_dtype = torch.float16 if device.type == "cuda" else torch.float32
    blend = _WindowBlend.zeros(model.out_channels, grid.padded, patch, num_gates, accumulate_dtype, device)

    starts = list(itertools.product(*(window_starts(s, p, overlap, align) for s, p in zip(grid.padded, patch))))
    with torch.inference_mode():
        for first in range(0, len(starts), batch_size):
            if cancel is not None and cancel():
                raise CancelledError("segmentation cancelled; nothing was written")
            batch = starts[first : first + batch_size]
            tiles = torch.stack([image[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in batch])
            blend.add(batch, patch, *_predict_tiles(model, tiles, mirror_axes, num_gates > 0, softmax, compute_dtype))
            if progress is not None:
                progress(min(first + batch_size, len(starts)), len(starts))
        scores = blend.scores_inside(grid)  # first: it frees the scores' accumulator
        maps, map_starts = blend.attention_inside(grid)
    return SlidingWindowResult(scores=scores, attention=maps, attention_start=map_starts)


@dataclass
class _PaddedGrid:
    """A volume of ``spatial`` voxels zero-padded, centred, to ``padded`` (at least one patch, a multiple of the
    network's ``min_input_size``); ``before`` voxels of padding precede it on each axis (all ``(z, y, x)``)."""

    spatial: Tuple[int, ...]
    padded: Tuple[int, ...]
    before: Tuple[int, ...]

    @classmethod
    def around(cls, spatial: Tuple[int, ...], patch: Sequence[int], align: int) -> "_PaddedGrid":
        padded = tuple(max(p, _round_up(s, align)) for s, p in zip(spatial, patch))
        return cls(spatial, padded, tuple((p - s) // 2 for s, p in zip(spatial, padded)))

    def padding(self) -> List[int]:
        """``F.pad``'s argument: ``(x_before, x_after, y_before, y_after, z_before, z_after)``, last axis first."""
        return [v for s, p, b in reversed(list(zip(self.spatial, self.padded, self.before))) for v in (b, p - s - b)]

    def inside(self) -> Tuple[slice, ...]:
        """The volume's voxels within the padded grid."""
        return tuple(slice(b, b + s) for b, s in zip(self.before, self.spatial))


@dataclass
class _WindowBlend:
    """Gaussian-weighted sums of every window's outputs on the padded grid: class scores (``accumulate_dtype``),
    their weights, and each gate's attention on the grid pooled by ``2**k`` (float32)."""

    importance: torch.Tensor
    gate_importance: List[torch.Tensor]
    scores: torch.Tensor
    weights: torch.Tensor
    gate_sums: List[torch.Tensor]

    @classmethod
    def zeros(cls, channels: int, padded: Sequence[int], patch: Sequence[int], num_gates: int,
              accumulate_dtype: torch.dtype, device: torch.device) -> "_WindowBlend":
        importance = gaussian_importance_map(tuple(patch), device)
        return cls(importance, [F.avg_pool3d(importance[None, None], 2**k)[0, 0] for k in range(num_gates)],
                   torch.zeros((channels, *padded), dtype=accumulate_dtype, device=device),
                   torch.zeros(tuple(padded), dtype=torch.float32, device=device),
                   [torch.zeros([p // 2**k for p in padded], dtype=torch.float32, device=device)
                    for k in range(num_gates)])

    def add(self, starts: Sequence[Tuple[int, int, int]], patch: Sequence[int], tile_scores: torch.Tensor,
            tile_alphas: Sequence[torch.Tensor]) -> None:
        """Add a batch of windows (``starts[i]`` is window ``i``'s corner) weighted by the importance map."""
        for i, (z, y, x) in enumerate(starts):
            window = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
            self.scores[(slice(None), *window)] += (tile_scores[i] * self.importance).to(self.scores.dtype)
            self.weights[window] += self.importance
            for k, gate_sum in enumerate(self.gate_sums):
                f = 2**k
                coarse = tuple(slice(w.start // f, w.stop // f) for w in window)
                gate_sum[coarse] += tile_alphas[k][i, 0] * self.gate_importance[k]

    def scores_inside(self, grid: _PaddedGrid) -> torch.Tensor:
        """The blended ``(C_out, Z, Y, X)`` scores of the volume's voxels, float32 on the CPU (one channel at a
        time, so no float32 copy of the whole accumulator is made); frees the accumulator."""
        inside = grid.inside()
        inside_weights = self.weights[inside]
        blended = torch.empty((self.scores.shape[0], *grid.spatial), dtype=torch.float32)
        for channel in range(self.scores.shape[0]):
            blended[channel] = (self.scores[channel][inside].float() / inside_weights).cpu()
        del self.scores
        return blended

    def attention_inside(self, grid: _PaddedGrid) -> Tuple[List[torch.Tensor], List[Tuple[int, ...]]]:
        """Each gate's blended map over the coarse blocks that touch the volume, and where each map starts in the
        volume's fine voxels (negative: the block begins in the padding)."""
        maps: List[torch.Tensor] = []
        map_starts: List[Tuple[int, ...]] = []
        for k, gate_sum in enumerate(self.gate_sums):
            f = 2**k
            # Each window adds its pooled importance, so a coarse voxel's total weight is the mean fine weight.
            coarse_weights = F.avg_pool3d(self.weights[None, None], f)[0, 0]
            low = [b // f for b in grid.before]
            high = [-(-(b + s) // f) for b, s in zip(grid.before, grid.spatial)]
            region = tuple(slice(lo, hi) for lo, hi in zip(low, high))
            maps.append((gate_sum[region] / coarse_weights[region]).clamp_(0.0, 1.0).cpu())
            map_starts.append(tuple(lo * f - b for lo, b in zip(low, grid.before)))
        return maps, map_starts


def label_dtype(values: Sequence[int]) -> np.dtype:
    """Smallest label-map type for ``values``: uint8, or int16 above 255 (bundles cap values at
    ``bundle.MAX_LABEL_VALUE`` = 32767, the largest a Slicer label map holds)."""
    return np.dtype(np.uint8) if max(values) <= 255 else np.dtype(np.int16)


def _gate_image(array: np.ndarray, start_zyx: Sequence[int], level: int, grid: sitk.Image) -> sitk.Image:
    """Wrap gate ``level``'s coarse ``(z, y, x)`` map with geometry that overlays ``grid`` (see module docstring)."""
    factor = 2**level
    spacing = np.array(grid.GetSpacing())
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    offset = np.array(start_zyx[::-1], dtype=float) + (factor - 1) / 2
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing * factor])
    image.SetOrigin([float(o) for o in np.array(grid.GetOrigin()) + direction @ (spacing * offset)])
    image.SetDirection(grid.GetDirection())
    return image


def _tta_mirror_axes(bundle) -> Tuple[str, ...]:
    """The axes TTA may mirror along for ``bundle``; ``AttentionUNetError`` when it cannot mirror safely."""
    axes = bundle.mirror_axes
    if axes is None:
        raise AttentionUNetError(
            f"model {bundle.name!r} ({bundle.path}) does not record which axes its training mirrored along "
            "(inference.mirror_axes in model.json), so --tta cannot tell which flips keep the labels' meaning; run "
            "without --tta, or add the plan's flip_axes as inference.mirror_axes (e.g. [\"x\"]) and re-save the "
            "bundle with save_bundle")
    if not axes:
        raise AttentionUNetError(f"model {bundle.name!r} was trained without mirroring (inference.mirror_axes is "
                                 "empty), so --tta has no safe flip to average; run without --tta")
    return axes


class Predictor:
    """Segments images with one model bundle; the model is built once and reused for every image.

    Args:
        bundle: a ``bundle.ModelBundle`` (``build_models``, ``preprocessing``, ``patch_size`` (x, y, z),
            ``labels``, ``overlap``); a fold ensemble runs every fold on every window and averages them.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        overlap: sliding-window overlap in [0, 1) (default: the bundle's).
        tta: mirror test-time augmentation along the bundle's ``mirror_axes`` only (the axes its training mirrored
            along; a flip along any other axis would swap sided labels, e.g. anterior and posterior):
            ``2**len(axes)`` copies per window. Refused for a bundle that does not record them or has none.
        batch_size: windows per forward pass (default 4 on CUDA, 1 on the CPU). On CUDA out-of-memory the batch is
            halved and retried, then the run falls back to the CPU in float32 (both reported, and passed to ``log``).
        precision: arithmetic of the forward passes, one of ``constants.PRECISIONS`` (default ``auto``).
        log: receives a line for people about those retries (the CLI's progress reporter's ``log``, which prints
            it above a bar); default: this module's ``logging`` logger.
    """

    def __init__(
        self,
        bundle,
        device: Union[str, torch.device] = "auto",
        overlap: Optional[float] = None,
        tta: bool = False,
        batch_size: Optional[int] = None,
        precision: str = "auto",
        log: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.bundle = bundle
        self.log = log or LOGGER.warning
        self.device = resolve_device(device)
        autocast_dtype(precision, self.device)  # refuse a bad precision now, not after preprocessing
        self.precision = precision
        self.overlap = float(bundle.overlap if overlap is None else overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise AttentionUNetError(f"overlap {self.overlap} must be at least 0 and below 1 (e.g. 0.5)")
        if batch_size is not None and int(batch_size) < 1:
            raise AttentionUNetError(f"batch size {batch_size} must be a positive number of windows")
        self.tta = bool(tta)
        self.mirror_axes = _tta_mirror_axes(bundle) if self.tta else ()
        self.batch_size = int(batch_size) if batch_size else DEFAULT_BATCH_SIZE[self.device.type]
        self.spec = bundle.preprocessing
        self.patch_size_zyx = tuple(int(p) for p in bundle.patch_size[::-1])
        self.label_values = [0] + [int(label.value) for label in bundle.labels]
        self.model = self._build_model()

    def _build_model(self) -> Network:
        """The bundle's network on ``self.device`` (a ``FoldEnsemble`` of a fold ensemble's); for float32 on the CPU
        tuned copies (channels-last, fused norm, oneDNN convolutions: ~1.4-6x faster per window), whose
        convolutions autocast would not reach."""
        models = [model.eval() for model in self.bundle.build_models(self.device)]
        if autocast_dtype(self.precision, self.device) is None:
            models = [optimize_for_inference(model, self.device) for model in models]
        return models[0] if len(models) == 1 else FoldEnsemble(models)

    def predict(
        self,
        image: sitk.Image,
        roi: Optional[Sequence[float]] = None,
        attention: bool = True,
        probabilities: bool = False,
        largest_component: bool = False,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCallback] = None,
    ) -> Prediction:
        """Segment ``image`` (any 3D scalar ``sitk.Image``).

        Args:
            roi: optional box ``(r_min, r_max, a_min, a_max, s_min, s_max)`` in RAS millimetres; labels outside it
                are 0 and attention maps cover the ROI plus ``ROI_MARGIN_VOXELS`` of context. An ROI at most
                ``ONE_VIEW_ROI_FACTOR`` times the model's field of view on every axis is segmented in one window
                of that field of view centred on it (``_predict_roi_view``); a larger one (plus the margin) is
                tiled with sliding windows.
            attention: return every gate's attention map.
            probabilities: return per-class probability images on the input grid.
            largest_component: keep only the largest connected component of every label.
            progress: ``progress(stage, fraction, message)`` with ``fraction`` the share of this prediction done
                (0..1); stages are ``preprocess``, ``inference`` (after every window batch), ``resample`` and
                ``postprocess``.
            cancel: polled between stages and window batches; returning True raises ``CancelledError``.
        """
        report = progress or (lambda stage, fraction, message: None)
        timings: Dict[str, float] = {}
        started = clock = time.perf_counter()

        def stage(name: str, message: str) -> None:
            nonlocal clock
            if cancel is not None and cancel():
                raise CancelledError("segmentation cancelled; nothing was written")
            report(name, _STAGE_START[name], message)
            clock = time.perf_counter()

        def done(name: str) -> None:
            timings[name] = time.perf_counter() - clock

        if roi is not None and self._fits_one_view(roi):
            return self._predict_roi_view(image, roi, attention, probabilities, largest_component, report, cancel)
        stage("preprocess", "Preprocessing the image")
        image = validate_image(image)
        region, roi_start, roi_stop = (image, None, None) if roi is None else crop_to_roi(image, roi, ROI_MARGIN_VOXELS)
        prepared = preprocess(region, self.spec)
        done("preprocess")

        stage("inference", f"Sliding-window inference on {self.device}")
        result = self._run_windows(prepared, attention, report, cancel)
        done("inference")

        stage("resample", "Mapping results back to the input grid")
        labels, probability_images = self._to_grid(result.scores, prepared, region, probabilities)
        gate_images = [
            sitk.DICOMOrient(_gate_image(m.numpy(), start, k, prepared.grid), orientation_of(region))
            for k, (m, start) in enumerate(zip(result.attention, result.attention_start))
        ]
        done("resample")

        stage("postprocess", "Post-processing")
        if roi is not None:
            labels = _paste(labels, image, region, roi_start, roi_stop, 0)
            probability_images = {
                value: _paste(p, image, region, roi_start, roi_stop, 1.0 if value == 0 else 0.0)
                for value, p in probability_images.items()
            }
        if largest_component:
            labels = keep_largest_component(labels, self.label_values[1:])
        done("postprocess")
        timings["total"] = time.perf_counter() - started
        report("postprocess", 1.0, "Segmentation finished")
        return Prediction(
            labels=labels,
            attention=gate_images,
            probabilities=probability_images,
            timings=timings,
            device=str(self.device),
        )

    def predict_localized(
        self,
        image: sitk.Image,
        spec: "LocalizerSpec",
        registration: "Registration",
        attention: bool = True,
        probabilities: bool = False,
        largest_component: bool = False,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCallback] = None,
    ) -> Prediction:
        """Segment each side's template-space box of ``spec`` located by ``registration`` (template -> input).

        Per side, the input is resampled through the registration onto the model's field of view centred on the
        box in template space (``_model_view``: the model's spacing, upright like the training crops), segmented
        with ``predict`` (one window), and its class probabilities are mapped back linearly onto the input grid
        around the box, where the argmax gives that side's labels (``spec.labels``: value per side and model
        label). Attention maps: gate ``k`` of both sides on the input grid pooled by ``2**k`` (maximum where
        they meet; 0 outside the boxes). Probabilities (when asked): per side label on the input grid.
        ``largest_component``: per side, the connected component of all its labels together that
        ``keep_central_component`` picks (large and near the box's centre), not each label's largest.
        """
        from ..preprocessing.localization import box_corners_lps, map_box

        report = progress or (lambda stage, fraction, message: None)
        started = time.perf_counter()
        image = validate_image(image)
        source = sitk.Cast(image, sitk.sitkFloat32)
        lookup_size = max(self.label_values) + 1
        canvas = np.zeros(image.GetSize()[::-1], dtype=label_dtype([int(item["value"]) for item in spec.labels]))
        kept: Dict[int, np.ndarray] = {}
        gates: List[np.ndarray] = []
        timings: Dict[str, float] = {}
        for number, (side, box) in enumerate(spec.boxes.items()):
            side_report = scaled(report, number / len(spec.boxes), (number + 1) / len(spec.boxes))
            target = crop_to_roi(image, map_box(registration.transform, box), 1)[0]
            view = self._segment_view(source, self._model_view(box), registration.transform, target, image,
                                      attention, probabilities, side_report, cancel)
            for stage, seconds in view.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
            side_values = np.zeros(lookup_size, dtype=canvas.dtype)
            for item in spec.labels:
                if item["side"] == side:
                    side_values[int(item["source"])] = int(item["value"])
            window = _window(image, target)
            winner = side_values[view.winner]
            canvas[window][winner > 0] = winner[winner > 0]
            for model_value, mapped in view.probabilities.items():
                if side_values[model_value]:
                    kept.setdefault(int(side_values[model_value]), np.zeros(canvas.shape, np.float32))[window] = mapped
            gates = view.gates if not gates else [np.maximum(a, b) for a, b in zip(gates, view.gates)]
        labels = _image_on(canvas, image)
        if largest_component:
            # Per side the structure as a whole (all its segments): the component nearest the box's centre.
            for side, box in spec.boxes.items():
                centre = registration.transform.TransformPoint(tuple(box_corners_lps(box).mean(axis=0)))
                labels = keep_central_component(labels, [int(item["value"]) for item in spec.labels
                                                         if item["side"] == side], centre)
        probability_images = {value: _image_on(array, image) for value, array in kept.items()}
        gate_images = [_image_on(array, _pooled_grid(image, level)) for level, array in enumerate(gates)]
        timings["total"] = time.perf_counter() - started
        report("postprocess", 1.0, "Segmentation finished")
        return Prediction(labels=labels, attention=gate_images, probabilities=probability_images, timings=timings,
                          device=str(self.device))

    def _model_view(self, box: Sequence[float]) -> List[float]:
        """The model's field of view (its patch at its spacing, RAS mm) centred on ``box``: what one window sees.

        A localisation box is the training crops' field of view plus a margin, so one window centred on it shows
        the model what it was trained on (the structure in the middle). Windows placed to tile a larger region
        put it off-centre and add context the crops never had: on the shared whole heads that halved the Dice
        (e.g. 0.36 instead of 0.68-0.76 on a 2 mm head) at 18 windows per side instead of 1."""
        view = []
        for axis, (spacing, patch) in enumerate(zip(self.spec.target_spacing, self.patch_size_zyx[::-1])):
            centre, half = (box[2 * axis] + box[2 * axis + 1]) / 2.0, patch * spacing / 2.0
            view += [centre - half, centre + half]
        return view

    def _fits_one_view(self, roi: Sequence[float]) -> bool:
        """True when ``roi`` (RAS mm) is at most ``ONE_VIEW_ROI_FACTOR`` times the model's field of view on every
        axis."""
        view = self._model_view(roi)
        return all(roi[2 * axis + 1] - roi[2 * axis] <= ONE_VIEW_ROI_FACTOR * (view[2 * axis + 1] - view[2 * axis])
                   for axis in range(3))

    def _predict_roi_view(self, image: sitk.Image, roi: Sequence[float], attention: bool, probabilities: bool,
                          largest_component: bool, report: ProgressCallback,
                          cancel: Optional[CancelCallback]) -> Prediction:
        """``predict`` of an ROI about the model's size: one window of its field of view centred on the ROI
        (upright, at its spacing), mapped back onto the input grid inside the ROI. A model trained on crops centred
        on its structure sees it as in training; tiling the same ROI puts it off-centre in every window (on the
        shared whole heads: median Dice 0.34 tiled vs 0.76 in one view with the 1.0 hippocampus model)."""
        started = time.perf_counter()
        image = validate_image(image)
        target = crop_to_roi(image, roi, 0)[0]
        region = crop_to_roi(image, roi, ROI_MARGIN_VOXELS)[0]
        view = self._segment_view(sitk.Cast(image, sitk.sitkFloat32), self._model_view(roi), sitk.Transform(3,
                                  sitk.sitkIdentity), target, region, attention, probabilities, report, cancel)
        window = _window(image, target)
        canvas = np.zeros(image.GetSize()[::-1], dtype=view.winner.dtype)
        canvas[window] = view.winner
        labels = _image_on(canvas, image)
        if largest_component:
            labels = keep_largest_component(labels, self.label_values[1:])
        probability_images = {}
        for value, mapped in view.probabilities.items():
            full = np.full(canvas.shape, 1.0 if value == 0 else 0.0, np.float32)
            full[window] = mapped
            probability_images[value] = _image_on(full, image)
        gate_images = [_image_on(array, _pooled_grid(region, level)) for level, array in enumerate(view.gates)]
        timings = dict(view.timings, total=time.perf_counter() - started)
        report("postprocess", 1.0, "Segmentation finished")
        return Prediction(labels=labels, attention=gate_images, probabilities=probability_images, timings=timings,
                          device=str(self.device))

    def _segment_view(self, source: sitk.Image, view_ras: Sequence[float], transform: sitk.Transform,
                      target: sitk.Image, gate_reference: sitk.Image, attention: bool, probabilities: bool,
                      progress: ProgressCallback, cancel: Optional[CancelCallback]) -> "_ViewResult":
        """Segment one view in one window and map it back.

        ``source`` (float32, the input) is resampled linearly onto the upright grid covering ``view_ras`` (RAS mm
        in the space ``transform`` maps to ``source``'s world: template space, or the input's own with the
        identity), segmented with ``predict``, and its class probabilities are mapped back linearly onto
        ``target`` (a box of the input grid), where the argmax gives the model's label values; gate ``k``'s map
        goes onto ``gate_reference``'s grid pooled by ``2**k`` (0 outside the view)."""
        from ..preprocessing.localization import box_grid

        clock = time.perf_counter()
        grid = box_grid(view_ras, self.spec.target_spacing)
        region = sitk.Resample(source, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        timings = {"view_resample": time.perf_counter() - clock}
        result = self.predict(region, attention=attention, probabilities=True, progress=progress, cancel=cancel)
        timings.update((stage, seconds) for stage, seconds in result.timings.items() if stage != "total")
        clock = time.perf_counter()
        inverse = transform.GetInverse()
        argmax = _RunningArgmax(target.GetSize()[::-1], label_dtype(self.label_values))
        kept: Dict[int, np.ndarray] = {}
        for value in self.label_values:
            mapped = sitk.GetArrayFromImage(sitk.Resample(result.probabilities[value], target, inverse,
                                                          sitk.sitkLinear, 1.0 if value == 0 else 0.0,
                                                          sitk.sitkFloat32))
            if probabilities:
                kept[value] = mapped
            argmax.add(mapped, value)
        gates = [sitk.GetArrayFromImage(sitk.Resample(gate, _pooled_grid(gate_reference, level), inverse,
                                                      sitk.sitkLinear, 0.0, sitk.sitkFloat32))
                 for level, gate in enumerate(result.attention)]
        timings["view_paste"] = time.perf_counter() - clock
        return _ViewResult(argmax.winner, kept, gates, timings)

    def _run_windows(
        self, prepared: PreparedImage, attention: bool, report: ProgressCallback, cancel: Optional[CancelCallback]
    ) -> SlidingWindowResult:
        """Sliding-window inference with the CUDA out-of-memory fallback: halve the batch, then use the CPU."""
        volume = torch.from_numpy(prepared.array)[None]
        start, span = _STAGE_START["inference"], _STAGE_START["resample"] - _STAGE_START["inference"]

        def windows_done(done: int, total: int) -> None:
            report("inference", start + span * done / total, f"Window {done}/{total} on {self.device}")

        while True:
            try:
                return sliding_window_inference(
                    volume, self.model, self.patch_size_zyx, self.overlap, self.batch_size,
                    mirror_axes=self.mirror_axes, attention=attention, device=self.device, precision=self.precision,
                    progress=windows_done, cancel=cancel,
                )
            except torch.cuda.OutOfMemoryError:
                if self.device.type != "cuda":
                    raise
            # Outside the except block, so the failed attempt's tensors are released before retrying.
            torch.cuda.empty_cache()
            if self.batch_size > 1:
                self.batch_size //= 2
                message = f"CUDA out of memory; retrying with {self.batch_size} window(s) per batch"
            else:
                self.device, self.precision = torch.device("cpu"), "fp32"
                self.model = self._build_model()
                message = "CUDA out of memory even with one window per batch; falling back to the CPU (slower)"
            self.log(message)
            report("inference", start, message)

    def _to_grid(
        self, scores: torch.Tensor, prepared: PreparedImage, reference: sitk.Image, probabilities: bool
    ) -> Tuple[sitk.Image, Dict[int, sitk.Image]]:
        """Resample every class probability linearly onto ``reference``, take the argmax (running, one class at a
        time) and map channels to label values."""
        argmax = _RunningArgmax(reference.GetSize()[::-1], np.uint16)
        kept: Dict[int, sitk.Image] = {}
        for channel, value in enumerate(self.label_values):
            outside = 1.0 if channel == 0 else 0.0
            resampled = resample_to_reference(
                prepared.image_from_array(scores[channel].numpy()), reference, is_label=False, default=outside
            )
            argmax.add(sitk.GetArrayViewFromImage(resampled), channel)
            if probabilities:
                kept[value] = resampled
        lookup = np.array(self.label_values, dtype=label_dtype(self.label_values))
        return _image_on(lookup[argmax.winner], reference), kept


class _RunningArgmax:
    """The argmax over class probability arrays given one at a time (never every class in memory at once):
    ``winner`` holds the value given with the largest array so far, the first one's where none is larger."""

    def __init__(self, shape: Sequence[int], dtype) -> None:
        self.best: Optional[np.ndarray] = None
        self.winner = np.zeros(tuple(shape), dtype=dtype)

    def add(self, array: np.ndarray, value: int) -> None:
        if self.best is None:
            self.best = np.array(array, copy=True)
            self.winner[...] = value
            return
        better = array > self.best
        self.best[better] = array[better]
        self.winner[better] = value


@dataclass
class _ViewResult:
    """One view mapped onto its target box of the input grid (arrays ``(z, y, x)`` of the target): the argmax as
    the model's label values, the probabilities per label value (when asked), every gate's map on its pooled
    grid, seconds per stage."""

    winner: np.ndarray
    probabilities: Dict[int, np.ndarray]
    gates: List[np.ndarray]
    timings: Dict[str, float]


def _window(image: sitk.Image, part: sitk.Image) -> Tuple[slice, ...]:
    """The ``(z, y, x)`` slices of ``image``'s array that ``part`` (a region of the same grid) covers."""
    offset = image.TransformPhysicalPointToIndex(part.GetOrigin())
    return tuple(slice(o, o + n) for o, n in zip(offset[::-1], part.GetSize()[::-1]))


def _image_on(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """``array`` (``(z, y, x)``) as an image on ``grid``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _pooled_grid(image: sitk.Image, level: int) -> sitk.Image:
    """``image``'s grid pooled by ``2**level``: the geometry ``_gate_image`` gives gate ``level`` of a window at
    index 0."""
    size_zyx = [int(math.ceil(n / 2**level)) for n in image.GetSize()[::-1]]
    return _gate_image(np.zeros(size_zyx, np.uint8), (0, 0, 0), level, image)


def _paste(
    region_image: sitk.Image,
    full: sitk.Image,
    region: sitk.Image,
    roi_start: Sequence[int],
    roi_stop: Sequence[int],
    fill: float,
) -> sitk.Image:
    """Put the ROI part (``roi_start``..``roi_stop``, x-y-z index in ``region``) of ``region_image`` into an image
    on ``full``'s grid filled with ``fill`` elsewhere. ``region`` is a crop of ``full`` (same voxel grid)."""
    source = sitk.GetArrayViewFromImage(region_image)
    canvas = np.full(full.GetSize()[::-1], fill, dtype=source.dtype)
    inner = tuple(slice(a, b) for a, b in zip(roi_start[::-1], roi_stop[::-1]))
    canvas[_window(full, region)][inner] = source[inner]
    return _image_on(canvas, full)
