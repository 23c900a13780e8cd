"""The ``attention-unet`` command line: ``main`` (the console script and ``python -m AttentionUNetSegmentLib``) runs
``commands.main``; each command's options and handler live in ``commands`` (and ``train``, ``evaluate``,
``ensemble``). Only ``__main__`` and the console script import this package."""

from .commands import main

__all__ = ["main"]
