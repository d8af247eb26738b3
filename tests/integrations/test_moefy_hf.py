"""fastmoe.moefy on Hugging Face Llama, Qwen2 and GPT-2 models with tiny random configurations built here (no
weights are downloaded), in fp64 on the CPU: the upcycled model starts equal to the dense one, keeps GPT-2's
dropout, and trains."""

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed (it is pinned in requirements-dev.txt)"
)

import fastmoe  # noqa: E402
from fastmoe.gates import NaiveGate  # noqa: E402
from fastmoe.integrations import UpcycledExperts, UpcycledMLP, find_ffn_blocks  # noqa: E402

TOL = 1e-10  # docs/numerics.md: the layers in fp64 match their plain PyTorch counterpart within 1e-10
VOCAB = 100
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def build(arch: str, **config):
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **config}))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**SMALL, **config}))
    else:
        gpt2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**gpt2, **config}))
    return model.double().eval()


def decoder_layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def token_ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


ARCHS = [
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"mlp_bias": True}, id="llama-mlp_bias"),
    pytest.param("qwen2", {}, id="qwen2"),
    pytest.param("gpt2", {}, id="gpt2"),
]


@pytest.mark.parametrize("layers", [None, [1]], ids=["all", "layer1"])
@pytest.mark.parametrize("arch,config", ARCHS)
def test_logits_and_embedding_gradients_equal_the_dense_model(arch, config, layers):
    model = build(arch, **config)
    dense = copy.deepcopy(model)
    fastmoe.moefy(model, num_expert=4, layers=layers)
    chosen = [0, 1] if layers is None else layers
    for i, layer in enumerate(decoder_layers(model)):
        assert isinstance(layer.mlp, UpcycledMLP) == (i in chosen)
    mlp = decoder_layers(model)[1].mlp
    width = 2 * 48 if arch != "gpt2" else 4 * 32  # gated: gate rows and up rows (SwiGLU)
    assert mlp.experts.htoh4.weight.shape == (4, width, 32)
    assert (mlp.experts.htoh4.bias is not None) == (arch == "gpt2" or bool(config.get("mlp_bias")))

    ids = token_ids()
    out, ref = model(ids).logits, dense(ids).logits
    assert (out - ref).abs().max() <= TOL
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    grad, dense_grad = model.get_input_embeddings().weight.grad, dense.get_input_embeddings().weight.grad
    assert grad.abs().max() > 0 and (grad - dense_grad).abs().max() <= TOL


def test_gpt2_keeps_its_dropout_and_matches_in_training_mode():
    model = build("gpt2", resid_pdrop=0.3).train()
    dense = copy.deepcopy(model)
    fastmoe.moefy(model, num_expert=2)
    assert [status for _, _, status in find_ffn_blocks(model)] == ["moe"] * 2  # the attention's c_proj is not one
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp.dropout, torch.nn.Dropout) and mlp.dropout.p == 0.3 and mlp.training
    ids = token_ids()
    torch.manual_seed(3)
    out = model(ids).logits
    torch.manual_seed(3)
    ref = dense(ids).logits  # NaiveGate draws nothing, so both models draw the same dropout masks
    assert (out - ref).abs().max() <= TOL
    torch.manual_seed(4)
    assert (model(ids).logits - out).abs().max() > 1e-3  # the dropout is active


def test_noise_changes_the_logits():
    model = build("qwen2")
    dense = copy.deepcopy(model)
    torch.manual_seed(5)
    fastmoe.moefy(model, num_expert=4, noise=0.02)
    ids = token_ids()
    assert (model(ids).logits - dense(ids).logits).abs().max() > 1e-6


def test_a_gated_activation_other_than_silu_upcycles_through_expert_modules():
    model = build("llama", hidden_act="gelu_pytorch_tanh")
    dense = copy.deepcopy(model)
    fastmoe.moefy(model, num_expert=3, layers=[-1])
    mlp = decoder_layers(model)[1].mlp
    assert isinstance(mlp, UpcycledExperts) and type(mlp.experts[0]).__name__ == "LlamaMLP"
    assert not isinstance(decoder_layers(model)[0].mlp, fastmoe.FMoE)
    ids = token_ids()
    assert (model(ids).logits - dense(ids).logits).abs().max() <= TOL


def test_the_upcycled_model_trains_with_the_balance_loss():
    model = build("llama").train()
    torch.manual_seed(6)
    fastmoe.moefy(model, num_expert=4, gate=functools.partial(NaiveGate, balance_coef=0.01))
    layers = [m for m in model.modules() if isinstance(m, fastmoe.FMoE)]
    assert len(layers) == 2
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = model(ids, labels=ids)
        balance = sum(layer.get_loss() for layer in layers)
        assert balance.requires_grad and 0.02 * 0.999 <= float(balance.detach()) < 0.08  # 2 layers x 0.01 x [1, 4]
        optimizer.zero_grad()
        (out.loss + balance).backward()
        assert all(layer.gate.gate.weight.grad.abs().max() > 0 for layer in layers)
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
