"""DVC stages of the Stable Diffusion personalisation pipeline (one module per stage)."""

from stages.lib.runtime.quiet import install

install()  # before any stage imports diffusers, transformers or tqdm
