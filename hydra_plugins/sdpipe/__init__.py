"""Hydra plugin hook: registers the pipeline's structured-config schema.

DVC composes ``conf/`` in its own process and imports no project code; Hydra imports every module under the
``hydra_plugins`` namespace package it finds on the path (DVC adds the repo root), so this registration makes
``config_schema`` resolvable and type-checks ``dvc exp run -S`` overrides.
"""

from hydra.core.config_store import ConfigStore

from stages.lib.config.schema import PipelineConfig

ConfigStore.instance().store(name="config_schema", node=PipelineConfig)
