"""Reading inputs and writing files: images (the input contract), DICOM series, JSON, and
the one atomic writer of every file (``atomic``)."""
