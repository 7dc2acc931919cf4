"""Experiments: the paper's models, the data sets and the training loop (``python -m bregman_fused.train``)."""
