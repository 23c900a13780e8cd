"""One vocabulary for where and in what arithmetic the network runs, shared by inference and training.

Devices are the names of ``constants.DEVICES`` (plus ``cuda:N``); precisions those of ``constants.PRECISIONS``.
``train --amp`` keeps its own spelling on the command line (``none`` = ``fp32``): ``AMP_PRECISION`` maps it.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from .constants import DEVICES, PRECISIONS
from .errors import AttentionUNetError

#: The precision each ``train --amp`` value (``constants.AMP_MODES``) means.
AMP_PRECISION = {"none": "fp32", "fp16": "fp16", "bf16": "bf16"}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``precision`` (one of ``PRECISIONS``) means on ``device``; ``None`` for float32.

    Raises:
        AttentionUNetError: an unknown precision, or bf16 asked of a CUDA GPU without bf16 support.
    """
    if precision not in PRECISIONS:
        raise AttentionUNetError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    on_cuda = device.type == "cuda"
    if precision == "auto":
        if not on_cuda:
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise AttentionUNetError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --precision "
                                 "fp16 or auto (which picks fp16 there)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (``autocast_dtype``), or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(device: Union[str, torch.device] = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> ``torch.device``.
    ``local_rank`` (a ``torchrun`` process's ``LOCAL_RANK``): plain ``cuda``/``auto`` means that process's GPU.

    Raises:
        AttentionUNetError: CUDA was asked for but is not available, or the name is unknown.
    """
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise AttentionUNetError(
                f"device {device!r} was asked for but PyTorch {torch.__version__} sees no CUDA GPU; use "
                "--device cpu (or auto), or install a CUDA build of PyTorch with a working NVIDIA driver"
            )
        selected = torch.device(name)
        index = selected.index if selected.index is not None else (
            torch.cuda.current_device() if local_rank is None else local_rank)
        if index >= torch.cuda.device_count():
            raise AttentionUNetError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return torch.device("cuda", index)
    raise AttentionUNetError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} or cuda:N")

