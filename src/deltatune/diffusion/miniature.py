"""A real miniature text-to-image model in the Stable Diffusion layout, pretrained on Fashion-MNIST.

No registry ships diffusion weights, so this script builds one: a CLIP text encoder with a small
local tokenizer (vocab/merges written here from a word list), an ``AutoencoderKL`` (16×16 RGB →
4×8×8 latents), a ``UNet2DConditionModel`` with cross-attention at every level, and a DDIM
scheduler — the directory ``StableDiffusionPipeline.from_pretrained`` reads — then pretrains the
VAE, then UNet + text encoder on the 60k Fashion-MNIST training images with class prompts
("a photo of a sneaker"), 10 % of prompts dropped for classifier-free guidance.

Deterministic on one machine: fixed seeds, fixed data order, one thread count.

    python -m deltatune.diffusion.miniature --out ~/.cache/deltatune/models/mini-sd-fashion

Data: Debian's ``dataset-fashion-mnist`` (MIT, Zalando), taken with ``apt-get download`` + ``dpkg -x``
into the cache when it is not installed (see :func:`fashion_mnist_dir`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger("deltatune.diffusion")

__all__ = [
    "FASHION_CLASSES", "MiniSpec", "TINY_SPEC", "MINI_SPEC", "build_tokenizer", "build_components",
    "fashion_mnist_dir", "load_fashion_mnist", "to_pixels", "class_prompt", "pretrain", "default_pipeline_dir",
]

FASHION_CLASSES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                    "sneaker", "bag", "ankle boot")
# Pretraining prompt templates; "a sks <class>" never occurs, so "sks" stays a rare token.
TEMPLATES: tuple[str, ...] = ("a photo of a {}", "a picture of a {}", "a {}")
_WORDS = ("a", "an", "the", "photo", "picture", "of", "on", "in", "with", "and", "sks", "beach", "red", "dog",
          "t", "shirt", "trouser", "pullover", "dress", "coat", "sandal", "sneaker", "bag", "ankle", "boot")
_FASHION_DEB = "dataset-fashion-mnist"
_FASHION_SUBDIR = "usr/share/datasets/fashion-mnist"


def class_prompt(label: int, template: str = TEMPLATES[0]) -> str:
    return template.format(FASHION_CLASSES[label])


@dataclass(frozen=True)
class MiniSpec:
    """Sizes of the miniature's parts (the tests use a smaller one with random weights)."""

    resolution: int = 16
    vae_channels: tuple[int, ...] = (16, 32)  # len-1 downsamplings: 16 → 8
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    norm_groups: int = 8
    text_layers: int = 2
    text_hidden: int = 32
    max_tokens: int = 16


MINI_SPEC = MiniSpec()
TINY_SPEC = MiniSpec(resolution=8, vae_channels=(8, 8), unet_channels=(16, 16), cross_attention_dim=16,
                     attention_head_dim=4, norm_groups=4, text_layers=1, text_hidden=16, max_tokens=12)


# ------------------------------------------------------------------------------------------- tokenizer
def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    by_byte = dict(zip(bs, cs))
    return [chr(by_byte[b]) for b in range(256)]


def build_tokenizer(out_dir: str | Path, words: tuple[str, ...] = _WORDS, max_tokens: int = 16) -> Any:
    """A CLIP BPE tokenizer whose vocab is the 512 byte symbols (with and without ``</w>``) plus one
    chain of merges per word (``p h``, ``ph o``, …, ``phot o</w>``): every listed word is one token,
    anything else falls back to characters, as in CLIP. Written as vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for sym in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(sym, len(vocab))
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merged = cur + nxt
            line = f"{cur} {nxt}"
            if line not in merges:
                merges.append(line)
            vocab.setdefault(merged, len(vocab))
            cur = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=max_tokens)
    tok.save_pretrained(str(out))
    return CLIPTokenizer.from_pretrained(str(out))


# ------------------------------------------------------------------------------------------- models
def build_components(spec: MiniSpec, tokenizer_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Random-init components of an SD-layout pipeline (the dict StableDiffusionPipeline takes)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tokenizer_dir, max_tokens=spec.max_tokens)
    torch.manual_seed(seed)
    n_vae = len(spec.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
                        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=spec.vae_channels,
                        layers_per_block=1, latent_channels=spec.latent_channels, norm_num_groups=spec.norm_groups,
                        sample_size=spec.resolution)
    n_unet = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 2 ** (n_vae - 1), in_channels=spec.latent_channels,
        out_channels=spec.latent_channels, layers_per_block=1, block_out_channels=spec.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n_unet, up_block_types=("CrossAttnUpBlock2D",) * n_unet,
        cross_attention_dim=spec.cross_attention_dim, attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_groups)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers, num_attention_heads=4, max_position_embeddings=spec.max_tokens,
        projection_dim=spec.cross_attention_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    if spec.text_hidden != spec.cross_attention_dim:
        raise ValueError(f"MiniSpec: text_hidden ({spec.text_hidden}) must equal cross_attention_dim "
                         f"({spec.cross_attention_dim}): the UNet attends to the encoder's last hidden state")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    modules: list[Any] = [vae, unet, text_encoder]
    for m in modules:
        m.eval()
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_pipeline(components: dict[str, Any], out: str | Path) -> Path:
    """Write the SD pipeline directory (model_index.json + one folder per part) atomically."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pipe: Any = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    pipe.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------- data
def default_pipeline_dir() -> Path:
    from ..paths import cache_root

    return cache_root() / "models" / "mini-sd-fashion"


def fashion_mnist_dir() -> Path:
    """The folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``: the installed Debian package,
    or the package's files unpacked (``apt-get download`` + ``dpkg -x``) into the deltatune cache."""
    installed = Path("/") / _FASHION_SUBDIR
    if (installed / "train-images-idx3-ubyte.gz").exists():
        return installed
    from ..paths import cache_root

    root = cache_root() / "data" / "fashion-mnist"
    found = root / _FASHION_SUBDIR
    if (found / "train-images-idx3-ubyte.gz").exists():
        return found
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            subprocess.run(["apt-get", "download", _FASHION_DEB], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            raise RuntimeError(
                f"Fashion-MNIST not found: install Debian's {_FASHION_DEB} (apt-get install {_FASHION_DEB}; run "
                f"'apt-get update' first if apt cannot find it) or unpack it into {root}: {e}") from e
    return found


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from the IDX files."""
    root = root or fashion_mnist_dir()
    prefix = {"train": "train", "test": "t10k"}[split]
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def to_pixels(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 3, R, R) in [-1, 1] (area resize; gray copied to RGB, as the
    reference scripts' ``convert("RGB")`` does)."""
    x = torch.from_numpy(np.array(images, copy=True)).float().div(255.0)[:, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------- pretraining
@dataclass
class PretrainConfig:
    vae_steps: int = 300
    unet_steps: int = 1000
    batch_size: int = 64
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-6
    uncond_prob: float = 0.1
    seed: int = 0
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other at every barrier
    # (measured here: 5 s/step with 2 threads under load vs ~1 s with 1).
    threads: int = 1


def _batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def pretrain(out: str | Path, spec: MiniSpec = MINI_SPEC, cfg: PretrainConfig | None = None,
             progress: bool = True) -> Path:
    """Build and pretrain the miniature; write the pipeline directory ``out`` with a ``pretrain.json``."""
    cfg = cfg or PretrainConfig()
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    images, labels = load_fashion_mnist("train")
    pixels = to_pixels(images, spec.resolution)  # (60000, 3, R, R)
    with tempfile.TemporaryDirectory() as tok_dir:
        parts = build_components(spec, tok_dir, seed=cfg.seed)
    vae, unet, te, tok = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. VAE: reconstruction (L1 + L2) + a tiny KL, as SD's VAE is trained (minus the GAN/LPIPS terms).
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    bar = tqdm(_batches(len(pixels), cfg.batch_size, cfg.vae_steps, gen), desc="vae", disable=not progress)
    for idx in bar:
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 1000]).latent_dist.mean for i in range(0, len(pixels), 1000)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling  # (60000, 4, R/2, R/2), unit variance as SD's 0.18215 makes them

    # 2. UNet + text encoder: ε-prediction on DDPM noise, class prompts from the templates.
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(parts["scheduler"].config)
    prompts = [t.format(c) for c in FASHION_CLASSES for t in TEMPLATES] + [""]
    ids_all = tok(prompts, padding="max_length", max_length=spec.max_tokens, truncation=True,
                  return_tensors="pt").input_ids  # (P, T)
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1 - s / cfg.unet_steps))
    bar = tqdm(_batches(len(latents), cfg.batch_size, cfg.unet_steps, gen), desc="unet", disable=not progress)
    losses: list[float] = []
    for idx in bar:
        z0 = latents[idx]
        lab = labels[idx.numpy()]
        which = torch.randint(len(TEMPLATES), (len(idx),), generator=gen)
        p_idx = torch.from_numpy(lab) * len(TEMPLATES) + which
        p_idx = torch.where(torch.rand(len(idx), generator=gen) < cfg.uncond_prob, len(prompts) - 1, p_idx)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = te(ids_all[p_idx])[0]
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    te.eval()
    out = save_pipeline(parts, out)
    info = {"spec": asdict(spec), "pretrain": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
            "final_loss_50": float(np.mean(losses[-50:])), "vae_scaling_factor": scaling, "classes": FASHION_CLASSES,
            "templates": TEMPLATES, "data": "Fashion-MNIST train (60k), Debian dataset-fashion-mnist, MIT"}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    log.info("miniature written to %s in %.0f s", out, info["seconds"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltatune.diffusion.miniature", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(default_pipeline_dir()), help="pipeline directory to write")
    p.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    p.add_argument("--unet-steps", type=int, default=PretrainConfig.unet_steps)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--threads", type=int, default=PretrainConfig.threads)
    p.add_argument("--if-missing", action="store_true", help="do nothing when --out already holds a pipeline")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.if_missing and (Path(args.out) / "model_index.json").exists():
        print(f"{args.out}: already built")
        return 0
    out = pretrain(args.out, cfg=PretrainConfig(vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                                                  batch_size=args.batch_size, threads=args.threads),
                   progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
