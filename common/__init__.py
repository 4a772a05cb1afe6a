"""Shared pieces of the selfsup method files: ResNet builder, augmentation recipes, datasets,
distributed helpers, optimisation, checkpoints, logging and kNN evaluation.

Only what two or more files need lives here; nothing method-specific.
"""
