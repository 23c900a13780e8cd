"""What happens to an input before the network: reorientation, resampling, normalisation, the domain guard and
automatic localisation. Nothing heavy at import (the Slicer module reads ``domain`` at start-up)."""
