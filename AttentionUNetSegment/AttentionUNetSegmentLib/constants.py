"""Names the CLI, the model registry, the writers and the Slicer module share, each defined once here.

No imports: the Slicer module reads them when Slicer starts, without loading the engine's heavy modules.
"""

#: The bundled model the CLI and the Slicer module use when none is named.
DEFAULT_MODEL = "hippocampus"
#: ``--device`` values (``auto``: CUDA when available, else the CPU).
DEVICES = ("auto", "cpu", "cuda")
#: Image formats of the written label maps, attention and probability maps (``--format``).
OUTPUT_FORMATS = ("nii.gz", "nrrd")
