"""DVC stages of the Stable Diffusion personalisation pipeline (one module per stage)."""

from stages.lib.runtime import lean_imports, quiet

quiet.install()  # before any stage imports diffusers, transformers or tqdm
lean_imports.install()
