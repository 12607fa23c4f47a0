"""Run configuration: one typed dataclass per task, presets, and the layering of sources.

Layering (lowest to highest): dataclass defaults < `--preset` < `--config FILE` (YAML or
TOML) < command-line overrides. Unknown keys are errors at every layer, and so is a field
the run's task does not read (its class has no such field: `tasks.py`).
"""

from .files import (
    PRESET_DIR,
    PRESETS,
    _merge,
    config_from_dict,
    config_to_dict,
    load_config_file,
    preset_dict,
    saved_config_from_dict,
)
from .sections import (
    ClassifyConfig,
    ListOpsConfig,
    MaskingConfig,
    OptimConfig,
    TranslationConfig,
    TranslationModelConfig,
)
from .tasks import (
    ENCODER_TASKS,
    LM_TASKS,
    TASK_CONFIGS,
    TASKS,
    ClassifyRun,
    DuplicationRun,
    EncoderRun,
    Enwik8Run,
    ImagesRun,
    ListOpsRun,
    LMRun,
    MLMRun,
    TextRun,
    TrainConfig,
    TranslationRun,
    config_class,
)

__all__ = [
    "ENCODER_TASKS", "LM_TASKS", "PRESETS", "PRESET_DIR", "TASKS", "TASK_CONFIGS",
    "ClassifyConfig", "ClassifyRun", "DuplicationRun", "EncoderRun", "Enwik8Run", "ImagesRun",
    "LMRun", "ListOpsConfig", "ListOpsRun", "MLMRun", "MaskingConfig", "OptimConfig",
    "TextRun", "TrainConfig", "TranslationConfig", "TranslationModelConfig", "TranslationRun",
    "_merge", "config_class", "config_from_dict", "config_to_dict", "load_config_file",
    "preset_dict", "saved_config_from_dict",
]  # fmt: skip
