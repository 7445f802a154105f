"""objective causal_lm: the labelled-positions loss equals the naive full-logits loss, goes through
the model's own forward (the head pre-hook is gone afterwards), and the objective's pieces agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.objectives.causal_lm import CausalLM, loss_tokens, model_loss_sum
from deltatune.testing import make_tiny_gpt2, make_tiny_llama
from deltatune.train.config import TrainConfig


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # and right padding in row 2
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _naive(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = torch.zeros(())
    for b in range(labels.shape[0]):  # one position at a time: −log softmax(logits)[label]
        for t in range(labels.shape[1]):
            if labels[b, t] != -100:
                total = total - F.log_softmax(logits[b, t].float(), -1)[labels[b, t]]
    return total


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_labelled_positions_loss_equals_naive_and_uses_the_forward(make) -> None:
    model = make()
    batch = _batch(model.config.vocab_size)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))  # a wrapper around the whole model sees it
    head = model.get_output_embeddings()
    seen: list[tuple[int, ...]] = []
    head.register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.shape)))
    got = model_loss_sum(model, batch)
    handle.remove()
    assert calls == [1] and got.dtype == torch.float32
    n = loss_tokens(batch)
    assert seen == [(n, model.config.vocab_size)]  # the head ran on the labelled positions only
    torch.testing.assert_close(got, _naive(model, batch), rtol=1e-5, atol=1e-5)
    assert not head._forward_pre_hooks  # the selection hook is removed after the call
    assert model(input_ids=batch["input_ids"]).logits.shape[:2] == batch["input_ids"].shape


def test_objective_weight_collate_and_grad() -> None:
    obj = CausalLM(TrainConfig())
    obj.pad = 0
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    batch = obj.collate(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 0, 0]]
    assert obj.weight(batch) == 3  # 7, 8 of row 0 and 6 of row 1: the first token is never predicted
    model = make_tiny_llama()
    loss = obj.loss_sum(model, batch)
    loss.backward()
    assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) > 0


def test_an_objective_config_section_is_one_dataclass_and_one_registry_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import dataclass, field

    from deltatune import registry
    from deltatune.config import help_text, load_config
    from deltatune.train import config as train_config

    @dataclass
    class ToyConfig:
        """The toy objective's settings."""

        k: int = field(default=2, metadata={"doc": "A toy setting."})

    class Toy(CausalLM):
        name = "toy"
        summary = "a toy objective"
        Config = ToyConfig

    monkeypatch.setitem(registry.OBJECTIVES, "toy", Toy)
    cls = train_config._with_objective_sections(train_config._TrainConfig)
    cfg = load_config(cls, None, ["objective=toy", "toy.k=5"])
    assert train_config.section(cfg, "toy", ToyConfig).k == 5 and cfg.objective == "toy"
    assert "toy.k: int = 2" in help_text(cls)
    with pytest.raises(ValueError, match="did you mean 'toy.k'"):
        load_config(cls, None, ["toy.kk=1"])
    with pytest.raises(ValueError, match="objective must be one of"):
        load_config(TrainConfig, None, ["objective=toys"])
