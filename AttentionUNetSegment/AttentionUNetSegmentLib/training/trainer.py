"""``attention-unet train``: train an Attention U-Net on a labelled dataset and export a model bundle.

Flow (each step a small function): load and validate the dataset (every bad case is refused before any training
time is spent) -> plan (target spacing, patch size, normalisation, flips; user overrides win) -> fill the
preprocessed-case cache -> seeded train/validation split -> train with foreground-oversampled, augmented patches
(Dice + CE, deep supervision, optional attention supervision; AMP and gradient checkpointing as options) ->
validate (Dice per label) after every epoch -> keep ``best.pt``/``last.pt`` checkpoints, a CSV/JSON log and a PNG
plot in the work directory -> export the best (or, ``--checkpoint final``, the final) weights as a bundle.

Runs under ``torchrun`` as DistributedDataParallel: each process trains on its own shard of the training cases
(gloo on CPU, nccl on CUDA); validation is sharded too and its sums are all-reduced, so every process takes the
same decisions. Only rank 0 writes files.

Checkpoints hold every piece of state (weights, optimiser, scaler, sampler and torch RNG, history), so
``--resume`` continues exactly where the run stopped: the same batches, the same weights as an uninterrupted run.
They are ``torch.save`` files of plain tensors/numbers, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import numbers
import os
import platform
import stat
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..constants import AMP_MODES
from ..devices import AMP_PRECISION, autocast, autocast_dtype, resolve_device
from ..errors import AttentionUNetError, DatasetError, ModelBundleError, OutputExistsError
from ..fileio.atomic import atomic_output
from ..fileio.jsonfile import read_json
from ..inference.predictor import DEFAULT_BATCH_SIZE, sliding_window_inference
from ..model.bundle import (MAX_CHANNELS, MAX_DEPTH, MAX_PATCH_VOXELS_PER_AXIS, check_replaceable, complete_metadata,
                            create_metadata, device_memory, estimate_memory, save_bundle)
from ..model.network import AttentionUNet, NetworkOutput
from ..preprocessing.domain import measure_domain
from ..preprocessing.preprocess import MAX_SPACING_MM, MIN_SPACING_MM, PreprocessingSpec
from ..progress import make_progress
from .augmentation import AugmentationConfig, PatchSampler
from .datasets import CaseCache, CaseRecord, PreprocessedCase, inspect_dataset, load_datasets, plan_split
from .losses import SegmentationLoss, dice_per_label
from .planning import TrainingPlan, plan_training

#: Default colours for labels 1, 2, ... (RGB 0..1), distinct on grey MRI/CT.
LABEL_COLORS = [(0.9, 0.6, 0.2), (0.2, 0.6, 0.9), (0.3, 0.8, 0.3), (0.9, 0.3, 0.4), (0.7, 0.4, 0.9),
                (0.9, 0.9, 0.3), (0.3, 0.9, 0.9), (0.6, 0.6, 0.6)]
#: ``--augmentation`` sets: nnU-Net-like defaults, + simulated low resolution (``AugmentationConfig.robust``), or
#: every robustness augmentation (``AugmentationConfig.strong``).
AUGMENTATION_SETS = {"default": AugmentationConfig, "robust": AugmentationConfig.robust,
                     "strong": AugmentationConfig.strong}
#: ``--checkpoint``: which epoch's weights the bundle gets.
CHECKPOINTS = ("best", "final")


@dataclass
class TrainingConfig:
    """Every option of a training run (what ``attention-unet train`` parses); plan overrides are ``None`` unless
    the user set them."""

    dataset: str
    output: str
    work_dir: str
    #: more listings trained on together with ``dataset`` (training cases only; coarse labels allowed)
    extra_datasets: Tuple[str, ...] = ()
    name: str = "model"
    version: str = "1.0.0"
    description: str = ""
    license: str = ""
    citation: str = ""
    training_data: str = ""
    label_names: Optional[Dict[int, str]] = None
    epochs: int = 100
    iterations_per_epoch: int = 250
    learning_rate: float = 3e-3
    weight_decay: float = 3e-5
    validation: Union[int, float] = 0.2
    seed: int = 0
    #: Test cases no run (no fold) trains or validates on: a count or a fraction; 0 = none.
    held_out: Union[int, float] = 0
    #: k-fold cross-validation: train fold ``fold`` (0 .. folds-1) of ``folds``; ``validation`` is then unused.
    folds: Optional[int] = None
    fold: Optional[int] = None
    amp: str = "none"
    gradient_checkpointing: bool = False
    deep_supervision: bool = True
    attention_loss_weight: float = 0.0
    foreground_fraction: float = 0.33
    elastic: bool = False
    augmentation: str = "default"
    #: The weights the bundle gets: ``"best"`` validation epoch, or the ``"final"`` epoch (nnU-Net's default; for
    #: validation sets too small to choose an epoch by).
    checkpoint: str = "best"
    max_time: Optional[float] = None
    resume: bool = False
    force: bool = False
    device: str = "auto"
    threads: Optional[int] = None
    progress: str = "bar"
    channels: Optional[Tuple[int, ...]] = None
    patch_size: Optional[Tuple[int, int, int]] = None
    target_spacing: Optional[Tuple[float, float, float]] = None
    batch_size: Optional[int] = None
    flip_axes: Optional[Tuple[str, ...]] = None
    normalization: Optional[str] = None

    def plan_overrides(self) -> Dict[str, Any]:
        overrides: Dict[str, Any] = {"channels": self.channels, "patch_size": self.patch_size,
                                     "target_spacing": self.target_spacing, "batch_size": self.batch_size,
                                     "flip_axes": self.flip_axes, "normalization": self.normalization}
        return overrides


@dataclass
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class _AuxForward(nn.Module):
    """Makes ``forward_with_aux`` the module's ``forward`` so DistributedDataParallel sees the whole graph."""

    def __init__(self, model: AttentionUNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        output = self.model.forward_with_aux(x)
        return output.logits, output.attention, output.deep_supervision


def poly_learning_rate(base: float, step: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay from ``base`` at step 0 to 0 at ``total``."""
    return base * (1.0 - min(step, total) / max(total, 1)) ** exponent


def to_channel_labels(cases: Sequence[PreprocessedCase], labels: Sequence[int],
                      records: Optional[Sequence[CaseRecord]] = None) -> List[PreprocessedCase]:
    """``cases`` with label values replaced by network channels, ``labels[i] -> i + 1`` (0 stays 0), so label values
    with gaps (say {1, 3}) train a ``len(labels) + 1``-channel network. ``labels`` are sorted and hold every value
    the cases contain (``load_dataset`` checked that). A case whose ``records`` entry has ``classes`` is mapped
    through them; when some value it holds stands for several channels it gets a ``space`` (``case_space``)
    and its labels index that space's classes."""
    records = records or [None] * len(cases)  # type: ignore[list-item]
    if list(labels) == list(range(1, len(labels) + 1)) and not any(r is not None and r.classes for r in records):
        return list(cases)
    channel_of = {value: channel for channel, value in enumerate(labels, start=1)}
    mapped = []
    for case, record in zip(cases, records):
        classes = dict(record.classes) if record is not None and record.classes else {v: (v,) for v in labels}
        present = sorted(case.foreground)
        space = case_space(len(labels) + 1, [tuple(channel_of[m] for m in classes[v]) for v in present])
        lookup = np.zeros(max(classes) + 1, dtype=np.uint8 if len(labels) < 256 else np.int16)
        for value, members in classes.items():
            channels = tuple(channel_of[m] for m in members)
            lookup[value] = space.index(channels) if space is not None and channels in space else channels[0]
        mapped.append(PreprocessedCase(case.name, case.image, lookup[case.label],
                                       {int(lookup[value]): indices for value, indices in case.foreground.items()},
                                       space))
    return mapped


def case_space(channels: int, present: Sequence[Tuple[int, ...]]) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """The label space of a case whose label map holds classes ``present`` (each a tuple of network channels):
    background, each present class, then every channel no present class covers on its own (absent there, as in a
    fully labelled case). ``None`` when every present class is a single channel (the network's own classes)."""
    if all(len(members) == 1 for members in present):
        return None
    covered = {channel for members in present for channel in members}
    return ((0,), *sorted(present), *((c,) for c in range(1, channels) if c not in covered))


@torch.no_grad()
def validate(model: AttentionUNet, cases: Sequence[PreprocessedCase], patch_size_zyx: Sequence[int],
             device: torch.device, amp: str) -> Dict[Tuple[int, ...], Tuple[float, int]]:
    """Segment each validation case on its preprocessed grid as the engine does (Gaussian-weighted sliding
    windows, overlap 0.5: any case size fits in memory) and score it on the classes it has. Labels are channels
    or a case's ``space`` (``to_channel_labels``); returns, per class (its tuple of channels: ``(c,)`` for channel
    ``c``, several for a merged class of a coarse case), the sum of per-case Dice scores and the number of cases
    where the class occurs in the reference or the prediction."""
    model.eval()
    sums: Dict[Tuple[int, ...], List[float]] = {(channel,): [0.0, 0] for channel in range(1, model.out_channels)}
    for case in cases:
        result = sliding_window_inference(
            torch.from_numpy(case.image)[None], model, patch_size_zyx, overlap=0.5,
            batch_size=DEFAULT_BATCH_SIZE[device.type], attention=False, device=device,
            precision=AMP_PRECISION[amp])
        prediction = result.scores.argmax(0)
        space = case.space or tuple((channel,) for channel in range(model.out_channels))
        to_class = torch.zeros(model.out_channels, dtype=torch.int64)
        for index, members in enumerate(space):
            to_class[list(members)] = index
        scores = dice_per_label(to_class[prediction], torch.from_numpy(case.label.astype(np.int64)),
                                range(1, len(space)))
        for index, score in scores.items():
            if score is not None:
                total = sums.setdefault(space[index], [0.0, 0])
                total[0] += score
                total[1] += 1
    model.train()
    return {members: (total, count) for members, (total, count) in sums.items()}


class TrainingLog:
    """Per-epoch rows written as ``training_log.csv`` + ``training_log.json`` and plotted to
    ``training_curves.png`` in the work directory (rank 0 only)."""

    def __init__(self, directory: Path, rows: Optional[List[Dict[str, Any]]] = None) -> None:
        self.directory = directory
        self.rows: List[Dict[str, Any]] = list(rows or [])

    def append(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        columns = list(self.rows[0])
        for row in self.rows:
            columns += [key for key in row if key not in columns]
        with contextlib.ExitStack() as stack:  # the CSV and the JSON log are replaced together or not at all
            with open(stack.enter_context(atomic_output(self.directory / "training_log.csv", force=True)), "w",
                      newline="", encoding="utf-8") as stream:
                writer = csv.DictWriter(stream, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)
            stack.enter_context(atomic_output(self.directory / "training_log.json", force=True)).write_text(
                json.dumps(self.rows, indent=2) + "\n", encoding="utf-8")
        self._plot()

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot is a convenience; the CSV/JSON log is the record
            return
        epochs = [row["epoch"] for row in self.rows]
        figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 4))
        loss_axis.plot(epochs, [row["train_loss"] for row in self.rows], label="training loss")
        loss_axis.set_xlabel("epoch")
        loss_axis.set_ylabel("loss")
        loss_axis.legend()
        for key in self.rows[-1]:
            if key.startswith("val_dice"):
                dice_axis.plot(epochs, [row.get(key) for row in self.rows], label=key[len("val_dice_"):] or key)
        dice_axis.set_xlabel("epoch")
        dice_axis.set_ylabel("validation Dice")
        dice_axis.set_ylim(0, 1)
        dice_axis.legend()
        figure.tight_layout()
        try:
            with atomic_output(self.directory / "training_curves.png", force=True) as partial:
                figure.savefig(partial, dpi=80, format="png")
        finally:
            plt.close(figure)


def _write_json(path: Path, data: Any) -> None:
    with atomic_output(path, force=True) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    with atomic_output(path, force=True) as partial:
        torch.save(state, partial)


def _load_checkpoint(path: Path, max_bytes: int) -> Dict[str, Any]:
    """A checkpoint this tool wrote: a regular file of at most ``max_bytes``, plain tensors and numbers only
    (``weights_only``: a pickle of anything else is refused without running it). Anything else is one user error."""
    advice = (f"the checkpoint is damaged or not one this tool wrote; restore it, or start the run over with "
              f"--force (the work folder {path.parent.parent} is left as it is)")
    try:
        info = os.stat(path)
    except OSError as error:
        raise AttentionUNetError(f"checkpoint {path} cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        raise AttentionUNetError(f"checkpoint {path} is not a regular file of at most {max_bytes / 2**20:.0f} MiB "
                                 f"(what this model's checkpoints can hold); {advice}")
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn; the error line below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports a damaged or foreign file with many exception types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AttentionUNetError(f"checkpoint {path} cannot be loaded ({reason[:200]}); {advice}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise AttentionUNetError(f"checkpoint {path} does not hold a training state; {advice}")
    return state


def _checkpoint_limit(model: nn.Module) -> int:
    """Most bytes a checkpoint of ``model`` can take: weights, two AdamW moments, the log and RNG state."""
    return 4 * 4 * sum(p.numel() for p in model.parameters()) + (64 << 20)


def read_plan(work_dir: Path) -> Dict[str, Any]:
    """The work folder's ``plan.json`` (plan, split, config), checked; anything else is one user error."""
    path = work_dir / "plan.json"
    saved = read_json(path, "training plan")
    try:
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
        TrainingPlan.from_dict(saved["plan"])
        for key in ("training_cases", "validation_cases"):
            if not isinstance(saved[key], list) or not all(isinstance(name, str) for name in saved[key]):
                raise TypeError(f"{key} is not a list of case names")
        if not isinstance(saved["config"], dict) or not isinstance(saved["config"].get("output"), str):
            raise TypeError("config.output is not a path")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AttentionUNetError(f"training plan {path} is damaged ({type(error).__name__}: {error}); restore it, "
                                 "or start the run over without --resume (pass --force to replace it)") from None
    return saved


def hardware_description(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return f"{world_size} process(es) on CPU ({platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads each)"


#: Config fields that must be positive when set, with the ``attention-unet train`` option that sets them.
_POSITIVE_OPTIONS = {"epochs": "--epochs", "iterations_per_epoch": "--iterations-per-epoch",
                     "learning_rate": "--learning-rate", "batch_size": "--batch-size", "threads": "--threads",
                     "max_time": "--max-time", "validation": "--validation", "channels": "--channels",
                     "patch_size": "--patch-size", "target_spacing": "--spacing"}


def check_config(config: TrainingConfig) -> None:
    """Refuse numbers no training can use, naming the option, before anything is read or written."""
    for field_name, option in _POSITIVE_OPTIONS.items():
        value = getattr(config, field_name)
        values = value if isinstance(value, (tuple, list)) else [value]
        if value is not None and not all(isinstance(v, numbers.Real) and math.isfinite(v) and v > 0
                                         for v in values):
            raise AttentionUNetError(f"{option} must be positive, got {value}")
    if config.channels is not None and (not 2 <= len(config.channels) <= MAX_DEPTH
                                        or max(config.channels) > MAX_CHANNELS):
        raise AttentionUNetError(f"--channels {' '.join(map(str, config.channels))}: give 2..{MAX_DEPTH} levels of "
                                 f"at most {MAX_CHANNELS} channels each")
    if config.patch_size is not None and max(config.patch_size) > MAX_PATCH_VOXELS_PER_AXIS:
        raise AttentionUNetError(f"--patch-size {' '.join(map(str, config.patch_size))}: at most "
                                 f"{MAX_PATCH_VOXELS_PER_AXIS} voxels per axis")
    if config.target_spacing is not None and not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM
                                                     for s in config.target_spacing):
        raise AttentionUNetError(f"--spacing {' '.join(f'{s:g}' for s in config.target_spacing)}: give "
                                 f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm per axis")
    if isinstance(config.validation, float) and config.validation >= 1:
        raise AttentionUNetError(f"--validation {config.validation}: give a fraction below 1 or a whole number of "
                                 "cases")
    if not (isinstance(config.held_out, numbers.Real) and config.held_out >= 0
            and (not isinstance(config.held_out, float) or config.held_out < 1 or config.held_out.is_integer())):
        raise AttentionUNetError(f"--held-out {config.held_out}: give 0, a fraction below 1 or a whole number of "
                                 "cases")
    if (config.folds is None) != (config.fold is None):
        raise AttentionUNetError("--fold and --folds go together: e.g. --fold 0 --folds 5 trains the first of five "
                                 "folds")
    if config.folds is not None:
        if isinstance(config.folds, bool) or not isinstance(config.folds, int) or config.folds < 2:
            raise AttentionUNetError(f"--folds {config.folds}: give a whole number of folds, at least 2")
        if isinstance(config.fold, bool) or not isinstance(config.fold, int) or not 0 <= config.fold < config.folds:
            raise AttentionUNetError(f"--fold {config.fold}: give a fold in 0..{config.folds - 1} (--folds "
                                     f"{config.folds})")
    for field_name, option in (("weight_decay", "--weight-decay"),
                               ("attention_loss_weight", "--attention-loss-weight")):
        if not getattr(config, field_name) >= 0:
            raise AttentionUNetError(f"{option} must be zero or positive, got {getattr(config, field_name)}")
    if config.augmentation not in AUGMENTATION_SETS:
        raise AttentionUNetError(f"--augmentation must be one of {', '.join(AUGMENTATION_SETS)}, got "
                                 f"{config.augmentation!r}")
    if config.checkpoint not in CHECKPOINTS:
        raise AttentionUNetError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {config.checkpoint!r}")
    if not 0.0 <= config.foreground_fraction <= 1.0:
        raise AttentionUNetError(f"--foreground-fraction must be in [0, 1], got {config.foreground_fraction}")


def _fold_text(fold: Optional[int], folds: Optional[int]) -> str:
    return "a run without folds" if folds is None else f"fold {fold} of {folds}"


def epoch_label(step: int, iterations_per_epoch: int) -> Union[int, float]:
    """The epoch a log row stands for: whole after a whole epoch; after a time-budget cut, the fraction reached,
    kept strictly between the whole numbers (21.01 .. 21.99), so the resumed run's row for the completed epoch is
    never mistaken for a duplicate."""
    whole, rest = divmod(step, iterations_per_epoch)
    if rest == 0:
        return whole
    return round(whole + min(max(math.floor(100 * rest / iterations_per_epoch) / 100, 0.01), 0.99), 2)


@dataclass
class _RunCases:
    """This process's share of a run's cases (labels as channels) and the classes validation scores."""

    train: List[PreprocessedCase]
    validation: List[PreprocessedCase]
    scored: List[Tuple[int, ...]]  # a class is its tuple of channels; merged classes of coarse cases after
    class_names: Dict[Tuple[int, ...], str]
    classes: int  # the model's classes, background not counted


@dataclass
class _TrainingState:
    """What training steps change and ``last.pt`` saves (with the torch RNG), so ``--resume`` continues exactly."""

    model: AttentionUNet
    trainable: nn.Module  # the model as the optimiser steps it (DistributedDataParallel under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: PatchSampler
    criterion: SegmentationLoss
    log: TrainingLog
    step: int = 0
    best_score: float = -1.0
    best_epoch: Union[int, float] = 0
    trained_seconds: float = 0.0
    epoch_losses: List[float] = field(default_factory=list)  # this epoch's, for its mean loss
    last_dice: float = float("nan")  # the last validation's mean Dice, shown next to the loss


class Trainer:
    """One training run; ``run()`` does everything and returns the exported bundle's directory (rank 0) or
    ``None`` (other ranks)."""

    def __init__(self, config: TrainingConfig) -> None:
        self.domain: Optional[Dict[str, Any]] = None  # measured in _prepare, written into the bundle
        self.split: Dict[str, Any] = {}  # datasets.CaseSplit.to_dict(), from _prepare, written into the bundle
        check_config(config)
        if config.amp not in AMP_MODES:
            raise AttentionUNetError(f"--amp must be one of {', '.join(AMP_MODES)}, got {config.amp!r}")
        self.config = config
        self.work_dir = Path(config.work_dir).expanduser()
        self.output = Path(config.output).expanduser()
        self.device = resolve_device(config.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        self.distributed = init_distributed(self.device.type)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise AttentionUNetError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or none")
        self.progress: Any = None  # the run's reporter (first process only), from run()

    def _log(self, message: str) -> None:
        """A line for people: the reporter's ``log`` (above the bar; not among ``--progress json``'s records)."""
        if self.progress is not None:
            self.progress.log(message)

    def _broadcast(self, value: Any) -> Any:
        if not self.distributed.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def _prepare(self) -> Tuple[TrainingPlan, Dict[int, str], List[str], List[str], CaseCache, Any]:
        """Validate, plan, split and fill the cache (rank 0); every rank receives the same result."""
        config = self.config
        prepared = None
        dataset = load_datasets([config.dataset, *config.extra_datasets], config.label_names)
        if self.distributed.is_main:
            plan_path = self.work_dir / "plan.json"
            if config.resume and (plan_path.exists() or plan_path.is_symlink()):
                saved = read_plan(self.work_dir)
                plan, train_names, val_names = (TrainingPlan.from_dict(saved["plan"]), saved["training_cases"],
                                                saved["validation_cases"])
                self.split = saved.get("split") or {"seed": config.seed, "held_out_cases": [],
                                                    "validation_cases": val_names}
                saved_fold = (self.split.get("fold"), self.split.get("folds"))
                if saved_fold != (config.fold, config.folds):
                    raise AttentionUNetError(
                        f"training plan {plan_path} is for {_fold_text(*saved_fold)}, not "
                        f"{_fold_text(config.fold, config.folds)}; resume with the --fold/--folds the run started "
                        "with, or choose another --work-dir")
                unknown = sorted(set(train_names + val_names) - {case.name for case in dataset.cases})
                if unknown:
                    raise AttentionUNetError(f"training plan {plan_path} names cases the dataset does not have "
                                             f"({', '.join(unknown[:3])}); resume with the dataset the run started "
                                             "with, or start over with --force")
                self.domain = saved.get("domain")
                self._check_exportable(plan, dataset.labels)
                self._log(f"resuming with the saved plan and split from {plan_path}")
            else:
                # The first dataset is split as it would be alone; later datasets only add training cases.
                extra = set(dataset.training_only)
                split = plan_split([c for c in dataset.cases if c.name not in extra], config.validation, config.seed,
                                   config.held_out, config.folds, config.fold)
                train_names, val_names = split.training + list(dataset.training_only), split.validation
                self.split = split.to_dict()
                # The plan and the domain come from the cases the runs use (every fold's the same), never the held-out.
                used = set(train_names + val_names)
                dataset = replace(dataset, cases=[c for c in dataset.cases if c.name in used])
                self._log(f"checking {len(dataset.cases)} cases of {dataset.source} ...")
                fingerprint = inspect_dataset(dataset, TrainingPlan().orientation, minimum_cases=2)
                try:
                    plan = plan_training(fingerprint, list(dataset.labels.values()), config.plan_overrides())
                except ValueError as error:
                    raise DatasetError(f"cannot plan training on {dataset.source}: {error}") from error
                # What segment's domain guard compares inputs with (RAS-reoriented grids: world = index axes).
                self.domain = measure_domain([c.size for c in fingerprint.cases],
                                             [c.spacing for c in fingerprint.cases], modality=fingerprint.modality)
                self._check_exportable(plan, dataset.labels)
                self.work_dir.mkdir(parents=True, exist_ok=True)
                _write_json(plan_path, {"plan": plan.to_dict(), "labels": {str(k): v for k, v in
                                                                           dataset.labels.items()},
                                        "training_cases": train_names, "validation_cases": val_names,
                                        "split": self.split, "domain": self.domain,
                                        "config": _jsonable(asdict(config))})
            self._log(f"plan: spacing {plan.target_spacing} mm, patch {plan.patch_size} (x, y, z), channels "
                      f"{plan.channels}, batch {plan.batch_size}, flips {plan.flip_axes or 'none'}, "
                      f"normalization {plan.normalization}; {len(train_names)} training / {len(val_names)} "
                      "validation cases")
            cache = CaseCache(self.work_dir / "cache", PreprocessingSpec.from_dict(plan.preprocessing()))
            used = set(train_names + val_names)
            cache.load_all([c for c in dataset.cases if c.name in used])
            prepared = (plan.to_dict(), train_names, val_names)
        plan_dict, train_names, val_names = self._broadcast(prepared)
        plan = TrainingPlan.from_dict(plan_dict)
        cache = CaseCache(self.work_dir / "cache", PreprocessingSpec.from_dict(plan.preprocessing()))
        return plan, dataset.labels, train_names, val_names, cache, dataset

    def _resumes_own_output(self) -> bool:
        """True when ``--resume`` continues the run that exported ``--output`` (a time-budget stop exports a
        bundle; finishing the run replaces it)."""
        plan_path = self.work_dir / "plan.json"
        if not self.config.resume or not (plan_path.exists() or plan_path.is_symlink()):
            return False
        recorded = read_plan(self.work_dir)["config"]["output"]
        return Path(recorded).expanduser().resolve() == self.output.resolve()

    def _check_output(self) -> None:
        """Refuse, before anything is read or written, an ``--output`` the final export must not replace: the
        dataset or a folder holding it, the work folder or a folder holding it, and (even with ``--force``)
        anything existing that is not a model bundle."""
        output = self.output.resolve()
        datasets = [Path(d).expanduser().resolve() for d in (self.config.dataset, *self.config.extra_datasets)]
        work_dir = self.work_dir.resolve()
        for what, path in [*(("the training dataset", d) for d in datasets), ("the training work folder", work_dir)]:
            if path == output or output in path.parents:
                raise AttentionUNetError(f"--output {self.output} is (or holds) {what} {path}; the bundle would "
                                         "replace it. Choose another --output (nothing was changed)")
        if self.output.exists() or self.output.is_symlink():
            if not self.config.force and not self._resumes_own_output():
                raise OutputExistsError(f"output bundle {self.output} already exists; choose another --output or "
                                        "pass --force to replace it when training finishes")
            try:
                check_replaceable(self.output)
            except ModelBundleError as error:
                raise OutputExistsError(f"--output: {error}") from None
        last = self.work_dir / "checkpoints" / "last.pt"
        if last.exists() and not self.config.resume and not self.config.force:
            raise OutputExistsError(f"{self.work_dir} already holds a training run; pass --resume to continue it, "
                                    "--force to start over, or choose another --work-dir")

    def run(self) -> Optional[Path]:
        """Prepare, build (or resume), train until the steps or the time budget run out, export the ``--checkpoint``
        epoch."""
        config = self.config
        start_time = time.monotonic()
        if self.distributed.is_main:
            self._check_output()
            # Only the first process reports; a bar redraws at most every 30 s into a log file.
            self.progress = make_progress(config.progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        try:
            if config.threads:
                torch.set_num_threads(config.threads)
            plan, label_names, train_names, val_names, cache, dataset = self._prepare()
            cases = self._load_cases(label_names, train_names, val_names, cache, dataset)
            state = self._build(plan, cases)
            if config.resume:
                self._resume(state)
            if self.distributed.is_main:
                (self.work_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            stopped_early = self._train(state, cases, plan, start_time)
            total_time = state.trained_seconds + time.monotonic() - start_time
            result = None
            if self.distributed.is_main:
                result = self._export(plan, label_names, state.log, total_time, stopped_early, len(train_names),
                                      len(val_names))
        finally:
            if self.progress is not None:
                self.progress.close()
                self.progress = None
        if self.distributed.enabled:
            dist.barrier()
        return result

    def _load_cases(self, label_names: Dict[int, str], train_names: Sequence[str], val_names: Sequence[str],
                    cache: CaseCache, dataset: Any) -> _RunCases:
        """This process's shard of the preprocessed training and validation cases, labels as channels, and the
        classes validation scores (the same on every process)."""
        by_name = {case.name: case for case in dataset.cases}
        rank, world = self.distributed.rank, self.distributed.world_size
        if len(train_names) < world:
            raise DatasetError(f"{len(train_names)} training cases cannot be shared by {world} processes; use "
                               "fewer processes or more cases")
        labels = sorted(label_names)
        train_records = [by_name[n] for n in train_names[rank::world]]
        val_records = [by_name[n] for n in val_names[rank::world]]
        train_cases = to_channel_labels(cache.load_all(train_records), labels, train_records)
        val_cases = to_channel_labels(cache.load_all(val_records), labels, val_records)
        # Scored classes: every channel, then each merged class of a coarse validation case (same on every rank).
        scored = [(channel,) for channel in range(1, len(labels) + 1)] + sorted(
            {tuple(labels.index(m) + 1 for m in members) for n in val_names for _, members in by_name[n].classes
             if len(members) > 1})
        class_names = {members: "+".join(label_names[labels[c - 1]] for c in members) for members in scored}
        return _RunCases(train_cases, val_cases, scored, class_names, len(labels))

    def _build(self, plan: TrainingPlan, cases: _RunCases) -> _TrainingState:
        """A fresh model, optimiser, gradient scaler and patch sampler, seeded from ``--seed`` (in this order, so
        a run's random numbers do not depend on anything else)."""
        config = self.config
        torch.manual_seed(config.seed)
        model = AttentionUNet(in_channels=1, out_channels=cases.classes + 1, channels=plan.channels,
                              deep_supervision=config.deep_supervision,
                              gradient_checkpointing=config.gradient_checkpointing).to(self.device)
        trainable: nn.Module = _AuxForward(model)
        if self.distributed.enabled:
            trainable = nn.parallel.DistributedDataParallel(
                trainable, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        augmentation = AUGMENTATION_SETS[config.augmentation](flip_axes=plan.flip_axes,
                                                             elastic_probability=0.2 if config.elastic else 0.0)
        sampler = PatchSampler(cases.train, plan.patch_size, plan.batch_size, augmentation,
                               config.foreground_fraction, seed=config.seed * 1000 + self.distributed.rank)
        return _TrainingState(model, trainable, optimizer, scaler, sampler,
                              SegmentationLoss(attention_weight=config.attention_loss_weight),
                              TrainingLog(self.work_dir))

    def _resume(self, state: _TrainingState) -> None:
        """Load ``last.pt`` into ``state``: weights, optimiser, scaler, sampler, torch RNG, counters and history.
        A checkpoint that does not fit this run is one user error, and nothing is changed on disk."""
        config = self.config
        last = self.work_dir / "checkpoints" / "last.pt"
        if not (last.exists() or last.is_symlink()):
            raise AttentionUNetError(f"--resume: no checkpoint at {last}; start without --resume")
        saved = _load_checkpoint(last, _checkpoint_limit(state.model))
        try:
            state.model.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
            for parameter, moments in state.optimizer.state.items():
                if any(torch.is_tensor(v) and v.dim() and v.shape != parameter.shape for v in moments.values()):
                    raise ValueError(f"optimizer state of shape {parameter.shape} does not fit its parameter")
            state.scaler.load_state_dict(saved["scaler"])
            state.sampler.load_state_dict(saved["samplers"][self.distributed.rank])
            torch.set_rng_state(saved["torch_rng"])
            step, best_score, best_epoch = int(saved["step"]), float(saved["best_score"]), saved["best_epoch"]
            trained_seconds = float(saved["trained_seconds"])
            if not isinstance(saved["history"], list) or not 0 <= step <= config.epochs * config.iterations_per_epoch:
                raise ValueError(f"step {step} or the history does not fit this run")
            state.step, state.best_score, state.best_epoch = step, best_score, best_epoch
            state.trained_seconds = trained_seconds
            state.log = TrainingLog(self.work_dir, saved["history"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise AttentionUNetError(f"checkpoint {last} does not fit this run ({reason}); resume with the "
                                     "options the run started with, or start over with --force (nothing was "
                                     "changed)") from None
        self._log(f"resumed at step {state.step} (epoch {state.step // config.iterations_per_epoch})")

    def _train(self, state: _TrainingState, cases: _RunCases, plan: TrainingPlan, start_time: float) -> bool:
        """Step until every step is done or the time budget ends (then True: stopped early), validating, logging
        and checkpointing at the end of each epoch and at the end of the budget."""
        config = self.config
        total_steps = config.epochs * config.iterations_per_epoch
        progress = self.progress
        if progress is not None:
            progress.advance("train", state.step / total_steps, "training")
        state.model.train()
        while state.step < total_steps:
            self._step(state, total_steps)
            if progress is not None:
                progress.advance("train", state.step / total_steps,
                                 f"loss {state.epoch_losses[-1]:.3f} dice {state.last_dice:.3f}")
            elapsed = state.trained_seconds + time.monotonic() - start_time
            out_of_time = self._agree(config.max_time is not None
                                      and time.monotonic() - start_time >= config.max_time)
            if state.step % config.iterations_per_epoch and not out_of_time and state.step < total_steps:
                continue
            self._end_epoch(state, cases, plan, elapsed, progress, total_steps)
            if out_of_time:
                return state.step < total_steps
        return False

    def _step(self, state: _TrainingState, total_steps: int) -> None:
        """One optimiser step on a fresh batch of augmented patches (poly learning rate, clipped gradients)."""
        config = self.config
        for group in state.optimizer.param_groups:
            group["lr"] = poly_learning_rate(config.learning_rate, state.step, total_steps)
        images, targets, spaces = state.sampler.next_batch()
        images, targets = images.to(self.device), targets.to(self.device)
        with autocast(self.device, autocast_dtype(AMP_PRECISION[config.amp], self.device)):
            logits, attention, deep = state.trainable(images)
            loss = state.criterion(NetworkOutput(logits, list(attention), list(deep)), targets, spaces)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), 12.0)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.step += 1
        state.epoch_losses.append(float(loss.detach()))

    def _end_epoch(self, state: _TrainingState, cases: _RunCases, plan: TrainingPlan, elapsed: float,
                   progress: Any, total_steps: int) -> None:
        """Validate, append the log row, keep ``best.pt`` when the mean Dice improved, report, save ``last.pt``."""
        config = self.config
        checkpoints = self.work_dir / "checkpoints"
        sums = validate(state.model, cases.validation, plan.patch_size[::-1], self.device, config.amp)
        dice = self._reduce_dice(sums, cases.scored)
        scores = [d for d in dice.values() if d is not None]
        mean_dice = float(np.mean(scores)) if scores else 0.0
        state.last_dice = mean_dice
        epoch = epoch_label(state.step, config.iterations_per_epoch)
        train_loss = self._mean_loss(state.epoch_losses)
        state.epoch_losses = []
        if self.distributed.is_main:
            names = cases.class_names
            row: Dict[str, Any] = {"epoch": epoch, "step": state.step, "time_s": round(elapsed, 1),
                                   "lr": state.optimizer.param_groups[0]["lr"], "train_loss": round(train_loss, 5)}
            row.update({f"val_dice_{names[k]}": (None if dice[k] is None else round(dice[k], 5))
                        for k in cases.scored})
            row["val_dice_mean"] = round(mean_dice, 5)
            state.log.append(row)
            if mean_dice > state.best_score:
                state.best_score, state.best_epoch = mean_dice, epoch
                _save_checkpoint(checkpoints / "best.pt", {"model": state.model.state_dict(), "epoch": epoch,
                                                           "step": state.step, "dice": row})
            message = (f"epoch {epoch}: loss {train_loss:.4f}, validation Dice "
                       + ", ".join(f"{names[k]} {row[f'val_dice_{names[k]}']}" for k in cases.scored)
                       + f" (best {state.best_score:.4f} at epoch {state.best_epoch})")
            progress("train", state.step / total_steps, message)
            progress.log(message)
        samplers = self._gather(state.sampler.state_dict())
        if self.distributed.is_main:
            _save_checkpoint(checkpoints / "last.pt", {
                "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict(), "samplers": samplers, "torch_rng": torch.get_rng_state(),
                "step": state.step, "best_score": state.best_score, "best_epoch": state.best_epoch,
                "history": state.log.rows, "trained_seconds": elapsed})

    def _agree(self, flag: bool) -> bool:
        """True on every process when any process says so (the time budget ends the run everywhere at once)."""
        if not self.distributed.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor)
        return bool(tensor.item() > 0)

    def _gather(self, state: Dict[str, Any]) -> List[Dict[str, Any]]:
        if not self.distributed.enabled:
            return [state]
        states: List[Any] = [None] * self.distributed.world_size
        dist.all_gather_object(states, state)
        return states

    def _mean_loss(self, losses: List[float]) -> float:
        total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=self.device)
        if self.distributed.enabled:
            dist.all_reduce(total)
        return float(total[0] / max(total[1], 1))

    def _reduce_dice(self, sums: Dict[Tuple[int, ...], Tuple[float, int]],
                     labels: Sequence[Tuple[int, ...]]) -> Dict[Tuple[int, ...], Optional[float]]:
        """Mean per-case Dice of each class in ``labels`` over all processes (``None`` where no case had it)."""
        tensor = torch.tensor([list(sums.get(v, (0.0, 0))) for v in labels], dtype=torch.float64,
                              device=self.device)
        if self.distributed.enabled:
            dist.all_reduce(tensor)
        return {v: (float(tensor[i, 0] / tensor[i, 1]) if tensor[i, 1] > 0 else None) for i, v in enumerate(labels)}

    def _bundle_metadata(self, plan: TrainingPlan, label_names: Dict[int, str],
                         metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        config = self.config
        return create_metadata(
            name=config.name, version=config.version,
            labels=[{"value": v, "name": label_names[v], "color": list(LABEL_COLORS[i % len(LABEL_COLORS)])}
                    for i, v in enumerate(sorted(label_names))],
            patch_size=plan.patch_size, preprocessing=plan.preprocessing(),
            description=config.description or "Attention U-Net trained on " + " + ".join(
                (config.dataset, *config.extra_datasets)),
            license=config.license, citation=config.citation, training_data=config.training_data,
            metrics=metrics, mirror_axes=plan.flip_axes, domain=self.domain)

    def _check_exportable(self, plan: TrainingPlan, label_names: Dict[int, str]) -> None:
        """Build the network and the bundle metadata now, so what the export would refuse is refused before any
        training time is spent."""
        architecture = {"in_channels": 1, "out_channels": len(label_names) + 1, "channels": list(plan.channels)}
        needed = estimate_memory(architecture, plan.patch_size, plan.batch_size, training=True)
        available = device_memory(self.device)
        if available is not None and needed > available:
            memory = "this GPU's memory" if self.device.type == "cuda" else "this machine's RAM"
            raise AttentionUNetError(
                f"training patches of {' x '.join(map(str, plan.patch_size))} voxels, batch {plan.batch_size}, "
                f"channels {' '.join(map(str, plan.channels))} need about {needed / 2**30:.1f} GiB (estimate), more "
                f"than the {available / 2**30:.1f} GiB of {memory}; use a smaller --patch-size, --batch-size or "
                "--channels")
        try:
            with torch.device("meta"):  # the architecture only: nothing is allocated
                model = AttentionUNet(**architecture)
        except ValueError as error:
            source = "--channels" if self.config.channels is not None else "the planned channels"
            raise AttentionUNetError(f"{source} {' '.join(map(str, plan.channels))}: {error}") from None
        try:
            complete_metadata(self._bundle_metadata(plan, label_names), model.config(), self.output)
        except ModelBundleError as error:
            raise AttentionUNetError(f"the model bundle this training would write is invalid: {error.problem}. "
                                     "Fix it before training with --name, --model-version or --label-names (or "
                                     "the dataset's label names)") from None

    def _export(self, plan: TrainingPlan, label_names: Dict[int, str], log: TrainingLog, total_time: float,
                stopped_early: bool, n_train: int, n_val: int) -> Path:
        """Write the ``--checkpoint`` weights (best or final epoch, without the deep-supervision heads) as a bundle
        at ``--output``."""
        config = self.config
        labels = sorted(label_names)
        model = AttentionUNet(in_channels=1, out_channels=len(labels) + 1, channels=plan.channels)
        path = self.work_dir / "checkpoints" / ("last.pt" if config.checkpoint == "final" else "best.pt")
        chosen = _load_checkpoint(path, _checkpoint_limit(model))
        try:
            model.load_state_dict({k: v for k, v in chosen["model"].items()
                                   if not k.startswith("deep_supervision_heads.")}, strict=True)
            row = chosen["history"][-1] if config.checkpoint == "final" else chosen["dice"]
            # Merged classes of coarse validation cases ("Anterior+Posterior"), logged beside the model's own.
            region_dice = {key[len("val_dice_"):]: value for key, value in row.items()
                           if key.startswith("val_dice_") and "+" in key}
            validation = {
                "method": ("validation cases" if config.folds is None else
                           f"the validation cases of fold {config.fold} of {config.folds}")
                + ", sliding-window inference on the preprocessed grid, mean of per-case Dice",
                "cases": n_val,
                "dice": {label_names[v]: row[f"val_dice_{label_names[v]}"] for v in labels},
                "mean_dice": row["val_dice_mean"],
                **({"region_dice": region_dice} if region_dice else {}),
                "epoch": row["epoch"],
                "checkpoint": config.checkpoint,
            }
        except (KeyError, IndexError, TypeError, RuntimeError) as error:
            raise AttentionUNetError(f"checkpoint {path} does not fit this run ({type(error).__name__}); "
                                     "it is damaged: start the run over with --force") from None
        metrics = {
            "validation": validation,
            "training": {
                "training_cases": n_train, "epochs_completed": log.rows[-1]["epoch"] if log.rows else 0,
                "steps": log.rows[-1]["step"] if log.rows else 0, "stopped_by_time_budget": stopped_early,
                "seconds": round(total_time, 1), "hardware": hardware_description(self.device,
                                                                                  self.distributed.world_size),
                "engine_version": __version__, "torch_version": torch.__version__, "seed": config.seed,
                "plan": plan.to_dict(), "split": self.split,
            },
        }
        bundle = save_bundle(model, self._bundle_metadata(plan, label_names, metrics), self.output,
                             force=config.force or self._resumes_own_output())
        self._log(f"wrote bundle {bundle.path} ({config.checkpoint} epoch {row['epoch']}, validation mean Dice "
                  f"{row['val_dice_mean']})")
        return bundle.path


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def train(config: TrainingConfig) -> Optional[Path]:
    """Run a training (see the module docstring); returns the bundle directory on rank 0."""
    return Trainer(config).run()


def train_folds(config: TrainingConfig) -> Optional[Path]:
    """Train every fold of ``config.folds`` in turn (``config.fold`` is ignored), each exactly as ``train`` with
    that fold, its work folder and bundle in ``<work_dir>/fold<K>/`` (with ``resume``, folds that have a
    checkpoint continue, the others start), then write their ensemble at ``config.output``; returns it on rank 0.
    """
    from ..model.ensemble import combine_folds

    check_config(config)
    output, work_dir = Path(config.output).expanduser(), Path(config.work_dir).expanduser()
    if output.resolve() == work_dir.resolve() or output.resolve() in work_dir.resolve().parents:
        raise AttentionUNetError(f"--output {output} is (or holds) the work folder {work_dir}, which holds the fold "
                                 "bundles; choose another --output (nothing was changed)")
    if output.exists() or output.is_symlink():
        if not (config.force or config.resume):
            raise OutputExistsError(f"output bundle {output} already exists; choose another --output or pass "
                                    "--force to replace it when training finishes")
        try:
            check_replaceable(output)
        except ModelBundleError as error:
            raise OutputExistsError(f"--output: {error}") from None
    folds = []
    for fold in range(int(config.folds or 0)):
        work = work_dir / f"fold{fold}"
        folds.append(train(replace(config, fold=fold, work_dir=str(work), output=str(work / "model"),
                                   resume=config.resume and (work / "checkpoints" / "last.pt").exists())))
    if folds[0] is None:  # not rank 0
        return None
    from ..model.bundle import load_bundle

    return combine_folds([load_bundle(path) for path in folds], output, force=True).path


