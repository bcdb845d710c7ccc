"""DVC stages of the Stable Diffusion personalisation pipeline (one module per stage)."""

from stages.lib.quiet import install

install()  # before any stage imports diffusers, transformers or tqdm
