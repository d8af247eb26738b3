"""fastmoe.use_fastmoe / restore_hf on Hugging Face MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS) with tiny random configurations built here (no weights are downloaded): in fp64 on the CPU the model
on fastmoe's experts matches transformers' own (eager) experts in logits, loss, router logits, aux loss and the
gradient of every parameter; the state dict is the same tensors before, during and after; a model trained on
fastmoe saves a checkpoint that transformers loads unchanged."""

import contextlib
import copy
import gc
import importlib.util
import io
import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed (it is pinned in requirements-dev.txt)"
)

from hf_moe_ep_cases import SMALL, VOCAB, graph_names  # noqa: E402  (the tiny config both files use)

import fastmoe  # noqa: E402
from fastmoe.integrations import hf_moe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10  # docs/numerics.md: the layers in fp64 match their plain PyTorch counterpart within 1e-10
# DeepSeek-V2 and V3: 8 routed experts and one shared expert, layer 0 dense (first_k_dense_replace), and the
# latent attention's ranks and head sizes scaled down.
DEEPSEEK = dict(
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
)
# name: (model class, config class, config, whether the model returns router logits and an aux loss)
ARCHS = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(intermediate_size=48, num_local_experts=8), True),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8),
        True,
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, norm_topk_prob=True, head_dim=8),
        True,
    ),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(intermediate_size=24, num_experts=8), True),
    # sigmoid scores + e_score_correction_bias, 4 groups of 2 experts of which the best 2 groups compete, scaled
    # by routed_scaling_factor, one shared expert, layer 0 dense (first_k_dense_replace)
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(**DEEPSEEK, n_group=4, topk_group=2, routed_scaling_factor=2.5),
        False,
    ),
    # experts stored [E, in, out] with biases, interleaved gate/up and a clamped gate of its own
    "gpt_oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(intermediate_size=24, num_local_experts=8, head_dim=8, sliding_window=8),
        True,
    ),
}
TOP_K = 2
# More architectures of the pinned transformers whose experts run through its experts interface: each keeps its own
# router, shared experts, dense layers and aux loss. name: (model class, config class, config, whether the model
# returns router logits and an aux loss that this tiny config computes).
MORE_ARCHS = {
    "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepseekV2Config", DEEPSEEK, False),
    "dots1": (
        "Dots1ForCausalLM",
        "Dots1Config",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, head_dim=8),
        False,
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8, moe_k=TOP_K, head_dim=8),
        True,
    ),
    "flex_olmo": ("FlexOlmoForCausalLM", "FlexOlmoConfig", dict(intermediate_size=24, num_experts=8), True),
    "glm4_moe": (
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, head_dim=8),
        False,
    ),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(intermediate_size=24, num_local_experts=8), False),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1ForCausalLM",
        "HunYuanMoEV1Config",
        dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, moe_topk=TOP_K, head_dim=8),
        False,
    ),
    "minimax": (
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        dict(intermediate_size=24, num_local_experts=8, head_dim=8, layer_types=["full_attention"] * 2),
        True,
    ),
    # a router that samples its experts in training mode (sparsemixer): both models draw from the same seed
    "phimoe": ("PhimoeForCausalLM", "PhimoeConfig", dict(intermediate_size=48, num_local_experts=8), True),
    "qwen3_next": (
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=8,
            head_dim=8,
            layer_types=["full_attention"] * 2,
        ),
        True,
    ),
}
SPECS = {**ARCHS, **MORE_ARCHS}
NUM_EXPERTS = 8
FASTMOE_NODE = "GroupedLinearFunction"  # fastmoe's grouped GEMM in the autograd graph


def build(arch: str, implementation: str = "eager") -> nn.Module:
    model_class, config_class, config, _ = SPECS[arch]
    cfg = getattr(transformers, config_class)(
        **SMALL, **config, num_experts_per_tok=TOP_K, experts_implementation=implementation
    )
    torch.manual_seed(0)
    return spread_weights(getattr(transformers, model_class)(cfg).double())


def spread_weights(model: nn.Module) -> nn.Module:
    """Weights far from transformers' 0.02 initialisation, so the routing and every gradient are of order one."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float64))
    return model


def token_ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, arch: str, ids: torch.Tensor):
    """Forward with labels (and router logits where the model has them), backward of loss + aux loss."""
    kwargs = dict(output_router_logits=True) if SPECS[arch][3] else {}
    out = model(input_ids=ids, labels=ids, **kwargs)
    loss = out.loss if getattr(out, "aux_loss", None) is None else out.loss + out.aux_loss
    loss.backward()
    return out


def runs_on_fastmoe(out) -> bool:
    return any(FASTMOE_NODE in name for name in graph_names(out.logits))


def experts_paths(model) -> list:
    return [path for path, _ in hf_moe.find_hf_experts(model)]


def implementations(model) -> set:
    return {module.config._experts_implementation for _, module in hf_moe.find_hf_experts(model)}


def assert_same_step(ref: nn.Module, model: nn.Module, want, got, aux: bool) -> None:
    """One training step of ``model`` (fastmoe's experts) against ``ref`` (transformers' eager experts), both in fp64:
    logits, loss, and where the model has them (aux) the aux loss and the router logits within TOL, and every
    parameter's gradient (none where transformers' has none); the experts' gradients are of order one, since a
    comparison of zeros would prove nothing."""
    assert runs_on_fastmoe(got) and not runs_on_fastmoe(want)
    assert (got.logits - want.logits).abs().max() <= TOL
    assert abs(got.loss.item() - want.loss.item()) <= TOL
    if aux:
        assert got.aux_loss is not None and abs(got.aux_loss.item() - want.aux_loss.item()) <= TOL
        for g, w in zip(got.router_logits, want.router_logits, strict=True):
            assert (g - w).abs().max() <= TOL
    named_ref, named = dict(ref.named_parameters()), dict(model.named_parameters())
    assert named.keys() == named_ref.keys()
    for name, p in named_ref.items():
        if p.grad is None:
            assert named[name].grad is None, name
            continue
        assert (named[name].grad - p.grad).abs().max() <= TOL, name
    experts = tuple(f"{path}." for path in experts_paths(ref))
    assert max(float(p.grad.abs().max()) for n, p in named_ref.items() if n.startswith(experts)) > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_transformers_fp64(arch):
    ref = build(arch)
    model = fastmoe.use_fastmoe(copy.deepcopy(ref))
    assert implementations(ref) == {"eager"} and implementations(model) == {"fastmoe"}
    moe_layers = 1 if arch == "deepseek_v3" else 2  # DeepSeek-V3's first layer is dense
    assert len(experts_paths(model)) == moe_layers

    ids = token_ids()
    want, got = run(ref, arch, ids), run(model, arch, ids)
    assert_same_step(ref, model, want, got, ARCHS[arch][3])
    if ARCHS[arch][3]:
        assert len(got.router_logits) == len(want.router_logits) == 2
        for g, w in zip(got.router_logits, want.router_logits, strict=True):
            assert g.shape == w.shape == (ids.numel(), NUM_EXPERTS)
    for name, p in ref.named_parameters():  # every parameter is reached here
        assert p.grad is not None, name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_and_save_pretrained(arch, tmp_path):
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storage = {k: v.data_ptr() for k, v in model.state_dict().items()}

    fastmoe.use_fastmoe(model)
    fastmoe.use_fastmoe(model)  # again: harmless, and restore_hf still goes back to eager
    during = model.state_dict()
    assert during.keys() == before.keys()
    for k, v in during.items():  # the same tensors, not copies
        assert v.data_ptr() == storage[k] and torch.equal(v, before[k]), k

    # One training step on fastmoe, then save: transformers loads the checkpoint without fastmoe.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert runs_on_fastmoe(run(model, arch, token_ids()))
    optimizer.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(trained[k], before[k]) for k in trained if ".experts." in k)
    model.save_pretrained(tmp_path)
    assert "fastmoe" not in (tmp_path / "config.json").read_text()
    fresh = type(model).from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager")
    assert implementations(fresh) == {"eager"}
    loaded = fresh.state_dict()
    assert loaded.keys() == trained.keys()
    for k, v in loaded.items():
        assert torch.equal(v, trained[k]), k
    ids = token_ids(seed=3)
    with torch.no_grad():
        assert (fresh(ids).logits - model(ids).logits).abs().max() <= TOL

    fastmoe.restore_hf(model)
    assert implementations(model) == {"eager"}
    after = model.state_dict()
    for k, v in after.items():
        assert v.data_ptr() == storage[k] and torch.equal(v, trained[k]), k


@pytest.mark.parametrize("arch", list(MORE_ARCHS))
def test_more_architectures_match_transformers_fp64(arch):
    """use_fastmoe on the other MoE models of the pinned transformers: in fp64 the logits, the loss (and the aux loss
    and router logits where the model has them) and every parameter's gradient equal transformers' eager experts'
    within the policy, and restore_hf goes back to them."""
    ref = build(arch)
    model = fastmoe.use_fastmoe(copy.deepcopy(ref))
    assert implementations(ref) == {"eager"} and implementations(model) == {"fastmoe"}
    assert experts_paths(model) == experts_paths(ref) and len(experts_paths(model)) >= 1

    ids = token_ids()
    steps = []
    for m in (ref, model):
        torch.manual_seed(5)  # the same draws for PhiMoE's sampling router
        steps.append(run(m, arch, ids))
    assert_same_step(ref, model, *steps, MORE_ARCHS[arch][3])
    fastmoe.restore_hf(model)
    assert implementations(model) == {"eager"}


def test_from_pretrained_names_fastmoe(tmp_path):
    build("qwen3_moe").save_pretrained(tmp_path)
    assert hf_moe.register_experts_implementation() == "fastmoe"
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, experts_implementation="fastmoe"
    )
    assert implementations(model) == {"fastmoe"}
    assert runs_on_fastmoe(run(model, "qwen3_moe", token_ids()))
    fastmoe.restore_hf(model)  # nothing recorded before: transformers' default
    assert implementations(model) == {"grouped_mm"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_fp32_within_policy_of_transformers_grouped_mm(arch):
    """docs/numerics.md: in fp32, fastmoe's error against the fp64 model is at most twice that of transformers'
    fp32 grouped_mm (its default) against it, in logits and in every parameter's gradient."""
    ref64 = build(arch)
    hf32 = copy.deepcopy(ref64).float()
    hf32.set_experts_implementation("grouped_mm")
    fm32 = fastmoe.use_fastmoe(copy.deepcopy(hf32))
    ids = token_ids()
    outs = [run(m, arch, ids) for m in (ref64, hf32, fm32)]
    assert runs_on_fastmoe(outs[2]) and not runs_on_fastmoe(outs[1])
    floor = 1e-6  # a few fp32 ulps, for values both compute exactly
    assert _rel(outs[2].logits, outs[0].logits) <= 2 * _rel(outs[1].logits, outs[0].logits) + floor
    for (name, p64), p_hf, p_fm in zip(ref64.named_parameters(), hf32.parameters(), fm32.parameters(), strict=True):
        assert _rel(p_fm.grad, p64.grad) <= 2 * _rel(p_hf.grad, p64.grad) + floor, name


def test_bf16_and_autocast_within_policy():
    """A bf16 model, and an fp32 model under CPU autocast to bf16: fastmoe returns what transformers returns (its
    dtype, within twice transformers' own error against the fp64 model)."""
    arch = "qwen3_moe"
    ref64 = build(arch)
    ids = token_ids()
    want = run(ref64, arch, ids).logits
    hf16 = copy.deepcopy(ref64).bfloat16()
    hf16.set_experts_implementation("grouped_mm")
    fm16 = fastmoe.use_fastmoe(copy.deepcopy(hf16))
    hf32 = copy.deepcopy(ref64).float()
    fm32 = fastmoe.use_fastmoe(copy.deepcopy(hf32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = [run(m, arch, ids) for m in (hf32, fm32)]
    for hf, fm in ((run(hf16, arch, ids), run(fm16, arch, ids)), autocast):
        assert runs_on_fastmoe(fm) and not runs_on_fastmoe(hf)
        assert fm.logits.dtype == hf.logits.dtype == torch.bfloat16
        assert _rel(fm.logits, want) <= 2 * _rel(hf.logits, want) + 1e-3


ROUTED = {"mixtral": "topk_softmax", "qwen2_moe": "softmax_topk", "qwen3_moe": "topk_softmax", "olmoe": "softmax_topk"}


def _no_ties(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens whose k + 1 largest logits are distinct (their top k and its order do not depend on tie-breaking)."""
    top = logits.float().topk(k + 1, dim=-1).values
    return (top[:, :-1] > top[:, 1:]).all(dim=-1)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (route_topk's kernel)"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_routers_run_route_topk_in_16_bit(arch, device):
    """use_fastmoe gives the routers of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (softmax in fp32, top k, optional
    renormalisation) fastmoe's route_topk: in bf16 the same experts and the same scores (rounded from fp32 alike) as
    the router's own forward, gradients within the bf16 policy; in fp32 and fp64 the router's own forward runs.
    DeepSeek-V3's (sigmoid, groups, a correction bias) and GPT-OSS's (a bias) are left alone. restore_hf and
    a second use_fastmoe put the router's forward back and fuse it once."""
    ref = build(arch).bfloat16().to(device)
    model = fastmoe.use_fastmoe(copy.deepcopy(ref))
    gates = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    assert hf_moe.fused_routers(model) == (gates if arch in ROUTED else [])
    if arch not in ROUTED:
        return
    assert fastmoe.use_fastmoe(model) is model and hf_moe.fused_routers(model) == gates
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(64, SMALL["hidden_size"], generator=gen).bfloat16().to(device)
    for path in gates:
        hf_router, router = ref.get_submodule(path), model.get_submodule(path)
        assert router.forward.score_fn == ROUTED[arch]
        outs, grads = [], []
        for r in (hf_router, router):
            x = h.clone().requires_grad_()
            logits, scores, idx = r(x)
            c = torch.randn(scores.shape, generator=torch.Generator().manual_seed(7)).to(device, scores.dtype)
            (scores * c).sum().backward()
            outs.append((logits, scores, idx))
            grads.append((x.grad, r.weight.grad))
            r.weight.grad = None
        (l0, s0, i0), (l1, s1, i1) = outs
        assert torch.equal(l0, l1) and s0.dtype == s1.dtype and i1.dtype == torch.int64
        clean = _no_ties(l0, TOP_K)
        assert clean.sum() >= 48, "the probe input has too many ties to compare"
        assert torch.equal(i0[clean], i1[clean])
        assert torch.allclose(s0[clean].double(), s1[clean].double(), rtol=2.0**-7, atol=0)
        for g0, g1 in zip(grads[0], grads[1], strict=True):
            assert _rel(g1, g0) <= 1e-2, (path, _rel(g1, g0))
        # fp32: the router's own forward (its fp32 softmax), bit for bit
        x32 = h.float()
        for a, b in zip(copy.deepcopy(hf_router).float()(x32), copy.deepcopy(router).float()(x32), strict=True):
            assert torch.equal(a, b)
    # fuse_routers=False puts the routers' own forward back, and True fuses them again
    assert hf_moe.fused_routers(fastmoe.use_fastmoe(model, fuse_routers=False)) == []
    assert hf_moe.fused_routers(fastmoe.use_fastmoe(model)) == gates
    with pytest.raises(TypeError, match="fuse_routers must be True or False, got fuse_routers=1"):
        fastmoe.use_fastmoe(model, fuse_routers=1)
    # a copy's routers are fused to the copy; restore_hf puts the class's forward back
    twin = copy.deepcopy(model)
    assert all(twin.get_submodule(p).forward.router is twin.get_submodule(p) for p in gates)
    fastmoe.restore_hf(model)
    assert hf_moe.fused_routers(model) == [] and "forward" not in vars(model.get_submodule(gates[0]))


def _experts(kind: str):
    if kind == "no_gate":  # Nemotron-H: up_proj [E, I, H], relu^2, no gate
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        cfg = transformers.NemotronHConfig(
            hidden_size=32, moe_intermediate_size=24, n_routed_experts=6, experts_implementation="eager"
        )
        module = NemotronHExperts(cfg)
    else:  # GPT-OSS: transposed weights with biases, interleaved gate/up
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        cfg = transformers.GptOssConfig(
            hidden_size=32, intermediate_size=24, num_local_experts=6, experts_implementation="eager"
        )
        module = GptOssExperts(cfg)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.double()


@pytest.mark.parametrize("kind", ["no_gate", "transposed_bias"])
def test_experts_module_layouts_and_ep_sentinels(kind):
    """An experts module on its own against transformers' batched_mm, with ids at num_experts (the slots
    transformers' expert parallelism sends to other ranks, with zero weight; its eager forward cannot take them):
    fastmoe drops them, batched_mm multiplies them by zero."""
    ref = _experts(kind)
    ref.config._experts_implementation_internal = "batched_mm"
    module = fastmoe.use_fastmoe(copy.deepcopy(ref))
    assert experts_paths(module) == [""]
    gen = torch.Generator().manual_seed(5)
    tokens, num_experts = 10, ref.num_experts
    x = torch.randn(tokens, 32, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=gen, dtype=torch.float64)
    idx[::3, 1] = num_experts  # the sentinel
    weights[::3, 1] = 0.0
    outs = []
    for m in (ref, module):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = m(xi, idx, wi)
        y.pow(2).sum().backward()
        outs.append((y, xi.grad, wi.grad, [p.grad for p in m.parameters()]))
    (y0, gx0, gw0, gp0), (y1, gx1, gw1, gp1) = outs
    assert any(FASTMOE_NODE in n for n in graph_names(y1)) and not any(FASTMOE_NODE in n for n in graph_names(y0))
    assert (y1 - y0).abs().max() <= TOL and y1.dtype == x.dtype
    assert (gx1 - gx0).abs().max() <= TOL
    mask = idx < num_experts  # a dropped slot's weight gets no gradient; batched_mm computes one for it
    assert (gw1[mask] - gw0[mask]).abs().max() <= TOL
    for a, b in zip(gp1, gp0, strict=True):
        assert (a - b).abs().max() <= TOL


def test_bad_input_errors_name_the_argument():
    with pytest.raises(TypeError, match="model must be an nn.Module, got model of type str"):
        fastmoe.use_fastmoe("mixtral")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastmoe.restore_hf(None)
    with pytest.raises(ValueError, match=r"model \(torch.nn.modules.linear.Linear\) has no experts module"):
        fastmoe.use_fastmoe(nn.Linear(4, 4))
    model = build("mixtral")
    with pytest.raises(ValueError, match=r"model \(.*MixtralForCausalLM\) has no experts module running on fastmoe"):
        fastmoe.restore_hf(model)

    # a layout the grouped GEMM cannot take: named by its path, and nothing is switched
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = nn.Parameter(torch.zeros(NUM_EXPERTS, 48, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts .*gate_up_proj has dtype torch\.int8"):
        fastmoe.use_fastmoe(model)
    assert implementations(model) == {"eager"}

    module = fastmoe.use_fastmoe(build("mixtral").model.layers[0].mlp.experts)
    x = torch.randn(4, 32, dtype=torch.float64)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    w = torch.full((4, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"hidden_states must be \[tokens, hidden\], got \(1, 4, 32\)"):
        module(x[None], idx, w)
    with pytest.raises(ValueError, match=r"top_k_index must be \[tokens, k\], got \(8,\)"):
        module(x, idx.flatten(), w)
    with pytest.raises(TypeError, match="top_k_index must hold integer expert ids, got dtype torch.float64"):
        module(x, idx.double(), w)
    with pytest.raises(ValueError, match=r"top_k_weights must be \[tokens, k\] = \[4, 2\] like top_k_index"):
        module(x, idx, w[:, :1])
    with pytest.raises(RuntimeError, match="topk_idx"):  # fastmoe's token path names the ids it got
        module(x, idx - 3, w)


def _load_script(path: str):
    """The module of a script of this repository (a benchmark or a tool), by its path from the root."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tiny_runs():
    """benchmarks/bench_hf_moe.py --tiny: every configuration and implementation runs a training step on the CPU,
    and all implementations compute the same loss on the same weights."""
    bench = _load_script("benchmarks/bench_hf_moe.py")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        records = bench.main(["--tiny", "--iters", "1", "--warmup", "0"])
    assert [(r["config"], r["impl"]) for r in records] == [
        (f"{c}-tiny", impl) for c in ("qwen3_moe", "mixtral") for impl in ("eager", "grouped_mm", "fastmoe")
    ]
    for r in records:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["tokens"] == 16
        assert r["loss_rel_diff_vs_fastmoe"] < 1e-5, r
        assert r["hf_fastest"] in ("eager", "grouped_mm")
    text = printed.getvalue()
    assert text.count("/ fastmoe = ") == 2, text
    # --block: one MoE block on random hidden states
    with contextlib.redirect_stdout(io.StringIO()):
        block = bench.main(["--tiny", "--block", "--configs", "mixtral", "--iters", "1", "--warmup", "0"])
    assert [(r["config"], r["impl"]) for r in block] == [
        ("mixtral-tiny-block", impl) for impl in ("eager", "grouped_mm", "fastmoe")
    ]
    assert all(r["loss_rel_diff_vs_fastmoe"] < 1e-5 and r["shape"]["num_hidden_layers"] == 1 for r in block), block
    json.dumps(records)  # the records are what --json writes


def test_benchmark_times_fastmoe_with_transformers_routers():
    """--impls fastmoe_hf_routers: fastmoe's experts with transformers' routers, left out of the ratio (which is
    transformers' fastest against fastmoe)."""
    bench = _load_script("benchmarks/bench_hf_moe.py")
    argv = ["--tiny", "--configs", "qwen3_moe", "--impls", "grouped_mm,fastmoe,fastmoe_hf_routers", "--iters", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        records = bench.main([*argv, "--warmup", "0"])
    assert [r["impl"] for r in records] == ["grouped_mm", "fastmoe", "fastmoe_hf_routers"]
    assert all(r["hf_fastest"] == "grouped_mm" for r in records), records
    assert records[2]["loss_rel_diff_vs_fastmoe"] < 1e-6, records[2]


def test_benchmark_rounds_alternate_the_implementations():
    """--rounds N: each implementation is timed N times, the order reversed every other round, and the record keeps
    each round's median beside the median over all rounds."""
    bench = _load_script("benchmarks/bench_hf_moe.py")
    printed = io.StringIO()
    argv = ["--tiny", "--configs", "mixtral", "--impls", "grouped_mm,fastmoe", "--iters", "2", "--warmup", "0"]
    with contextlib.redirect_stdout(printed):
        records = bench.main([*argv, "--rounds", "3"])
    order = [line.split()[2] for line in printed.getvalue().splitlines() if line.lstrip().startswith("round ")]
    assert order == ["grouped_mm", "fastmoe", "fastmoe", "grouped_mm", "grouped_mm", "fastmoe"], printed.getvalue()
    for r in records:
        assert r["rounds"] == 3 and len(r["ms_rounds"]) == 3, r
        assert r["ms_min"] <= min(r["ms"], *r["ms_rounds"]), r
    bad_flags = [(["--rounds", "0"], "--rounds"), (["--warmup", "-1"], "--warmup")]
    bad_flags += [([flag, "0"], flag) for flag in ("--iters", "--batch", "--seq")]  # 0 is refused, not the default
    for bad, flag in bad_flags:
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            bench.parse_args(["--tiny", *bad])
        assert f"{flag} must be >= " in err.getvalue(), err.getvalue()


def test_profile_tool_checks_its_arguments():
    """tools/profile_hf_step.py names a bad flag and its value, and refuses to run without a GPU."""
    tool = _load_script("tools/profile_hf_step.py")
    args = tool.parse_args(["--impls", "fastmoe,eager", "--steps", "3"])
    assert args.impls == ["fastmoe", "eager"] and args.steps == 3 and args.config == "qwen3_moe"
    for argv, words in (
        (["--impls", "fastmoe,nope"], "unknown implementation 'nope'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--layers", "-2"], "--layers must be >= 1, got -2"),
        (["--impls", "fastmoe", "--diff"], "give at least two in --impls, got 'fastmoe'"),
        (["--diff", "--sync-check"], "--diff and --sync-check are different runs"),
        (["--gaps", "--diff"], "--diff and --gaps are different runs"),
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
            tool.parse_args(argv)
        assert words in err.getvalue(), err.getvalue()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            tool.main([])


def test_profile_tool_diff_lists_what_one_implementation_adds(capsys):
    """--diff keeps the kernels whose calls or time differ (per step) and drops those both runs share."""
    tool = _load_script("tools/profile_hf_step.py")

    def event(key, count, total):
        return types.SimpleNamespace(key=key, count=count, device_time_total=total)

    ours = tool.kernel_times([event("gemm", 12, 6000.0), event("attention", 4, 800.0), event("permute", 4, 300.0)], 2)
    theirs = tool.kernel_times([event("gemm", 12, 6100.0), event("attention", 4, 801.0), event("cpu_op", 3, 0.0)], 2)
    assert ours == {"gemm": (6, 3000.0), "attention": (2, 400.0), "permute": (2, 150.0)}
    assert "cpu_op" not in theirs  # no GPU time
    tool.print_diff("qwen3_moe", {"fastmoe": ours, "grouped_mm": theirs}, rows=10)
    out = capsys.readouterr().out
    assert "fastmoe: 3.550 ms of kernels a step" in out and "grouped_mm: 3.450 ms" in out, out
    lines = [line for line in out.splitlines() if line.rstrip().endswith(("gemm", "permute", "attention"))]
    assert [line.split()[-1] for line in lines] == ["permute", "gemm"], out  # attention: within 1%, same calls
    assert lines[0].split()[0] == "150.0" and lines[1].split()[0] == "-50.0", out


def test_profile_tool_gaps_finds_the_gpu_idle_stretches(capsys):
    """--gaps merges overlapping activities, and reports the idle time between them with the kernels around it."""
    tool = _load_script("tools/profile_hf_step.py")
    # two steps: a 10 us gap after "b" (which overlaps "a"), a 40 us gap after "c", a 5 us gap after "d"
    spans = [(0.0, 100.0, "a"), (50.0, 120.0, "b"), (130.0, 200.0, "c"), (240.0, 300.0, "d"), (305.0, 400.0, "e")]
    tool.print_gaps("qwen3_moe fastmoe", spans, steps=2, rows=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "qwen3_moe fastmoe: GPU busy 0.172 ms and idle 0.028 ms a step (1.5 idle stretches a step)", out
    assert len(out) == 3, out  # the two longest stretches only
    assert out[1].split()[:2] == ["40.0", "us"] and "after c" in out[1] and "before d" in out[1], out
    assert out[2].split()[:2] == ["10.0", "us"] and "after b" in out[2] and "before c" in out[2], out
    from torch.autograd import DeviceType

    def event(device, start, end, name):
        return types.SimpleNamespace(
            device_type=device, time_range=types.SimpleNamespace(start=start, end=end), name=name
        )

    events = [
        event(DeviceType.CUDA, 9.0, 12.0, "k2"),
        event(DeviceType.CPU, 0.0, 50.0, "op"),
        event(DeviceType.CUDA, 1.0, 4.0, "k1"),
    ]
    assert tool.gpu_intervals(events) == [(1.0, 4.0, "k1"), (9.0, 12.0, "k2")]  # GPU activity only, by start
    tool.print_gaps("none", [], steps=1, rows=3)
    assert "no GPU activity" in capsys.readouterr().out


def test_profile_tool_gaps_counts_host_stalls_a_step(capsys):
    """--gaps also prints, a step, the allocator's device allocations and frees and the garbage collections."""
    tool = _load_script("tools/profile_hf_step.py")
    before = {"cudaMalloc": 3, "cudaFree": 1, "gc generation 2": 10}
    after = {"cudaMalloc": 7, "cudaFree": 1, "gc generation 2": 11}
    tool.print_counts("qwen3_moe fastmoe", before, after, steps=2)
    assert capsys.readouterr().out.strip() == (
        "qwen3_moe fastmoe: a step: cudaMalloc 2, cudaFree 0, gc generation 2 0.5"
    )
    if torch.cuda.is_available():
        counts = tool.stall_counters()
        assert {"cudaMalloc", "cudaFree", "allocation retries", "gc generation 2"} <= set(counts), counts


def test_benchmark_manual_gc_collects_outside_the_timed_steps():
    """time_steps(manual_gc=True): automatic collection is off while the steps run, one full collection runs before
    each timed step (none in the warm-up), and the collector's previous state comes back afterwards, also when a
    step raises."""
    bench = _load_script("benchmarks/bench_hf_moe.py")
    seen = []

    def step():
        seen.append(gc.isenabled())

    collections = []
    gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "start" else None)
    try:
        assert gc.isenabled()
        times = bench.time_steps(step, 3, 2, torch.device("cpu"), manual_gc=True)
        assert len(times) == 3 and all(t >= 0 for t in times), times
        assert seen == [False] * 5, seen
        assert gc.isenabled()
        assert collections.count(2) >= 3, collections  # one full collection per timed step
        seen.clear()
        bench.time_steps(step, 2, 0, torch.device("cpu"))
        assert seen == [True, True], seen  # the default leaves the collector alone

        def failing():
            raise RuntimeError("step failed")

        with pytest.raises(RuntimeError, match="step failed"):
            bench.time_steps(failing, 1, 0, torch.device("cpu"), manual_gc=True)
        assert gc.isenabled()
        gc.disable()
        bench.time_steps(step, 1, 0, torch.device("cpu"), manual_gc=True)
        assert not gc.isenabled()  # was off before: stays off
    finally:
        gc.enable()
        gc.callbacks.pop()
