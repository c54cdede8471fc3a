"""How checkpoints name and group their tensors: transformers layers, Stable Diffusion layouts (single-file and diffusers), bare state dicts."""
