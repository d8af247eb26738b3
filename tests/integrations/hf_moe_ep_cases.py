"""The bodies of tests/integrations/test_hf_moe_ep.py, run on each rank by tests/distributed/dist_harness.py:
Hugging Face MoE models (tiny random configurations built here, fp64) on fastmoe with their experts split over the
ranks (``fastmoe.use_fastmoe(model, moe_group=...)``), against the same model in one process."""

import os

import torch
import torch.distributed as dist
from torch import nn

VOCAB = 100
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=1,
)
# name: (model class, config class, config); qwen2_moe has a shared expert behind a sigmoid gate; minimax's
# attention layers are all full attention here (its lightning attention is not what these tests are about)
ARCHS = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(intermediate_size=48, num_local_experts=8)),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, norm_topk_prob=True, head_dim=8),
    ),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8),
    ),
    "minimax": (
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        dict(intermediate_size=24, num_local_experts=8, head_dim=8, layer_types=["full_attention"] * 2),
    ),
}
TOP_K = 2
LR = 0.1
STEPS = 2


def graph_names(tensor: torch.Tensor) -> set:
    """The names of the autograd nodes behind ``tensor`` (which ops its gradient runs through)."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack += [fn for fn, _ in node.next_functions]
    return names


def build(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """The fp64 model, its weights drawn far from transformers' 0.02 initialisation so that the routing and every
    gradient are of order one; the same on every rank for the same ``seed``."""
    import transformers

    model_class, config_class, config = ARCHS[arch]
    cfg = getattr(transformers, config_class)(
        **SMALL, **{**config, **overrides}, num_experts_per_tok=TOP_K, experts_implementation="eager"
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(cfg).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def token_ids(world_size: int, step: int = 0) -> torch.Tensor:
    """``[world_size, 2, 8]``: rank r's batch is entry r; the one-process run takes all of them."""
    return torch.randint(2, VOCAB, (world_size, 2, 8), generator=torch.Generator().manual_seed(10 + step))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def experts_blocks(model, rank: int, world_size: int) -> dict:
    """``{name: slice}`` of the one-process model's expert tensors that rank ``rank`` holds under expert
    parallelism."""
    from fastmoe.integrations import hf_moe

    blocks = {}
    for path, module in hf_moe.find_hf_experts(model):
        num_local = module.num_experts // world_size
        for name, param in module.named_parameters():
            blocks[f"{path}.{name}"] = param[rank * num_local : (rank + 1) * num_local]
    return blocks


def compare_params(model, reference, rank: int, world_size: int) -> dict:
    """Largest difference of the replicated parameters and of the expert blocks from the one-process model's (the
    expert blocks compared with the slices this rank holds), and whether every expert tensor has its block's
    shape."""
    blocks = experts_blocks(reference, rank, world_size)
    ref = dict(reference.named_parameters())
    replicated, experts, shapes = 0.0, 0.0, True
    for name, param in model.named_parameters():
        if name in blocks:
            shapes &= param.shape == blocks[name].shape
            experts = max(experts, max_diff(param, blocks[name])) if shapes else float("inf")
        else:
            replicated = max(replicated, max_diff(param, ref[name]))
    return {"replicated": replicated, "experts": experts, "shapes": shapes, "num_blocks": len(blocks)}


def arch_body(rank: int, world_size: int, arch: str, folder: str) -> dict:
    """Everything of test_hf_moe_ep.py for one model: initialisation, outputs on this rank's tokens, training
    under DistributedGroupedDataParallel, fastmoe.checkpoint save + consolidate, restore_hf + save_pretrained."""
    import transformers

    import fastmoe
    import fastmoe.checkpoint
    from fastmoe.integrations import hf_moe

    group = dist.group.WORLD
    result = {}

    # Initialisation: each rank holds its block of the experts of the model built from the same seed.
    reference = fastmoe.use_fastmoe(build(arch))
    model = fastmoe.use_fastmoe(build(arch), moe_group=group)
    result["init"] = compare_params(model, reference, rank, world_size)
    result["implementations"] = sorted({m.config._experts_implementation for _, m in hf_moe.find_hf_experts(model)})
    fastmoe.use_fastmoe(model, moe_group=group)  # again: harmless
    result["again"] = compare_params(model, reference, rank, world_size)

    # Outputs on this rank's tokens equal the one-process model's on the same tokens (with the router logits and
    # the aux loss where the model has them).
    def forward(net, ids):
        out = net(input_ids=ids, labels=ids, output_router_logits=True)
        aux = getattr(out, "aux_loss", None)
        return out, out.loss if aux is None else out.loss + aux

    ids = token_ids(world_size)[rank]
    (out, loss), (want, want_loss) = forward(model, ids), forward(reference, ids)
    result["outputs"] = {"logits": max_diff(out.logits, want.logits), "loss": max_diff(loss, want_loss)}
    if getattr(want, "aux_loss", None) is not None:
        result["outputs"]["aux_loss"] = max_diff(out.aux_loss, want.aux_loss)
        pairs = zip(out.router_logits, want.router_logits, strict=True)
        result["outputs"]["router_logits"] = max(max_diff(a, b) for a, b in pairs)
    # Gradients: the replicated parameters get those of this rank's loss; the experts those of every rank's loss,
    # brought home by the exchange (the one-process model runs the other ranks' batches too).
    loss.backward()
    want_loss.backward()
    ref_params = dict(reference.named_parameters())
    blocks = experts_blocks(reference, rank, world_size)
    own = {name: p.grad.clone() for name, p in ref_params.items() if name not in blocks}
    for other in range(world_size):
        if other != rank:
            forward(reference, token_ids(world_size)[other])[1].backward()
    grads = {"replicated": 0.0, "experts": 0.0}
    for name, param in model.named_parameters():
        if name in blocks:
            num_local = param.shape[0]
            want_grad = ref_params[name].grad[rank * num_local : (rank + 1) * num_local]
            grads["experts"] = max(grads["experts"], max_diff(param.grad, want_grad))
        else:
            grads["replicated"] = max(grads["replicated"], max_diff(param.grad, own[name]))
    result["grads"] = grads
    model.zero_grad(set_to_none=True)

    # Training: SGD steps under DistributedGroupedDataParallel equal one process on the union of the batches.
    reference = fastmoe.use_fastmoe(build(arch))
    model = fastmoe.DistributedGroupedDataParallel(fastmoe.use_fastmoe(build(arch), moe_group=group))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        batches = token_ids(world_size, step)
        ids = batches[rank]
        model(input_ids=ids, labels=ids).loss.backward()
        model.allreduce_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        union = batches.reshape(-1, batches.shape[-1])
        reference(input_ids=union, labels=union).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    result["trained"] = compare_params(model.module, reference, rank, world_size)
    initial = dict(build(arch).named_parameters())
    result["trained"]["moved"] = min(max_diff(p, initial[name]) for name, p in reference.named_parameters())

    # fastmoe.checkpoint of the expert-parallel model, consolidated, loads into the plain Hugging Face model.
    ckpt = os.path.join(folder, f"ckpt-{arch}")
    fastmoe.checkpoint.save(model, None, ckpt)
    state = fastmoe.checkpoint.consolidate(ckpt)
    plain = build(arch, seed=5)  # other values, transformers' own experts
    plain.load_state_dict(state, strict=True)
    check_ids = token_ids(world_size, 7)[0]
    want_logits = reference(input_ids=check_ids).logits
    result["consolidated"] = {
        "keys_equal": sorted(state) == sorted(reference.state_dict()),
        "state": max(max_diff(v, reference.state_dict()[k]) for k, v in state.items()),
        "logits": max_diff(plain(input_ids=check_ids).logits, want_logits),
        "implementations": sorted({m.config._experts_implementation for _, m in hf_moe.find_hf_experts(plain)}),
    }
    # ... and loads, resharded, into the one-process model on fastmoe
    one = fastmoe.use_fastmoe(build(arch, seed=5))
    fastmoe.checkpoint.load(one, None, ckpt)
    result["loaded_one_process"] = max_diff(one(input_ids=check_ids).logits, want_logits)

    # restore_hf gathers the experts: the full state dict on every rank, and save_pretrained on rank 0.
    fastmoe.restore_hf(model.module)
    restored = model.module.state_dict()
    result["restored"] = {
        "keys_equal": sorted(restored) == sorted(reference.state_dict()),
        "state": max(max_diff(v, reference.state_dict()[k]) for k, v in restored.items()),
        "implementations": sorted({m.config._experts_implementation for _, m in hf_moe.find_hf_experts(model.module)}),
        "logits": max_diff(model.module(input_ids=check_ids).logits, want_logits),
    }
    saved = os.path.join(folder, f"hf-{arch}")
    if rank == 0:
        model.module.save_pretrained(saved)
    dist.barrier()
    loaded = getattr(transformers, ARCHS[arch][0]).from_pretrained(saved, experts_implementation="eager")
    result["save_pretrained_logits"] = max_diff(loaded(input_ids=check_ids).logits, want_logits)

    # The round trip of an untrained model gives its state dict back bit for bit.
    original = build(arch)
    model = fastmoe.restore_hf(fastmoe.use_fastmoe(build(arch), moe_group=group))
    result["round_trip_bitwise"] = all(
        torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items()
    ) and sorted(model.state_dict()) == sorted(original.state_dict())
    return result


def errors_body(rank: int, world_size: int) -> dict:
    """The errors of use_fastmoe(model, moe_group=...), each raised on every rank, the model left as it was."""
    import fastmoe
    from fastmoe.integrations import hf_moe

    group = dist.group.WORLD
    messages = {}

    def attempt(key, model, moe_group):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            fastmoe.use_fastmoe(model, moe_group=moe_group)
        except Exception as error:  # noqa: BLE001 - the test checks the type and message
            messages[key] = (type(error).__name__, str(error))
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        implementations = {m.config._experts_implementation for _, m in hf_moe.find_hf_experts(model)}
        messages[key + " unchanged"] = unchanged and implementations == {"eager"}

    attempt("indivisible", build("mixtral", num_local_experts=3), group)
    attempt("seeds", build("mixtral", seed=rank), group)
    attempt("not a group", build("mixtral"), "world")
    from torch.distributed.device_mesh import init_device_mesh

    attempt("mesh", build("mixtral"), init_device_mesh("cpu", (world_size,)))
    # a group of rank 0 alone: rank 0 runs its experts as one process, rank 1 is not in it
    alone = dist.new_group([0])
    if rank == 1:
        attempt("not in the group", build("mixtral"), alone)
    else:
        model = fastmoe.use_fastmoe(build("mixtral"), moe_group=alone)
        messages["alone holds all experts"] = all(
            m.gate_up_proj.shape[0] == 8 for _, m in hf_moe.find_hf_experts(model)
        )
    # on fastmoe for one process first, then split: each rank keeps its block
    model = fastmoe.use_fastmoe(fastmoe.use_fastmoe(build("mixtral")), moe_group=group)
    messages["split after one process"] = compare_params(model, build("mixtral"), rank, world_size)
    # already split over the world: one process is another layout
    model = fastmoe.use_fastmoe(build("mixtral"), moe_group=group)
    try:
        fastmoe.use_fastmoe(model)
    except ValueError as error:
        messages["resplit"] = ("ValueError", str(error))
    return messages


def all_body(rank: int, world_size: int, folder: str) -> dict:
    """The errors, then every model of ARCHS: one job of processes for the whole test file."""
    return {
        "errors": errors_body(rank, world_size),
        **{arch: arch_body(rank, world_size, arch, folder) for arch in ARCHS},
    }
