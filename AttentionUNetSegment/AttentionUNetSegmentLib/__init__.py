"""AttentionUNetSegmentLib: the pure-Python engine of the AttentionUNet 3D Slicer extension.

It never imports ``slicer``, ``qt``, ``ctk`` or ``vtk``; the Slicer module drives it through the ``attention-unet``
command line (or imports it in Slicer's Python).
"""

__version__ = "0.1.0"
