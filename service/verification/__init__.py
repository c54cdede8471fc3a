"""Verification: a merged result loads and gives finite outputs before it is pushed. A
transformers model runs a few tokens (``verify``); a diffusion pipeline or single file takes
one denoising step, its VAE decodes and its text encoders run (``diffusion``); a bare state
dict's tensors are finite. The workflows call it; it imports only the engine.
"""
