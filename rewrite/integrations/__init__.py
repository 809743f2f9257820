"""Glue between rewritten models and other libraries' training loops, one module per library.

Each module imports its library itself, so ``import rewrite`` never needs them:
:mod:`rewrite.integrations.ultralytics` (the ``ultralytics`` extra).
"""
