"""The network and what carries it: the model bundle, fold ensembles, inference acceleration, diagnostics."""
