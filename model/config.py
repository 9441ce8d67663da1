"""The model's config: one dataclass, every field one architecture knob.

Each field carries one trailing comment; `train.config` reads those comments for `--help` and the README's knob
table, so keep them to one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


LOW_RANK_TARGETS = ("qkv", "attn_out", "mlp_in", "mlp_out")  # the projections model.low_rank can factor
# fields that choose how the same weights are computed or regularised, not what they are: a resume may change them
IMPLEMENTATION_FIELDS = ("attention", "kernels", "loss_impl", "moe_dispatch", "dropout")


def default_target_weights(n_targets: int) -> tuple[float, ...]:
    """Al-Rfou et al.'s weights: 1.0 for t+1, 0.5 for every further target."""
    return (1.0,) + (0.5,) * (n_targets - 1)


@dataclass
class ModelConfig:
    n_layer: int = 12  # transformer blocks
    n_head: int = 8  # attention heads per block (must divide d_model)
    d_model: int = 512  # width of the residual stream
    d_ff: int = 2048  # hidden width of the MLP (SwiGLU: width of each of its two input projections)
    block_size: int = 512  # context length in bytes
    vocab_size: int = 256  # bytes; fixed by the data
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # normalisation layer (pre-norm blocks)
    bias: bool = True  # biases in linear layers and LayerNorm (classifier heads: head_bias)
    head_bias: bool = True  # biases in the classifier heads
    activation: Literal["gelu", "relu", "solu", "swiglu"] = "gelu"  # MLP nonlinearity; solu: LayerNorm(x*softmax(x))
    pos_emb: Literal["learned", "learned_per_layer", "rope", "xl_relative"] = "learned"  # input/per block/rotary/TXL
    residual_scale: Literal["none", "depth-scaled"] = "none"  # depth-scaled: branches x 1/sqrt(2*n_layer)
    init: Literal["normal", "gpt2", "small"] = "normal"  # N(0,.02) | + out-proj /sqrt(2L) | N(0,sqrt(2/5d))
    n_targets: int = 1  # final heads predicting t+1..t+n_targets (Al-Rfou et al.: 2)
    target_weights: tuple[float, ...] = (1.0,)  # weight of each final head, one per target; default 1.0, 0.5, 0.5, ...
    intermediate_loss: bool = False  # a head after each block but the last; layer l stops at l/(2n)
    intermediate_weight: float = 1.0  # loss weight of each active intermediate head
    intermediate_targets: int = 1  # each intermediate layer predicts t+1..t+k (t+k weighted by target_weights)
    mem_len: int = 0  # Transformer-XL memory: earlier positions every layer also sees (0 = off; rope or xl_relative)
    cmem_len: int = 0  # compressive memory: slots of compressed evicted memories per layer (0 = off; needs mem_len)
    cmem_ratio: int = 4  # compression rate: this many evicted memories -> one slot (1-D conv, kernel = stride)
    cmem_weight: float = 1.0  # weight of the compressor's attention-reconstruction loss (Rae et al. 2019)
    attn_type: Literal["standard", "differential", "mla"] = "standard"  # differential: Ye et al.; mla: DeepSeek-V2
    kv_lora_rank: int = 256  # mla: width of the latent that keys and values come from (what the KV cache keeps)
    q_lora_rank: int = 0  # mla: width of the low-rank query latent (0 = full-rank queries)
    rope_head_dim: int = 32  # mla: width of the decoupled rotary part (one rotary key shared by the heads)
    nope_head_dim: int = 0  # mla: width of each head's non-rotary query/key part (0 = d_model / n_head)
    v_head_dim: int = 0  # mla: width of each head's value (0 = d_model / n_head)
    attn_pattern: Literal["dense", "local", "strided", "fixed"] = "dense"  # sparse attention (Child et al. 2019)
    attn_window: int = 128  # local: positions a query sees (itself included); strided: its local heads' band
    attn_stride: int = 32  # strided: step of the strided heads; fixed: block length
    attn_summary: int = 4  # fixed: the last positions of each block that the summary heads see
    moe_experts: int = 0  # routed experts of a mixture-of-experts MLP (0 = dense MLP)
    moe_top_k: int = 2  # experts each token is routed to
    moe_expert_dim: int = 0  # hidden width of each expert (0 = d_ff)
    moe_shared: int = 0  # always-on shared experts (DeepSeekMoE), each moe_expert_dim wide
    moe_every: int = 1  # MoE in every k-th block (the others keep the dense MLP)
    moe_balance: Literal["aux_loss", "bias"] = "aux_loss"  # Switch auxiliary loss | DeepSeek-V3 loss-free bias
    moe_aux_weight: float = 0.01  # weight of the auxiliary balance loss (moe_balance=aux_loss)
    moe_bias_rate: float = 0.001  # step of the routing-bias update after every step (moe_balance=bias)
    moe_dispatch: Literal["auto", "grouped", "padded"] = "auto"  # grouped where torch runs it | grouped_mm | bmm
    hourglass: tuple[int, ...] = ()  # hourglass: blocks at full / shortened / full resolution, e.g. 2,4,2 (empty: off)
    shorten_factor: int = 2  # hourglass: positions pooled into one shortened position
    hourglass_pool: Literal["avg", "linear"] = "avg"  # hourglass: shortening by average or a linear map of the group
    hourglass_upsample: Literal["repeat", "linear"] = "repeat"  # hourglass: back to full resolution
    low_rank: int = 0  # rank r of the factored projections W = U V (0 = full matrices)
    low_rank_targets: tuple[str, ...] = ("qkv", "attn_out", "mlp_in", "mlp_out")  # projections low_rank factors
    ngram_max: int = 1  # hashed n-gram input embeddings for n = 2..ngram_max (BLT-style; 1 = off)
    ngram_buckets: int = 4096  # rows of each n-gram order's hash table
    tie_embeddings: bool = False  # the t+1 head shares the input embedding matrix
    attention: Literal["sdpa", "math", "flash"] = "sdpa"  # flash: flash-attn, else sdpa (warned once)
    kernels: Literal["torch", "triton"] = "torch"  # triton: fused RMSNorm, SwiGLU, multi-head loss
    loss_impl: Literal["gemm", "fused"] = "gemm"  # triton loss: matmuls + one row kernel | one fused kernel

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def absolute_positions(self) -> bool:
        """Learned position tables: they cover positions 0..block_size-1 of a window and nothing beyond."""
        return self.pos_emb in ("learned", "learned_per_layer")

    @property
    def attention_span(self) -> int:
        """The farthest back (itself included) any query looks: what a KV cache must keep."""
        return min(self.attn_window, self.block_size) if self.attn_pattern == "local" else self.block_size

    @property
    def mla_nope_head_dim(self) -> int:
        return self.nope_head_dim or self.head_dim

    @property
    def mla_v_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def cache_layout(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of the two tensors a KV cache keeps per layer and position: keys, then values."""
        if self.attn_type == "mla":  # the unrotated shared rotary key, and the latent
            return (1, self.rope_head_dim), (1, self.kv_lora_rank)
        if self.attn_type == "differential":  # every sub-head's key; one double-width value per head pair
            return (self.n_head, self.head_dim), (self.n_head // 2, 2 * self.head_dim)
        return (self.n_head, self.head_dim), (self.n_head, self.head_dim)

    @property
    def n_intermediate(self) -> int:
        """Layers with intermediate classifier heads: every block but the last (hourglass: every full-resolution
        block but the last)."""
        if not self.intermediate_loss:
            return 0
        return self.hourglass[0] + self.hourglass[-1] - 1 if self.hourglass else self.n_layer - 1

    @property
    def n_intermediate_heads(self) -> int:
        """Intermediate classifier heads: t+1..t+intermediate_targets after each block but the last."""
        return self.n_intermediate * self.intermediate_targets

    def errors(self) -> list[str]:
        """Every impossible combination, as one-line messages (empty when the config is sound)."""
        out = []
        for name in ("n_layer", "n_head", "d_model", "d_ff", "block_size", "n_targets"):
            if getattr(self, name) < 1:
                out.append(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.vocab_size != 256:
            out.append(f"model.vocab_size must be 256 for byte-level data (got {self.vocab_size})")
        if self.n_head >= 1 and self.d_model % self.n_head:
            out.append(f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}")
        elif self.pos_emb == "rope" and self.n_head >= 1 and self.head_dim % 2:
            out.append(f"model.pos_emb=rope needs an even head dimension (d_model/n_head = {self.head_dim})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if len(self.target_weights) != self.n_targets:
            out.append(f"model.target_weights has {len(self.target_weights)} values but model.n_targets="
                       f"{self.n_targets}; give one weight per target, e.g. --model.target_weights=1.0,0.5")
        if not 1 <= self.intermediate_targets <= max(self.n_targets, 1):
            out.append(f"model.intermediate_targets={self.intermediate_targets} must be between 1 and "
                       f"model.n_targets={self.n_targets}")
        if any(w < 0 for w in self.target_weights) or self.intermediate_weight < 0:
            out.append("loss weights must be >= 0")
        if self.mem_len < 0:
            out.append(f"model.mem_len must be >= 0 (got {self.mem_len})")
        elif self.mem_len and self.absolute_positions:
            out.append(f"model.mem_len={self.mem_len} needs relative positions: model.pos_emb={self.pos_emb} has a "
                       f"table of absolute positions that cannot index a memory; use rope or xl_relative")
        if self.cmem_len < 0 or self.cmem_ratio < 1 or self.cmem_weight < 0:
            out.append("model.cmem_len and model.cmem_weight must be >= 0, model.cmem_ratio >= 1")
        elif self.cmem_len and not self.mem_len:
            out.append(f"model.cmem_len={self.cmem_len} compresses what leaves a memory: set model.mem_len too")
        elif self.cmem_len and (self.block_size % self.cmem_ratio or self.mem_len % self.cmem_ratio):
            out.append(f"model.cmem_ratio={self.cmem_ratio} must divide model.block_size={self.block_size} and "
                       f"model.mem_len={self.mem_len}")
        if min(self.attn_window, self.attn_stride, self.attn_summary) < 1 or self.attn_summary > self.attn_stride:
            out.append("model.attn_window, attn_stride and attn_summary must be >= 1, attn_summary <= attn_stride")
        elif self.attn_pattern in ("strided", "fixed") and self.n_head % 2:
            out.append(f"model.attn_pattern={self.attn_pattern} splits the heads in two halves: model.n_head="
                       f"{self.n_head} must be even")
        if self.attn_pattern != "dense" and self.mem_len:
            out.append(f"model.attn_pattern={self.attn_pattern} is not implemented with a Transformer-XL memory "
                       f"(model.mem_len={self.mem_len}); use attn_pattern=dense")
        if self.attn_type == "differential":
            if self.n_head % 2:
                out.append(f"model.attn_type=differential pairs the heads (n_head/2 differential heads): model.n_head="
                           f"{self.n_head} must be even")
            for clash, name in ((self.mem_len, f"model.mem_len={self.mem_len}"),
                                (self.pos_emb == "xl_relative", "model.pos_emb=xl_relative"),
                                (self.attn_pattern in ("strided", "fixed"), f"model.attn_pattern={self.attn_pattern}")):
                if clash:
                    out.append(f"model.attn_type=differential is not implemented with {name}")
        if self.attn_type == "mla":
            if self.pos_emb != "rope":
                out.append(f"model.attn_type=mla carries positions in its decoupled rotary part: set model.pos_emb="
                           f"rope (got {self.pos_emb})")
            if self.kv_lora_rank < 1 or self.rope_head_dim < 2 or self.rope_head_dim % 2 or min(
                    self.q_lora_rank, self.nope_head_dim, self.v_head_dim) < 0:
                out.append("model.kv_lora_rank must be >= 1, model.rope_head_dim even and >= 2, model.q_lora_rank, "
                           "nope_head_dim and v_head_dim >= 0")
            if self.mem_len:
                out.append(f"model.attn_type=mla is not implemented with model.mem_len={self.mem_len}")
        if self.low_rank < 0:
            out.append(f"model.low_rank must be >= 0 (got {self.low_rank})")
        if not self.low_rank_targets or any(t not in LOW_RANK_TARGETS for t in self.low_rank_targets):
            out.append(f"model.low_rank_targets must be a non-empty list of {', '.join(LOW_RANK_TARGETS)} "
                       f"(got {','.join(self.low_rank_targets) or 'nothing'})")
        elif self.low_rank and self.attn_type == "mla" and "qkv" in self.low_rank_targets:
            out.append("model.low_rank_targets: qkv is not a projection of model.attn_type=mla (its keys and values "
                       "are low-rank already): leave it out")
        if self.moe_experts < 0 or min(self.moe_expert_dim, self.moe_shared, self.moe_aux_weight,
                                       self.moe_bias_rate) < 0 or self.moe_every < 1:
            out.append("model.moe_experts, moe_expert_dim, moe_shared, moe_aux_weight and moe_bias_rate must be >= 0, "
                       "model.moe_every >= 1")
        elif self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            out.append(f"model.moe_top_k={self.moe_top_k} must be between 1 and model.moe_experts={self.moe_experts}")
        elif self.moe_experts and self.activation == "solu":
            out.append("model.activation=solu is not implemented for experts (model.moe_experts > 0)")
        if self.hourglass:
            layout = ",".join(map(str, self.hourglass))
            if len(self.hourglass) != 3 or min(self.hourglass) < 1 or sum(self.hourglass) != self.n_layer:
                out.append(f"model.hourglass={layout} must be three block counts >= 1 (full, shortened, full "
                           f"resolution) adding up to model.n_layer={self.n_layer}")
            elif self.shorten_factor < 2 or self.block_size % self.shorten_factor:
                out.append(f"model.shorten_factor={self.shorten_factor} must be >= 2 and divide model.block_size="
                           f"{self.block_size}")
            elif self.mem_len:
                out.append(f"model.hourglass is not implemented with model.mem_len={self.mem_len}")
        if self.ngram_max < 1 or self.ngram_buckets < 1:
            out.append(f"model.ngram_max and model.ngram_buckets must be >= 1 (got {self.ngram_max}, "
                       f"{self.ngram_buckets})")
        if self.n_targets >= self.block_size:
            out.append(f"model.n_targets={self.n_targets} must be smaller than model.block_size={self.block_size}")
        return out
