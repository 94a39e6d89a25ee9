"""MMGT, the model: Stage I (SMGA audio -> pose) and Stage II (ReferenceNet + UNet3D with MM-HAA + VAE).

Imports nothing of the engine. See ../shared/MMGT_SPEC.md for the model as published.
"""
