"""AttentionUNetSlicer: the 3D Slicer side of AttentionUNet (panel, logic, jobs, scene import, export).

Each file holds one concern (see ``AttentionUNetSegmentLib/DESIGN.md``, "Slicer module"); the module's entry file
``AttentionUNetSegment.py`` only registers the module and delegates here. The engine (``AttentionUNetSegmentLib``)
never imports this package.
"""
