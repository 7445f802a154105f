"""Run diffusers' train_dreambooth_lora.py with the torchvision stand-in in ``shim/``.

transformers/peft/diffusers are imported first, while torchvision is absent, so they take their
no-torchvision paths (and cache that answer); only then does the stand-in become importable for the
script's own ``from torchvision import transforms``.  Usage: run_peer.py SCRIPT [ARGS...]"""

import runpy
import sys
from pathlib import Path

import accelerate  # noqa: F401
import diffusers.training_utils  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401
from transformers.utils import import_utils

assert not import_utils.is_torchvision_available()
sys.path.insert(0, str(Path(__file__).resolve().parent / "shim"))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
