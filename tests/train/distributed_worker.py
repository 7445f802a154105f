"""One torchrun launch, many checks: the worker that tests/train/test_distributed.py starts with
``python -m torch.distributed.run --standalone --nproc_per_node=N distributed_worker.py SPEC.json``.

A torchrun launch costs ~15-20 s of imports, so one launch runs every case of the spec in turn
(each a whole ``deltatune.train.loop.run``; the process group is joined once and reused) and
writes what the test compares: rank 0 the losses and summaries (``results.json``), every rank the
comparison of its own FSDP2 shards with the files that were written (``slices_rank<r>.json``).

SPEC: {"out": dir, "cases": [{"name", "overrides": [...], "resume_from": dir?, "check_slices": bool?,
       "stop_after_steps": int?}], "fail": {"rank": r, "after_batches": k}?}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _fail_on(rank: int, after_batches: int) -> None:
    """Make one rank raise (as bad data on one shard would) after ``after_batches`` collates."""
    from deltatune.objectives.causal_lm import CausalLM

    if int(os.environ["RANK"]) != rank:
        return
    original = CausalLM.collate
    calls = [0]

    def collate(self: Any, rows: Any) -> Any:
        calls[0] += 1
        if calls[0] > after_batches:
            raise ValueError(f"bad record on rank {rank} (injected by the test)")
        return original(self, rows)

    CausalLM.collate = collate  # type: ignore[method-assign]


def _slices(model: torch.nn.Module, files: dict[str, torch.Tensor], key_of: Any) -> dict[str, Any]:
    """This rank's shard of every trainable DTensor vs the same rows of the file's whole tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    checked, bad, dtensors = 0, [], 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = key_of(name)
        if key not in files:
            bad.append(f"{name}: no key {key} in the file")
            continue
        whole = files[key]
        if isinstance(p, DTensor):
            dtensors += 1
            mine = distribute_tensor(whole.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
            local = p.to_local()
        else:
            mine, local = whole.to(p.dtype), p.detach()
        checked += 1
        if mine.shape != local.shape or not torch.equal(mine, local.detach()):
            bad.append(name)
    return {"checked": checked, "dtensors": dtensors, "bad": bad}


def main(spec_path: str) -> None:
    from safetensors.torch import load_file

    from deltatune.config import load_config
    from deltatune.models import load_model
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import run

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    out = Path(spec["out"])
    if spec.get("fail"):
        _fail_on(spec["fail"]["rank"], spec["fail"]["after_batches"])
    results: dict[str, Any] = {}
    slices: dict[str, Any] = {}
    for case in spec["cases"]:
        cfg = load_config(TrainConfig, None, case["overrides"])
        model = tok = None
        if case.get("check_slices"):  # keep the (sharded) model to compare its shards with the files
            model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, device="cpu")
        res = run(cfg, model=model, tokenizer=tok, progress=False, stop_after_steps=case.get("stop_after_steps"))
        results[case["name"]] = {"losses": res.losses, "interrupted": res.interrupted,
                                 "after": res.summary.get("after"),
                                 "summary": {k: res.summary.get(k) for k in ("strategy", "processes",
                                                                            "peak_memory_mb_per_rank",
                                                                            "forgetting")}}
        if case.get("check_slices") and model is not None:
            from deltatune.train.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(Path(cfg.output_dir))
            if ckpt is not None:  # the checkpoint holds every rank's rows, whole
                files = load_file(str(ckpt / "trainable.safetensors"))
                slices[case["name"] + "/checkpoint"] = _slices(model, files, lambda n: n)
            adapter = Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors"
            if adapter.exists():
                files = load_file(str(adapter))
                slices[case["name"] + "/adapter"] = _slices(
                    model, files, lambda n: "base_model.model." + n.replace(".default", ""))
    (out / f"slices_rank{rank}.json").write_text(json.dumps(slices, indent=1))
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
