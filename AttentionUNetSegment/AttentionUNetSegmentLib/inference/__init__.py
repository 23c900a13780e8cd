"""Segmenting images with a bundle: the predictor, postprocessing and the writers of its results."""
