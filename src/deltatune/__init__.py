"""deltatune: parameter-efficient fine-tuning for PyTorch / transformers models.

Ten-line tour::

    import deltatune
    cfg = deltatune.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    deltatune.inject(model, cfg)                 # in place; everything else frozen
    deltatune.print_trainable_parameters(model)
    ...train...
    deltatune.save_adapter(model, "out/adapter") # PEFT layout, PEFT loads it
    deltatune.merge(model); deltatune.unmerge(model)
    plain = deltatune.unload(model)              # ordinary transformers model
"""

import os as _os

# Idle OpenMP worker threads sleep instead of spinning. Must happen before torch loads its OpenMP
# runtime. On a busy CPU (2 cores here, one taken by another process) the spinning threads of a
# 2-thread torch process starve each other: a small-matmul loop took 95 s instead of 8.3 s.
# A user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .inject import (  # noqa: E402
    adapter_per_sample,
    delete_adapter,
    disable_adapters,
    find_targets,
    lora_layers,
    merge,
    parameter_report,
    print_trainable_parameters,
    set_active,
    unload,
    unmerge,
)
from .inject import inject as inject
from .io import AdapterFileError, AdapterMismatchError, load_adapter, read_adapter_info, save_adapter
from .methods.adalora import AdaLoraConfig, inject_adalora
from .methods.bottleneck import BottleneckConfig
from .methods.bottleneck import inject as inject_bottleneck
from .methods.dora import DoraLayer
from .methods.lora import LoraLayer
from .methods.lora_config import LoraConfig
from .methods.loraplus import loraplus_param_groups
from .methods.prompts import PromptConfig
from .methods.prompts import inject as inject_prompt
from .methods.vera import VeraConfig, inject_vera

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "inject", "save_adapter", "load_adapter", "merge", "unmerge", "unload",
    "set_active", "lora_layers", "disable_adapters", "delete_adapter", "adapter_per_sample", "find_targets",
    "parameter_report", "print_trainable_parameters", "AdapterFileError", "AdapterMismatchError",
    "read_adapter_info", "__version__", "DoraLayer", "loraplus_param_groups", "VeraConfig", "inject_vera",
    "AdaLoraConfig", "inject_adalora", "BottleneckConfig", "inject_bottleneck", "PromptConfig", "inject_prompt",
]
