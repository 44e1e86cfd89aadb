"""LoRA fine-tuning of a latent diffusion model (Stable Diffusion 1.5) on a few images."""
