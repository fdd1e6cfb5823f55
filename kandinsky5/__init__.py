"""Kandinsky 5 model code: task registry, DiT, attention (SDPA/NABLA), VAE and text encoder adapters, sampler.

Nothing heavy is imported at package import time.
"""
