"""Scripts written from FastMoE's documented API, as a FastMoE user ports them with ``import fastmoe as fmoe``:
custom experts with FastMoE's ``forward(inp, fwd_expert_count)``, ``expert_fn`` overrides, FastMoE's keyword
spellings, lists of expert classes, ZeroGate, DCGate, ``mark_module_parallel_comm`` and multi-input (tuple, list,
dict) layers. Results are compared with plain-PyTorch loops over the tokens. The expert-parallel cases are in
test_fastmoe_compat_ep.py."""

import functools

import pytest
import torch
import torch.nn.functional as F
from compat_cases import CountingExpert, DictGate, LoopMoE, PairExpert
from torch import nn

import fastmoe as fmoe
from conftest import mentions
from fastmoe.gates import DCGate, GShardGate, NaiveGate, SwitchGate, ZeroGate
from fastmoe.layers import mark_module_parallel_comm
from fastmoe.transformer import _Expert

D = 6
TOL = {"rtol": 1e-10, "atol": 1e-10}


def tokens(n=11, width=D, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_moe(x, topk_idx, topk_score, run_expert):
    """``y[t] = sum_j score[t, j] * expert_{idx[t, j]}(x[t])`` token by token (dropped slots add nothing)."""
    rows = []
    for t in range(x.shape[0]):
        total = 0
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[t, j])
            if e >= 0:
                total = total + topk_score[t, j] * run_expert(e, x[t : t + 1])[0]
        rows.append(total)
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------- 1. experts


def test_custom_expert_with_fastmoe_forward_signature():
    """FastMoE calls each expert as ``experts[i](rows, torch.tensor([count_i]))``; fastmoe does the same for a
    forward with that second parameter, and the layer equals the token-by-token reference."""
    torch.manual_seed(0)
    layer = fmoe.FMoE(num_expert=3, d_model=D, top_k=2, expert=CountingExpert).double().eval()
    x = tokens()
    y = layer(x)
    idx, score = layer.gate(x)
    want = reference_moe(x, idx, score, lambda e, rows: layer.experts[e](rows, torch.tensor([rows.shape[0]])))
    torch.testing.assert_close(y, want, **TOL)
    seen = [call for expert in layer.experts for call in expert.seen[:1]]  # the layer's calls come first
    assert sum(n for n, _ in seen) == x.shape[0] * 2
    for num_rows, count in seen:
        assert count.dtype == torch.int64 and count.shape == (1,) and count.device.type == "cpu"
        assert int(count) == num_rows


def test_fastmoe_transformer_expert_as_one_expert_per_module():
    """FastMoE's FMoETransformerMLP builds ``_Expert(1, d_model, d_hidden, activation, rank=0)`` per expert and
    calls it with ``(rows, count)``; the same script works here."""
    torch.manual_seed(1)
    layer = fmoe.FMoE(
        num_expert=4, d_model=D, top_k=2, expert=lambda d: _Expert(1, d, 10, torch.nn.GELU(), rank=0)
    ).double()
    x = tokens(seed=1)
    y = layer(x)
    idx, score = layer.gate(x)

    def mlp(e, rows):
        expert = layer.experts[e]
        h = F.gelu(rows @ expert.htoh4.weight[0].t() + expert.htoh4.bias[0])
        return h @ expert.h4toh.weight[0].t() + expert.h4toh.bias[0]

    torch.testing.assert_close(y, reference_moe(x, idx, score, mlp), **TOL)


class RowsOnly(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(None)
        return x * 2


class OptionalCount(RowsOnly):
    def forward(self, x, fwd_expert_count=None):
        self.calls.append(fwd_expert_count)
        return x * 2


class OptionalMask(RowsOnly):
    def forward(self, x, mask=None):
        self.calls.append(mask)
        return x * 2


class VarArgs(RowsOnly):
    def forward(self, *args):
        self.calls.append(args[1] if len(args) > 1 else None)
        return args[0] * 2


@pytest.mark.parametrize(
    "cls, gets_count",
    [(RowsOnly, False), (CountingExpert, True), (OptionalCount, True), (OptionalMask, False), (VarArgs, False)],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_which_experts_get_the_count(cls, gets_count):
    """The rule: a count when forward's second positional parameter is required or is named fwd_expert_count."""
    layer = fmoe.FMoE(num_expert=2, d_model=D, top_k=1, expert=cls).double()
    layer(tokens(6))
    calls = [c for e in layer.experts for c in (e.calls if hasattr(e, "calls") else e.seen)]
    assert calls
    for call in calls:
        count = call[1] if isinstance(call, tuple) else call
        assert isinstance(count, torch.Tensor) == gets_count, (cls.__name__, call)


def test_expert_signatures_are_read_when_the_layer_is_built(monkeypatch):
    """No signature is read per forward; a replaced ``self.experts`` is read again once."""
    import fastmoe._fastmoe_api as fastmoe_api

    reads = []
    real = fastmoe_api.inspect.signature
    monkeypatch.setattr(fastmoe_api.inspect, "signature", lambda fn: reads.append(fn) or real(fn))
    layer = fmoe.FMoE(num_expert=2, d_model=D, top_k=1, expert=RowsOnly).double()
    built = len(reads)
    assert built >= 2
    layer(tokens(5))
    layer(tokens(5))
    assert len(reads) == built
    layer.experts = nn.ModuleList([CountingExpert(D).double() for _ in range(2)])
    layer(tokens(5))
    layer(tokens(5))
    assert len(reads) == built + 2
    assert all(isinstance(count, torch.Tensor) for e in layer.experts for _, count in e.seen)


# ----------------------------------------------------------------------------------------------- 2. expert_fn


def capacity_gate(d_model, num_expert, world_size, top_k, gate_bias=True):
    """GShardGate with a small capacity: dropped slots leave unrouted rows at the tail of the sorted rows."""
    return GShardGate(d_model, num_expert, world_size, topk=top_k, capacity=(0.5, 0.5), random_routing=False)


def test_two_argument_expert_fn_override():
    """FastMoE's ``expert_fn(self, inp, fwd_expert_count)`` override is called with the routed rows and the
    per-expert counts; it gives the plain layer's output (scaled by its factor 2) and gradients."""
    torch.manual_seed(2)
    custom = LoopMoE(num_expert=4, d_model=D, top_k=2, gate=capacity_gate, expert=lambda d: nn.Linear(d, d))
    plain = fmoe.FMoE(num_expert=4, d_model=D, top_k=2, gate=capacity_gate, expert=lambda d: nn.Linear(d, d))
    custom, plain = custom.double(), plain.double()
    plain.load_state_dict(custom.state_dict())
    x = tokens(13, seed=2)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = custom(x1)
    assert int(custom.gate.num_dropped) > 0  # the sorted rows have an unrouted tail
    torch.testing.assert_close(y, 2 * plain(x2), **TOL)
    y.sum().backward()
    (2 * plain(x2)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for (name, p1), p2 in zip(custom.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_three_argument_expert_fn_override_gets_the_offsets():
    calls = []

    class WithOffsets(fmoe.FMoE):
        def expert_fn(self, inp, fwd_expert_count, expert_offsets=None):
            calls.append(expert_offsets)
            return super().expert_fn(inp, fwd_expert_count, expert_offsets)

    layer = WithOffsets(num_expert=3, d_model=D, top_k=2, expert=lambda d: nn.Linear(d, d)).double()
    layer(tokens(5))
    assert len(calls) == 1 and calls[0].tolist()[-1] == 10


# ----------------------------------------------------------------------------------------------- 3. keywords


@pytest.mark.parametrize(
    "cls, k", [(GShardGate, 2), (SwitchGate, 1), (DCGate, 2)], ids=["GShardGate", "SwitchGate", "DCGate"]
)
def test_gates_take_fastmoe_topk(cls, k):
    torch.manual_seed(3)
    a = cls(D, 4, 1, topk=k).double().eval()
    b = cls(D, 4, 1, k).double().eval()
    b.load_state_dict(a.state_dict())
    x = tokens(9, seed=3)
    for got, want in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert cls(D, 4, 1, top_k=k, topk=k).top_k == k  # both, equal: accepted
    with pytest.raises(ValueError, match=mentions("top_k=1", "topk=3")):
        cls(D, 4, 1, top_k=1, topk=3)
    with pytest.raises(ValueError, match=mentions("top_k", "5")):
        cls(D, 4, 1, topk=5)


def test_gate_partial_with_topk_in_a_layer():
    """FastMoE scripts pass configured gates as ``functools.partial(GShardGate, topk=2, ...)``."""
    torch.manual_seed(4)
    gate = functools.partial(GShardGate, topk=2, capacity=(2.0, 2.0))
    layer = fmoe.FMoE(num_expert=4, d_model=D, top_k=2, gate=gate, expert=lambda d: nn.Linear(d, d)).double()
    assert isinstance(layer.gate, GShardGate) and layer.gate.capacity == (2.0, 2.0)
    assert layer(tokens(7)).shape == (7, D)
    with pytest.raises(ValueError, match=mentions("top_k=1", "topk=2")):
        fmoe.FMoE(num_expert=4, d_model=D, top_k=1, gate=gate, expert=lambda d: nn.Linear(d, d))
    no_bias = fmoe.FMoE(num_expert=4, d_model=D, gate=gate, gate_bias=False, expert=lambda d: nn.Linear(d, d))
    assert no_bias.gate.gate.bias is None  # FMoE's gate_bias reaches a partial of a NaiveGate-family gate


def test_fastmoe_fused_expert_with_rank():
    """FastMoE's test models assign ``self.experts = _Expert(num_expert, d_model, d_hidden, activation,
    rank=0)`` in an FMoE subclass; that layer equals FMoETransformerMLP with the same weights."""

    class MyMoE(fmoe.FMoE):
        def __init__(self, num_expert, d_model, d_hidden, top_k, activation):
            super().__init__(num_expert=num_expert, d_model=d_model, top_k=top_k)
            self.experts = _Expert(num_expert, d_model, d_hidden, activation, rank=0)

    torch.manual_seed(5)
    mine = MyMoE(4, D, 10, 2, torch.nn.GELU()).double()
    mlp = fmoe.FMoETransformerMLP(4, D, 10, activation=torch.nn.GELU(), top_k=2).double()
    mlp.load_state_dict(mine.state_dict())
    x = tokens(seed=5)
    torch.testing.assert_close(mine(x), mlp(x), **TOL)


# ----------------------------------------------------------------------------------------------- 4. expert lists


class Doubler(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.full((d,), 2.0))

    def forward(self, x):
        return x * self.scale


def mlp_expert(d):
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, d))


@pytest.mark.parametrize("num_expert", [None, "default"])
def test_list_of_expert_classes_sets_num_expert(num_expert):
    """``FMoE(num_expert=None, expert=[A, B, C])`` (or the default num_expert) builds one expert per entry, of
    its own class, and each expert computes its own function."""
    kwargs = {} if num_expert == "default" else {"num_expert": num_expert}
    torch.manual_seed(6)
    layer = fmoe.FMoE(d_model=D, top_k=2, expert=[Doubler, CountingExpert, mlp_expert], **kwargs).double()
    assert layer.num_expert == 3 and layer.num_experts_total == 3
    assert [type(e).__name__ for e in layer.experts] == ["Doubler", "CountingExpert", "Sequential"]
    x = tokens(seed=6)
    y = layer(x)
    idx, score = layer.gate(x)

    def run(e, rows):
        module = layer.experts[e]
        return module(rows, torch.tensor([rows.shape[0]])) if e == 1 else module(rows)

    torch.testing.assert_close(y, reference_moe(x, idx, score, run), **TOL)


def test_expert_list_length_and_num_expert_must_agree():
    with pytest.raises(ValueError, match=mentions("list of 3", "num_expert=2")):
        fmoe.FMoE(num_expert=2, d_model=D, expert=[Doubler] * 3)
    with pytest.raises(ValueError, match=mentions("num_expert", "None")):
        fmoe.FMoE(num_expert=None, d_model=D, expert=Doubler)
    with pytest.raises(ValueError, match=mentions("expert", "empty")):
        fmoe.FMoE(num_expert=None, d_model=D, expert=[])
    # an explicit 32 is not the default: it must match the list
    with pytest.raises(ValueError, match=mentions("list of 2", "num_expert=32")):
        fmoe.FMoE(num_expert=32, d_model=D, expert=[Doubler] * 2)


# ----------------------------------------------------------------------------------------------- 5. names


def test_zero_gate_sends_everything_to_expert_zero():
    gate = ZeroGate(D, 4, 1, top_k=2)
    x = tokens(5).float()
    idx, score = gate(x)
    assert idx.shape == (5, 2) and idx.dtype == torch.int64 and int(idx.abs().sum()) == 0
    assert score.shape == (5, 2) and score.dtype == torch.float32 and torch.all(score == 0.5)

    torch.manual_seed(7)
    layer = fmoe.FMoE(num_expert=4, d_model=D, top_k=2, gate=ZeroGate, expert=mlp_expert).double()
    x = tokens(seed=7).requires_grad_(True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    want = layer.experts[0](x_ref)
    torch.testing.assert_close(y, want, **TOL)
    y.sum().backward()
    grads = [p.grad.clone() for p in layer.experts[0].parameters()]
    layer.zero_grad()
    want.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    for got, p in zip(grads, layer.experts[0].parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, **TOL)
    assert all(p.grad is None for e in layer.experts[1:] for p in e.parameters())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dc_gate_in_one_process_is_gshard(training):
    """With one rank the group's capacity is the rank's: DCGate routes, drops and scores as GShardGate
    (random routing included, from the same generator state)."""
    torch.manual_seed(8)
    dc = DCGate(D, 4, 1, topk=2, capacity=(0.5, 0.5)).double().train(training)
    gshard = GShardGate(D, 4, 1, 2, capacity=(0.5, 0.5)).double().train(training)
    gshard.load_state_dict(dc.state_dict())
    x = tokens(16, seed=8)
    torch.manual_seed(9)
    idx, score = dc(x)
    torch.manual_seed(9)
    idx_g, score_g = gshard(x)
    assert torch.equal(idx, idx_g) and int(dc.num_dropped) == int(gshard.num_dropped) > 0
    torch.testing.assert_close(score, score_g, rtol=0, atol=0)
    torch.testing.assert_close(dc.get_loss(), gshard.get_loss(), rtol=0, atol=0)


def test_dc_gate_with_world_size_needs_a_process_group():
    gate = DCGate(D, 2, 2, 2)
    with pytest.raises(RuntimeError, match=mentions("world_size=2", "init_process_group")):
        gate(tokens(4).float())
    with pytest.raises(TypeError, match=mentions("moe_group", "'g'")):
        DCGate(D, 2, 2, 2, moe_group="g")


def test_mark_module_parallel_comm():
    model = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D))
    mark_module_parallel_comm(model, "world")
    assert [p.dp_comm for p in model.parameters()] == ["world"] * 4
    layer = fmoe.FMoE(num_expert=2, d_model=D, expert=lambda d: nn.Linear(d, d))
    layer.mark_parallel_comm("dp")
    assert {p.dp_comm for p in layer.experts.parameters()} == {"dp"}
    assert {p.dp_comm for p in layer.gate.parameters()} == {"gate"}
    with pytest.raises(TypeError, match=mentions("comm", "None")):
        mark_module_parallel_comm(model, None)


# ----------------------------------------------------------------------------------------------- 5. pytrees


def test_dict_input_routes_every_tensor_the_same_way():
    """FastMoE's MIMO layers: the gate gets the whole dict (DictGate routes on ``inp["x"]``), each expert the dict
    of its rows, and every output tensor is combined with the same routing; the result equals the reference."""
    torch.manual_seed(10)
    layer = fmoe.FMoE(num_expert=3, d_model=D, top_k=2, gate=DictGate, expert=PairExpert).double()
    x, side = tokens(8, seed=10), tokens(8, 3, seed=11)
    x_in, side_in = x.clone().requires_grad_(True), side.clone().requires_grad_(True)
    out = layer({"x": x_in, "side": side_in})
    idx, score = layer.gate({"x": x})
    want_x = reference_moe(x, idx, score, lambda e, rows: layer.experts[e].fc(rows))
    want_side = reference_moe(side, idx, score, lambda e, rows: torch.relu(layer.experts[e].side(rows)))
    torch.testing.assert_close(out["x"], want_x, **TOL)
    torch.testing.assert_close(out["side"], want_side, **TOL)
    (out["x"].sum() + out["side"].sum()).backward()
    assert x_in.grad is not None and side_in.grad is not None and side_in.grad.abs().sum() > 0


class FusedTwin(nn.Module):
    """FastMoE's test_mimo expert: two FMoELinear applied to both entries of a list or dict."""

    def __init__(self, num_expert, d_model, d_hidden):
        super().__init__()
        self.htoh4 = fmoe.FMoELinear(num_expert, d_model, d_hidden)
        self.h4toh = fmoe.FMoELinear(num_expert, d_hidden, d_model)

    def forward(self, inp, fwd_expert_count):
        def mlp(t):
            return self.h4toh(F.gelu(self.htoh4(t, fwd_expert_count)), fwd_expert_count)

        if isinstance(inp, dict):
            return {"x": mlp(inp["x"]), "y": mlp(inp["y"])}
        return [mlp(inp[0]), mlp(inp[1])]


class TwinGate(NaiveGate):
    def forward(self, inp, return_all_scores=False):
        return super().forward(inp["x"] if isinstance(inp, dict) else inp[0], return_all_scores)


class TwinMoE(fmoe.FMoE):
    def __init__(self, num_expert, d_model, top_k):
        super().__init__(num_expert=num_expert, d_model=d_model, gate=TwinGate, top_k=top_k)
        self.experts = FusedTwin(num_expert, d_model, 4 * d_model)


@pytest.mark.parametrize("as_list", [False, True], ids=["dict", "list"])
def test_fused_multi_input_layer_matches_the_tensor_layer(as_list):
    """FastMoE's test_mimo model with 3-D inputs: both branches equal, and equal to FMoETransformerMLP with the
    same weights on one tensor (FastMoE only compared the branches)."""
    torch.manual_seed(12)
    moe = TwinMoE(4, D, 3).double()
    mlp = fmoe.FMoETransformerMLP(4, D, 4 * D, top_k=3).double()
    mlp.load_state_dict(moe.state_dict())
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = moe([x, x.clone()] if as_list else {"x": x, "y": x.clone()})
    first, second = (out[0], out[1]) if as_list else (out["x"], out["y"])
    assert first.shape == (2, 5, D)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, mlp(x), **TOL)


def test_tuple_input_with_a_two_argument_expert_fn():
    """A tuple input through FastMoE's ``expert_fn(inp, fwd_expert_count)`` override: it gets the tuple of routed
    rows and returns a tuple."""

    class TupleMoE(fmoe.FMoE):
        def expert_fn(self, inp, fwd_expert_count):
            a, b = inp
            assert a.shape[0] == int(fwd_expert_count.sum())
            return (a * 3, torch.cat([b, b], dim=1))

    class FirstGate(NaiveGate):
        def forward(self, inp, return_all_scores=False):
            return super().forward(inp[0], return_all_scores)

    torch.manual_seed(13)
    layer = TupleMoE(num_expert=2, d_model=D, top_k=2, gate=FirstGate, expert=Doubler).double()
    a, b = tokens(4, seed=13), tokens(4, 2, seed=14)
    out = layer((a, b))
    assert isinstance(out, tuple) and out[1].shape == (4, 4)
    _, score = layer.gate((a,))
    weight = score.sum(1, keepdim=True)  # every routed slot returns the same function of the token
    torch.testing.assert_close(out[0], 3 * a * weight, **TOL)
    torch.testing.assert_close(out[1], torch.cat([b, b], dim=1) * weight, **TOL)


def test_bad_multi_input():
    layer = fmoe.FMoE(num_expert=2, d_model=D, gate=DictGate, expert=PairExpert).double()
    x = tokens(4)
    with pytest.raises(ValueError, match=mentions("inp['side']", "(3,)")):
        layer({"x": x, "side": tokens(3, 3)})
    with pytest.raises(TypeError, match=mentions("float32", "float64")):
        layer({"x": x, "side": tokens(4, 3).float()})
    with pytest.raises(TypeError, match=mentions("inp['side']", "int")):
        layer({"x": x, "side": 3})
    with pytest.raises(ValueError, match=mentions("inp", "none")):
        layer({})
    plain = fmoe.FMoE(num_expert=2, d_model=D, expert=Doubler).double()
    with pytest.raises(TypeError, match=mentions("inp", "dict")):
        plain({"x": x})  # fastmoe's own gates route a tensor; FastMoE's gates did not take a dict either
