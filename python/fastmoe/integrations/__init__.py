"""Model integrations (docs/integrations.md): :func:`moefy` upcycles the dense FFN blocks of a Transformer (Hugging
Face Llama, Qwen2, GPT-2, ...) into fastmoe MoE layers, and :func:`fmoefy` is FastMoE's name for it;
:func:`use_fastmoe` runs the experts of Hugging Face MoE models (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...) on
fastmoe through transformers' experts interface, and :func:`restore_hf` switches them back."""

from fastmoe.integrations.hf_moe import find_hf_experts, restore_hf, use_fastmoe
from fastmoe.integrations.megatron import fmoefy, is_megatron_model
from fastmoe.integrations.transformers import UpcycledExperts, UpcycledMLP, find_ffn_blocks, moefy

__all__ = [
    "UpcycledExperts",
    "UpcycledMLP",
    "find_ffn_blocks",
    "find_hf_experts",
    "fmoefy",
    "is_megatron_model",
    "moefy",
    "restore_hf",
    "use_fastmoe",
]
