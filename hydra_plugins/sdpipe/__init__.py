"""Hydra plugin hook: registers the pipeline's structured-config schema.

DVC composes ``conf/`` in its own process and imports no project code; Hydra imports every module under the
``hydra_plugins`` namespace package it finds on the path (DVC adds the repo root), so this registration makes
``config_schema`` resolvable and type-checks ``dvc exp run -S`` overrides. It also registers the resolver that
``conf/config.yaml``'s ``checked`` key calls while the composition is resolved (before DVC writes params.yaml): it
runs the project's key and value checks, so ``-S +lora.rnak=8`` or ``-S infer.guidance_scale=-3`` stops there with
a one-line message and params.yaml stays as it was. ``data.instance_dir`` is checked there too (``inputs.py``): a
folder DVC could not hash as prep's dependency stops the composition the same way.
"""

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.sdpipe.inputs import check_instance_dir
from stages.lib.config.loader import checked_config
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import ConfigError

CHECKED = "passed"


def check_composition(*, _root_: DictConfig) -> str:
    """The ``sdpipe_check`` resolver: every section of the composition (but ``checked`` itself) through the
    loader's checks, then the photo folder on disk; a problem raises, which stops the composition."""
    data = {}
    for key in _root_:
        if key != "checked":
            node = _root_[key]
            data[key] = (
                OmegaConf.to_container(node, resolve=True)
                if isinstance(node, DictConfig | ListConfig)
                else node
            )
    source = "conf/ with the -S overrides"
    cfg = checked_config(data, source)
    try:
        check_instance_dir(cfg.data.instance_dir)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return CHECKED


ConfigStore.instance().store(name="config_schema", node=PipelineConfig)
OmegaConf.register_new_resolver("sdpipe_check", check_composition, replace=True)
