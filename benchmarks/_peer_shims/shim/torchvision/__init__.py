"""A stand-in for ``torchvision`` used only when bench_dreambooth.py runs diffusers'
``train_dreambooth_lora.py``: that script needs ``torchvision.transforms`` for its dataset's image
transforms, and installing torchvision next to a CPU torch risks pip swapping torch for a CUDA build.
Only the transforms below exist; the training step being timed is the script's own."""

from . import transforms  # noqa: F401
