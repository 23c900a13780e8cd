"""Names the CLI, the model registry, the writers and the Slicer module share, each defined once here.

No imports: the Slicer module reads them when Slicer starts, without loading the engine's heavy modules.
"""

#: The bundled model the CLI and the Slicer module use when none is named.
DEFAULT_MODEL = "hippocampus"
#: ``--device`` values (``auto``: CUDA when available, else the CPU).
DEVICES = ("auto", "cpu", "cuda")
#: Image formats of the written label maps, attention and probability maps (``--format``).
OUTPUT_FORMATS = ("nii.gz", "nrrd")
#: Arithmetic of the network's forward passes (``segment --precision``): ``auto`` = bf16 autocast on CUDA GPUs that
#: support it (else fp16), float32 on the CPU (CPUs without native bf16 emulate it, ~200x slower); the others force
#: one choice (``devices.autocast_dtype``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``train --amp`` values: mixed precision of training (``none`` = float32; ``devices.AMP_PRECISION``).
AMP_MODES = ("none", "fp16", "bf16")
