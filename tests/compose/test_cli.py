"""``deltatune compose``: writes a PEFT-format adapter PEFT loads with deltatune's logits; reports
rank and energy per module; errors name adapter and module; never overwrites an input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.testing import make_tiny_llama

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _save(base: torch.nn.Module, d: Path, seed: int, **cfg: object) -> Path:
    m = copy.deepcopy(base)
    deltatune.inject(m, deltatune.LoraConfig(**cfg))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return deltatune.save_adapter(m, d)


@pytest.mark.parametrize("method,extra", [("svd", ["--svd-rank", "3"]), ("ties_svd", ["--density", "0.5"]),
                                          ("task_arithmetic", [])])
def test_compose_cli_peft_loads_same_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str,
                                            extra: list[str]) -> None:
    peft = pytest.importorskip("peft")
    base = make_tiny_llama(vocab_size=64)
    a = _save(base, tmp_path / "a", 1, r=4, target_modules=["q_proj", "v_proj"])
    b = _save(base, tmp_path / "b", 2, r=2, use_rslora=True, target_modules=["v_proj", "o_proj"])
    rc = main(["compose", "--adapter", str(a), "--adapter", str(b), "--weights=-0.5,1.5", "--method", method,
               "--out", str(tmp_path / "out"), *extra])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model.layers.0.self_attn.o_proj" in out and "energy kept" in out
    ours = copy.deepcopy(base)
    deltatune.load_adapter(ours, tmp_path / "out")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    with torch.no_grad():
        got, want = ours(IDS).logits, pm(IDS).logits
        assert (got - base(IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if method == "svd":
        assert " 3 " in out.splitlines()[1]  # rank 3 reported for the first module


def test_compose_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_tiny_llama(vocab_size=64)
    a = _save(base, tmp_path / "a", 1, r=4)
    d = _save(base, tmp_path / "d", 2, r=4, use_dora=True)
    before = (a / "adapter_model.safetensors").read_bytes()
    assert main(["compose", "--adapter", str(a), "--adapter", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "module 'model.layers." in err and "DoRA" in err
    b = _save(base, tmp_path / "b", 3, r=2)
    assert main(["compose", "--adapter", str(a), "--adapter", str(b), "--weights", "1,2", "--out", str(a)]) == 2
    assert "overwrite input adapter" in capsys.readouterr().err
    assert main(["compose", "--adapter", str(a), "--adapter", str(a / "."), "--out", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert (a / "adapter_model.safetensors").read_bytes() == before
    assert main(["compose", "--adapter", str(a), "--weights", "1,2", "--out", str(tmp_path / "o")]) == 2
    assert "2 values for 1 --adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
