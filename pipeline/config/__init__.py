"""The one typed, frozen configuration tree: its schema (`schema`), the named presets (`presets`), the
command line's overrides and the generic check of every choice (`parsing`), and the plan derived from a
config with the rules of resuming (`plan`). Every default lives in `schema`.

Callers use the names below (`from pipeline import config`; `config.resolve(cfg)`), whichever module
holds them.
"""

from pipeline.config.parsing import apply_overrides, invalid_choices, valid_keys
from pipeline.config.plan import (RESUME_KEYS, SHAPE_KEYS, Plan, differences, keep_global_batch, load_run_config,
                                  micro_batches_per_rank, resolve, save_run_config)
from pipeline.config.presets import PRESETS, preset
from pipeline.config.schema import (IMAGENET_MEAN, IMAGENET_STD, ClusterConfig, Config, DataConfig, ModelConfig,
                                    OptimConfig, ScheduleConfig, TrainConfig, from_dict, global_batch, leaf_fields,
                                    loader_mode, to_dict, wants_gpus)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "RESUME_KEYS", "SHAPE_KEYS", "ClusterConfig", "Config",
           "DataConfig", "ModelConfig", "OptimConfig", "Plan", "ScheduleConfig", "TrainConfig", "apply_overrides",
           "differences", "from_dict", "global_batch", "invalid_choices", "keep_global_batch", "leaf_fields",
           "load_run_config", "loader_mode", "micro_batches_per_rank", "preset", "resolve", "save_run_config",
           "to_dict", "valid_keys", "wants_gpus"]
