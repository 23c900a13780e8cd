"""Reading inputs and writing files: images (the input contract and the one atomic writer), DICOM series, JSON."""
