"""Evaluation: the metric suite (``metrics``) and inference over a test set (``evaluate``)."""
