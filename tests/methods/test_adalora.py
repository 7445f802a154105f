"""AdaLoRA: the forward against PEFT with the same weights, the cubic budget schedule, rank flowing
between layers, the allocator in lockstep with PEFT's, the orthogonality regulariser, PEFT-format
files with the pruned rank pattern both ways, and a 2-step training run through the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.methods.adalora import (
    AdaLoraConfig,
    AdaLoraLayer,
    adalora_hooks,
    adalora_layers,
    inject_adalora,
    merge,
    orth_regulariser,
    unload,
    unmerge,
)
from deltatune.train.hooks import after_step, extra_loss

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: a second intra-op thread only adds contention on a loaded 2-core machine (~5× slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def randomise_e(model: nn.Module, seed: int = 3) -> None:
    """Force Λ ≠ 0 (it starts at 0) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)


def copy_from_peft(model: nn.Module, pm: nn.Module) -> None:
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for path, layer in adalora_layers(model):
            for part, p in zip(("lora_A", "lora_B", "lora_E"), layer.factors()):
                p.copy_(theirs[f"base_model.model.{path}.{part}.default"])


def peft_config(peft, **kw):
    return peft.AdaLoraConfig(init_r=kw.get("init_r", 6), target_r=kw.get("target_r", 2), lora_alpha=kw.get("alpha", 8),
                              target_modules=kw.get("target_modules", QKVO), tinit=kw.get("tinit", 0),
                              tfinal=kw.get("tfinal", 0), deltaT=kw.get("delta_t", 1),
                              total_step=kw.get("total_step", 10), orth_reg_weight=kw.get("orth_reg_weight", 0.5),
                              task_type="CAUSAL_LM")  # PeftModelForCausalLM adds the regulariser to the loss


def test_forward_matches_peft_with_the_same_weights() -> None:
    peft = pytest.importorskip("peft")
    for make, targets in ((tiny_llama, QKVO), (tiny_gpt2, ["c_attn", "c_fc"])):
        kw = dict(init_r=6, target_r=2, alpha=12.0, target_modules=targets)
        pm = peft.get_peft_model(make(), peft_config(peft, **kw)).eval()
        randomise_e(pm)
        model = inject_adalora(make(), AdaLoraConfig(**kw), total_step=10)
        copy_from_peft(model, pm)
        want = pm(IDS).logits
        assert (want - make()(IDS).logits).abs().max() > 1e-3
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_naive_formula_init_and_merge() -> None:
    model = inject_adalora(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, alpha=6.0), total_step=5)
    torch.testing.assert_close(model(IDS).logits, tiny_llama()(IDS).logits, rtol=0, atol=0)  # Λ = 0 at init
    randomise_e(model)
    for _, layer in adalora_layers(model):
        q, p, lam = layer.factors()
        x = torch.randn(3, layer.in_features)
        want = layer.base_layer(x) + 6.0 / (4 + 1e-5) * (x @ (lam * q).t()) @ p.t()  # s·PΛQx, s = α/(init_r+1e-5)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    want = model(IDS).logits
    merge(model)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    unmerge(model)
    plain = unload(model)
    assert not adalora_layers(plain) and not [k for k in vars(plain) if k.startswith("deltatune")]
    torch.testing.assert_close(plain(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_parameter_report_counts_r_d_plus_k_plus_1() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    inject_adalora(model, AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj", "v_proj"]), total_step=10)
    rep = deltatune.parameter_report(model)
    assert rep["trainable"] == 2 * (6 * (64 + 64 + 1) + 6 * (32 + 64 + 1))  # q: 64→64, v: 64→32, 2 blocks
    assert rep["per_module"]["model.layers.0.self_attn.v_proj"] == 6 * (32 + 64 + 1) and len(rep["per_module"]) == 4
    pm = peft.get_peft_model(tiny_llama(), peft_config(peft, init_r=6, target_modules=["q_proj", "v_proj"]))
    assert (rep["trainable"], rep["total"]) == pm.get_nb_trainable_parameters()  # ranknum counted as PEFT does


def budget(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total: int) -> int:
    # Paper Eq. 11: b(t) = b_T + (b_0 − b_T)(1 − (t − t_i)/(T − t_i − t_f))³ between the warm-up and the end.
    if step <= tinit:
        return init_bgt
    if step >= total - tfinal:
        return target_bgt
    return int(target_bgt + (init_bgt - target_bgt) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3)


def train_steps(model: nn.Module, steps: int, lr: float = 1e-2, hook: bool = True, data_seed: int = 1) -> list[int]:
    """Adam steps on random tokens, the hook called after zero_grad (as the loop does); returns the
    count of non-zero λ after each step."""
    hooks = adalora_hooks(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(data_seed)
    counts = []
    model.train()
    for step in range(steps):
        ids = torch.randint(0, 128, (4, 16), generator=g)
        loss = model(ids, labels=ids).loss + extra_loss(hooks, model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hook:
            after_step(hooks, step)
        counts.append(sum(int((layer.factors()[2] != 0).sum()) for _, layer in adalora_layers(model)))
    return counts


def test_total_rank_follows_the_cubic_schedule() -> None:
    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=3, delta_t=1, target_modules=QKVO)
    model = inject_adalora(tiny_llama(), cfg, total_step=12)
    counts = train_steps(model, 14)
    want = [budget(s, 8 * 4, 8 * 1, tinit=2, tfinal=3, total=12) for s in range(14)]
    assert counts == want
    assert want[:3] == [32] * 3 and want[-1] == 8 and len(set(want)) > 5  # the schedule really moved


def test_masking_only_every_delta_t_steps() -> None:
    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=0, tfinal=0, delta_t=3, target_modules=["q_proj", "v_proj"])
    counts = train_steps(inject_adalora(tiny_llama(), cfg, total_step=9), 9)
    for step, n in enumerate(counts):
        if step % 3 == 0 and step > 0:
            assert n == budget(step, 16, 4, 0, 0, 9)
        else:
            assert n == 16  # unmasked steps: every λ is non-zero again after Adam's update


def test_allocator_state_round_trip_resumes_identically() -> None:
    from deltatune.methods.adalora import RankAllocator

    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=1, tfinal=2, target_modules=["q_proj", "v_proj"])
    models = [inject_adalora(tiny_llama(), cfg, total_step=8) for _ in range(2)]
    hooks = [adalora_hooks(m) for m in models]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    gens = [torch.Generator().manual_seed(7) for _ in models]
    for step in range(8):
        if step == 5:  # model 1 "resumes": a fresh allocator restored from the old one's state
            old = hooks[1][0]
            assert isinstance(old, RankAllocator)
            new = RankAllocator(adalora_layers(models[1]), old.config, 8)
            new.load_state_dict(old.state_dict())
            old.remove_hooks()
            hooks[1][0] = new
        for m, hs, opt, g in zip(models, hooks, opts, gens):
            ids = torch.randint(0, 128, (2, 8), generator=g)
            (m(ids, labels=ids).loss + extra_loss(hs, m)).backward()
            opt.step()
            opt.zero_grad()
            after_step(hs, step)
    for (_, a), (_, b) in zip(adalora_layers(models[0]), adalora_layers(models[1])):
        assert torch.equal(a.factors()[2], b.factors()[2]) and a.kept == b.kept


class TwoBranch(nn.Module):
    """y = big(x) + 1e-2·small(x): the loss's gradient into 'small' is 100× weaker."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(16, 16)
        self.small = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + 1e-2 * self.small(x)


def test_rank_flows_to_the_layer_with_the_larger_gradient() -> None:
    # No orthogonality term: its gradient on P, Q is the same size in both layers and would blur the contrast.
    model = inject_adalora(TwoBranch(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["big", "small"],
                                                      tinit=2, tfinal=2, orth_reg_weight=0.0), total_step=10)
    hooks = adalora_hooks(model)
    assert [h.name for h in hooks] == ["adalora_ranks"] and extra_loss(hooks, model) is None  # no orth term
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(16, 16, generator=g)
    for step in range(10):
        x = torch.randn(32, 16, generator=g)
        loss = (model(x) - x @ target).pow(2).mean()
        loss.backward()
        opt.step()
        after_step(hooks, step)
        opt.zero_grad()
    ranks = {path: sum(layer.kept or []) for path, layer in adalora_layers(model)}
    assert sum(ranks.values()) == 4  # the budget: target_r × 2 layers
    assert ranks == {"big": 4, "small": 0}  # the whole budget went to the layer that matters


def test_allocator_in_lockstep_with_peft() -> None:
    peft = pytest.importorskip("peft")
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, total_step=8, target_modules=QKVO)
    pm = peft.get_peft_model(tiny_llama(), peft_config(peft, **kw))
    model = inject_adalora(tiny_llama(), AdaLoraConfig(**kw))
    hooks = adalora_hooks(model)
    copy_from_peft(model, pm)
    opt_p = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pm.train(), model.train()
    g = torch.Generator().manual_seed(2)
    for step in range(10):
        ids = torch.randint(0, 128, (4, 16), generator=g)
        pm(input_ids=ids, labels=ids).loss.backward()  # PEFT adds the orthogonality term itself
        opt_p.step()
        pm.base_model.update_and_allocate(step)  # PEFT: after step, before zero_grad
        opt_p.zero_grad()
        (model(ids, labels=ids).loss + extra_loss(hooks, model)).backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)
        after_step(hooks, step)  # ours: after zero_grad (the loop calls it before; both work, see RankAllocator)
        theirs = dict(pm.named_parameters())
        for path, layer in adalora_layers(model):
            e_p = theirs[f"base_model.model.{path}.lora_E.default"]
            e_o = layer.factors()[2]
            assert torch.equal(e_o == 0, e_p == 0), f"step {step}: {path} masks differ"
            torch.testing.assert_close(e_o, e_p, rtol=1e-4, atol=1e-6)
    pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert pattern == {f"{p}.lora_E": layer.kept for p, layer in adalora_layers(model)}


def test_orthogonality_regulariser_naive_and_peft() -> None:
    peft = pytest.importorskip("peft")
    model = inject_adalora(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, target_modules=QKVO, orth_reg_weight=0.5),
                           total_step=10)
    layers = [layer for _, layer in adalora_layers(model)]
    norms = []
    for layer in layers:
        q, p, _ = layer.factors()
        norms += [torch.linalg.norm(q @ q.t() - torch.eye(4)), torch.linalg.norm(p.t() @ p - torch.eye(4))]
    torch.testing.assert_close(orth_regulariser(layers, "peft"), sum(norms) / len(norms))
    torch.testing.assert_close(orth_regulariser(layers, "paper"), sum(n**2 for n in norms))
    pm = peft.get_peft_model(tiny_llama(), peft_config(peft, init_r=4))
    copy_from_peft(model, pm)
    extra = pm(input_ids=IDS, labels=IDS).loss - tiny_llama()(IDS, labels=IDS).loss  # Λ = 0: only the penalty
    torch.testing.assert_close(extra_loss(adalora_hooks(model), model), extra, rtol=1e-5, atol=1e-6)


def trained(make, targets, total_step: int = 6) -> nn.Module:
    """A model whose allocator pruned to the final pattern (tfinal reached)."""
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, alpha=8.0, target_modules=targets)
    model = inject_adalora(make(), cfg, total_step=total_step)
    hooks = adalora_hooks(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(4)
    model.train()
    for step in range(total_step):
        ids = torch.randint(0, 128, (4, 16), generator=g)
        (model(ids, labels=ids).loss + extra_loss(hooks, model)).backward()
        opt.step()
        opt.zero_grad()
        after_step(hooks, step)
    return model.eval()


@pytest.mark.parametrize("make,targets", [(tiny_llama, QKVO), (tiny_gpt2, ["c_attn", "c_proj"])], ids=["llama", "gpt2"])
def test_pruned_file_loads_in_peft_with_same_logits(make, targets, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = trained(make, targets)
    ours = model(IDS).logits
    assert (ours - make()(IDS).logits).abs().max() > 1e-3
    deltatune.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    ranks = {k: sum(v) for k, v in cfg["rank_pattern"].items()}
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # pruned, unevenly
    file = deltatune.read_adapter_info(tmp_path / "a").tensors
    assert all(file[f"base_model.model.{k}"].shape[0] == r for k, r in ranks.items())  # triplets cut out
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    torch.testing.assert_close(pm(IDS).logits, ours, rtol=1e-5, atol=1e-5)
    again = deltatune.load_adapter(make(), tmp_path / "a")
    torch.testing.assert_close(again(IDS).logits, ours, rtol=1e-5, atol=1e-5)
    deltatune.save_adapter(again, tmp_path / "b")  # a loaded, already pruned adapter saves the same file
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["rank_pattern"] == cfg["rank_pattern"]


def test_peft_pruned_file_loads_in_deltatune_with_same_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, target_modules=QKVO)
    pm = peft.get_peft_model(tiny_llama(), peft_config(peft, **kw))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(5)
    pm.train()
    for step in range(6):
        ids = torch.randint(0, 128, (4, 16), generator=g)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    want = pm(IDS).logits
    pm.save_pretrained(tmp_path / "p")
    model = deltatune.load_adapter(tiny_llama(), tmp_path / "p")
    assert {layer.r for _, layer in adalora_layers(model)} != {4}  # loaded at the pruned ranks
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_file_and_config_errors(tmp_path: Path) -> None:
    model = trained(tiny_llama, ["q_proj"])
    deltatune.save_adapter(model, tmp_path / "a")
    other = tiny_llama(hidden=32)
    with pytest.raises(deltatune.AdapterMismatchError):
        deltatune.load_adapter(other, tmp_path / "a")
    assert not adalora_layers(other)
    with pytest.raises(ValueError, match="tinit"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(ValueError, match="total_step"):
        adalora_hooks(inject_adalora(tiny_llama(), AdaLoraConfig()))
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdaLoraLayer)



def test_train_two_steps_through_the_loop(model_dir: Path, tmp_path: Path) -> None:
    from deltatune.config import load_config
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import run

    sets = [f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=8", "data.num_eval=2",
            "train.batch_size=4", "train.lr=1e-2", f"output_dir={tmp_path / 'run'}", "eval.max_new_tokens=4",
            "train.bf16=false", "method=adalora", "adalora.init_r=4", "adalora.target_r=2"]
    # No max_steps: the loop derives the run length (8 rows / batch 4 = 2 steps) for the schedule.
    res = run(load_config(TrainConfig, None, sets), progress=False)
    assert res.summary["steps"] == 2
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    # Step 1 of 2 pruned to the cubic budget ⌊(16 − 8)·(1 − 1/2)³ + 8⌋ = 9 over the 4 layers.
    assert cfg["peft_type"] == "ADALORA" and cfg["total_step"] == 2
    assert sum(sum(v) for v in cfg["rank_pattern"].values()) == 9
