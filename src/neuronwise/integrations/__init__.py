"""Integrations with training frameworks (optional extras).

- :mod:`neuronwise.integrations.lightning`: Lightning callbacks (``pip install "neuronwise[lightning]"``).
"""
