"""Run ``deltatune.cli.main(argv)`` in a child process with one injected fault (test helper, not a test).

    python fault_child.py ARGV...      fault from $DELTATUNE_FAULT (JSON), e.g.
      {"kill_in_checkpoint": [2, "after_file"]}   SIGKILL during the 2nd checkpoint, after its first file
      {"kill_in_checkpoint": [3, "before_rename"]} SIGKILL with the 3rd checkpoint complete but not renamed
      {"fsize_before_checkpoint": [3, 2000]}      RLIMIT_FSIZE = 2000 bytes from the 3rd checkpoint on
      {"fsize_before_adapter": 2000}              … from the adapter save on
      {"fsize_at_start": 50000}                   … from the start (merge, quantize)

RLIMIT_FSIZE is the "disk full" of these tests: a write past the limit fails with EFBIG (SIGXFSZ
is ignored, so it is an error the program sees, as ENOSPC would be), and it needs no privileges.
The faults patch deltatune's own seams in this process only; nothing in the library knows.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from typing import Any


def _fsize(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: dict[str, Any]) -> None:
    import deltatune.fsutil as fsutil
    import deltatune.train.checkpoint as ckpt
    import deltatune.train.loop as loop

    if "fsize_at_start" in fault:
        _fsize(int(fault["fsize_at_start"]))
    if "fsize_before_checkpoint" in fault:
        nth, limit = fault["fsize_before_checkpoint"]
        real_save = loop.save_checkpoint
        calls = [0]

        def save(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] == nth:
                _fsize(int(limit))
            return real_save(*a, **k)

        loop.save_checkpoint = save  # type: ignore[assignment]
    if "fsize_before_adapter" in fault:
        real_dir = fsutil.atomic_dir

        def atomic_dir(final: Any, *a: Any, **k: Any) -> Any:
            if "adapter" in str(final):
                _fsize(int(fault["fsize_before_adapter"]))
            return real_dir(final, *a, **k)

        fsutil.atomic_dir = atomic_dir  # type: ignore[assignment]
    if "kill_in_checkpoint" in fault:
        nth, where = fault["kill_in_checkpoint"]
        calls = [0]
        real_file, real_replace = ckpt.save_file, ckpt.os.replace

        def save_file(tensors: Any, path: str, *a: Any, **k: Any) -> Any:
            if path.endswith("trainable.safetensors"):
                calls[0] += 1
            out = real_file(tensors, path, *a, **k)
            if calls[0] == nth and where == "after_file":
                _die()
            return out

        def replace(src: Any, dst: Any) -> None:
            if ".tmp-step-" in str(src) and calls[0] == nth and where == "before_rename":
                _die()
            real_replace(src, dst)

        ckpt.save_file = save_file  # type: ignore[assignment]
        ckpt.os.replace = replace  # type: ignore[assignment]  # this child only


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every child and in the reference run
    from deltatune.cli import main

    install(json.loads(os.environ.get("DELTATUNE_FAULT") or "{}"))
    sys.exit(main(sys.argv[1:]))
