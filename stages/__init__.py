"""DVC stages of the Stable Diffusion personalisation pipeline (one module per stage)."""
