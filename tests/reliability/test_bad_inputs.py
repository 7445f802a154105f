"""Fault harness, part 1: every row of bad_inputs_table.py run in-process through deltatune.cli.main.

Each case asserts the exit code, that the error names what it should (file:line, key, flag,
module) and what was expected, that no traceback escaped (an exception fails the test), and that
nothing on disk changed: the case directory, the model directory and the adapter directory are
hashed before and after.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from bad_inputs_table import Case, all_cases

from deltatune.cli import main

CASES = all_cases()


def test_the_table_has_at_least_200_cases() -> None:
    assert len(CASES) >= 200, len(CASES)


def _tree_hash(*roots: Path) -> dict[str, str]:
    """path → sha256 (or 'dir'), plus each file's mode: a changed mode is a change too."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                data = b"" if os.path.islink(p) else Path(p).read_bytes()
                out[p] = f"{hashlib.sha256(data).hexdigest()} {st.st_mode:o}"
    return out


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (r=4 on q_proj/v_proj, B ≠ 0) for the tiny model."""
    from deltatune import inject, save_adapter
    from deltatune.methods.lora_config import LoraConfig
    from deltatune.models import load_model

    model, _ = load_model(model_dir, dtype="fp32", device="cpu")
    inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


def _make(tmp: Path, case: Case, fixtures: dict[str, Path]) -> None:
    for name, spec in case.files.items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if callable(spec):
            spec(target, fixtures)
        elif isinstance(spec, bytes):
            target.write_bytes(spec)
        else:
            target.write_text(spec)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.chdir(case_dir)  # a default output_dir (runs/...) would land here, inside the hash
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    yield case_dir


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, isolated: Path, model_dir: Path, adapter_dir: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    fixtures = {"model": model_dir, "adapter": adapter_dir}
    _make(isolated, case, fixtures)
    argv = [a.replace("{tmp}", str(isolated)).replace("{model}", str(model_dir)).replace("{adapter}", str(adapter_dir))
            for a in case.argv]
    before = _tree_hash(isolated, model_dir, adapter_dir)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    err = capsys.readouterr().err
    assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{err[-2000:]}"
    missing = [s for s in case.expect if s.lower() not in err.lower()]
    assert not missing, f"the error does not say {missing}:\n{err[-2000:]}"
    assert "Traceback" not in err
    after = _tree_hash(isolated, model_dir, adapter_dir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed on disk: {changed[:10]}"
