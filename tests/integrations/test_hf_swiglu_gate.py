"""The gate between the two GEMMs of a Hugging Face experts module on fastmoe (``hf_moe._gate_of``): fastmoe's
swiglu op where the module's gate is transformers' default with SiLU, the module's own ``_apply_gate`` for any other
activation or an overridden gate; either way the model on fastmoe matches transformers' eager experts in fp64.
Tiny random configurations are built here (no weights are downloaded)."""

import copy
import types

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed (it is pinned in requirements-dev.txt)"
)

from hf_moe_ep_cases import SMALL, VOCAB, graph_names  # noqa: E402  (the tiny config the HF tests share)
from transformers.integrations.moe import _default_apply_gate  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

import fastmoe  # noqa: E402
from fastmoe import ops  # noqa: E402
from fastmoe.integrations import hf_moe  # noqa: E402

TOL = 1e-10  # docs/numerics.md: the layers in fp64 match their plain PyTorch counterpart within 1e-10
TOP_K = 2
# name: (model class, config class, config)
ARCHS = {
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, norm_topk_prob=True, head_dim=8),
    ),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(intermediate_size=48, num_local_experts=8)),
}
SWIGLU_NODE = "SwigluFunction"  # fastmoe's swiglu in the autograd graph
GELU_NODE = "GeluBackward"


def build(arch: str, hidden_act: str = "silu") -> torch.nn.Module:
    model_class, config_class, config = ARCHS[arch]
    cfg = getattr(transformers, config_class)(
        **SMALL, **config, hidden_act=hidden_act, num_experts_per_tok=TOP_K, experts_implementation="eager"
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(cfg).double()
    # Weights far from transformers' 0.02 initialisation, so the gate's inputs reach silu's and gelu's curved part.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def experts_modules(model) -> list:
    modules = [module for _, module in hf_moe.find_hf_experts(model)]
    assert modules, "the model has no experts module"
    return modules


def has_node(names: set, fragment: str) -> bool:
    return any(fragment in name for name in names)


def assert_is_own_gate(gate, module) -> None:
    """``gate`` is ``module._apply_gate`` bound to ``module`` (a bound method is a new object at each lookup)."""
    assert getattr(gate, "__self__", None) is module, f"{gate!r} is not a method of the experts module"
    assert gate.__func__ is type(module)._apply_gate, f"{gate!r} is not the module's own _apply_gate"


# ------------------------------------------------------------------------------------------------ _gate_of


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_gate_with_silu_is_the_op(arch):
    for module in experts_modules(build(arch)):
        assert type(module)._apply_gate is _default_apply_gate
        assert hf_moe._gate_of(module) is ops.swiglu


@pytest.mark.parametrize("arch", list(ARCHS))
def test_other_activation_keeps_the_module_gate(arch):
    for module in experts_modules(build(arch, hidden_act="gelu")):
        assert_is_own_gate(hf_moe._gate_of(module), module)


def test_answer_follows_a_replaced_act_fn():
    """The kept answer is per act_fn object: a module whose act_fn is replaced gets the answer for the new one."""
    (module, *_) = experts_modules(build("qwen3_moe"))
    silu = module.act_fn
    assert hf_moe._gate_of(module) is ops.swiglu
    module.act_fn = transformers.activations.ACT2FN["gelu"]
    assert_is_own_gate(hf_moe._gate_of(module), module)
    module.act_fn = silu
    assert hf_moe._gate_of(module) is ops.swiglu


def _up_times_act(self, gate_up_out: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_out.chunk(2, dim=-1)
    return up * self.act_fn(gate)


def test_gate_set_on_the_instance_is_kept():
    """A gate bound on the instance (not the class) is the module's own gate too; removing it brings the op back."""
    (module, *_) = experts_modules(build("qwen3_moe"))
    assert hf_moe._gate_of(module) is ops.swiglu
    module._apply_gate = types.MethodType(_up_times_act, module)
    gate = hf_moe._gate_of(module)
    assert getattr(gate, "__func__", None) is _up_times_act and gate.__self__ is module
    del module._apply_gate
    assert hf_moe._gate_of(module) is ops.swiglu


def test_answer_follows_a_changed_class_gate(monkeypatch):
    """The kept answer is taken again when the class's gate function changes after a first forward."""
    (module, *_) = experts_modules(build("qwen3_moe"))
    assert hf_moe._gate_of(module) is ops.swiglu
    monkeypatch.setattr(type(module), "_apply_gate", _up_times_act)
    gate = hf_moe._gate_of(module)
    assert getattr(gate, "__func__", None) is _up_times_act
    monkeypatch.undo()
    assert hf_moe._gate_of(module) is ops.swiglu


class CountingGateExperts(Qwen3MoeExperts):
    """Qwen3-MoE's experts with a gate of their own (the same function as the default, so the eager forward, which
    does not call ``_apply_gate``, stays the reference), counting its calls."""

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        self.gate_calls = getattr(self, "gate_calls", 0) + 1
        gate, up = gate_up_out.chunk(2, dim=-1)
        return up * self.act_fn(gate)


def test_overridden_gate_is_kept_and_used():
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=32, moe_intermediate_size=24, num_experts=6, experts_implementation="eager"
    )
    torch.manual_seed(0)
    ref = CountingGateExperts(cfg).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    module = fastmoe.use_fastmoe(copy.deepcopy(ref))
    assert_is_own_gate(hf_moe._gate_of(module), module)

    tokens = 10
    x = torch.randn(tokens, 32, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(6, generator=gen)[:TOP_K] for _ in range(tokens)])
    weights = torch.rand(tokens, TOP_K, generator=gen, dtype=torch.float64)
    want, got = ref(x, idx, weights), module(x, idx, weights)
    assert getattr(ref, "gate_calls", 0) == 0, "the eager reference is expected not to call _apply_gate"
    assert module.gate_calls == 1, "fastmoe did not run the module's own _apply_gate"
    assert got.grad_fn is not None and not has_node(graph_names(got), SWIGLU_NODE)
    assert (got - want).abs().max() <= TOL
    assert want.abs().max() > 1e-2  # a comparison of zeros would prove nothing


# ------------------------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("hidden_act", ["silu", "gelu"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_swapped_model_matches_eager_fp64(arch, hidden_act):
    """Logits and every parameter's gradient on fastmoe against transformers' eager experts; with SiLU the
    experts' gate runs as fastmoe's swiglu op, with GELU as the module's own gate."""
    ref = build(arch, hidden_act)
    model = fastmoe.use_fastmoe(copy.deepcopy(ref))
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    outs = []
    for m in (ref, model):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    want, got = outs
    names = graph_names(got.logits)
    assert has_node(names, "GroupedLinearFunction"), "the model did not run on fastmoe"
    assert has_node(names, SWIGLU_NODE) == (hidden_act == "silu")
    if hidden_act == "gelu":
        assert has_node(names, GELU_NODE)
    assert (got.logits - want.logits).abs().max() <= TOL
    assert abs(got.loss.item() - want.loss.item()) <= TOL
    named = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert p.grad is not None and named[name].grad is not None, name
        assert (named[name].grad - p.grad).abs().max() <= TOL, name
    experts_grad = max(float(p.grad.abs().max()) for n, p in ref.named_parameters() if ".experts." in n)
    assert experts_grad > 1e-2  # a comparison of zeros would prove nothing
