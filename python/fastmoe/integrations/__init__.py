"""Model integrations: :func:`moefy` upcycles the dense FFN blocks of a Transformer (Hugging Face Llama, Qwen2,
GPT-2, ...) into fastmoe MoE layers, and :func:`fmoefy` is FastMoE's name for it (docs/integrations.md)."""

from fastmoe.integrations.megatron import fmoefy, is_megatron_model
from fastmoe.integrations.transformers import UpcycledExperts, UpcycledMLP, find_ffn_blocks, moefy

__all__ = ["UpcycledExperts", "UpcycledMLP", "find_ffn_blocks", "fmoefy", "is_megatron_model", "moefy"]
