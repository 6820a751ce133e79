"""Embervm: a self-hosted implementation of AWS Lambda MicroVMs.

Layers (checked by import-linter, see pyproject.toml):
``cli → server → {api, proxy} → core → {build, store, blobs} → host → {vmm, network, guest}``.
"""

__version__ = "0.1.0"
