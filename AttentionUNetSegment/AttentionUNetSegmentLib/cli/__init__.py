"""The ``attention-unet`` command line (``main.main``); only ``__main__`` and the console script import it."""
