"""
The speedrun GPT: GPT-2 small as modded-nanogpt's record #89 builds it (the repository's HEAD), with FlexAttention
where the record runs FA3 (attention.py). At the default GPTConfig this is that model, figure for figure.

    idx ─ embed ─ smear ─ norm = x0 ─┬─ + bigram ─> layer 0 ─> ... ─> layer L-1 ─> + MUDD ─ norm ─ lm_head ─ softcap
                                     └─ MUDD gate: per-token gates for the layers (a second one mid-way)

- Embeddings (#34, #62, #83): each token's embedding gets a gated share of the previous token's (smear); a hashed
  embedding of (previous, current) token pairs, its rows shared by many pairs and told apart by a ±1 sign table, is
  added to the residual stream before layer 0 and after the attention of later layers.
- Layers (#30, #35, #45, #73, #77): RMSNorm without weights; ReLU² MLP (4x); one layer without attention, where a
  gated skip from an earlier layer lands; the last layers attend from a saved earlier activation; every sublayer
  scales the residual and its own output by learned lambdas; x0 is mixed in after each attention with a gate.
- Attention (attention.py): QK-norm, half-truncated RoPE with YaRN, softmax scale 0.1 growing with the window,
  windows of 128-token blocks (short on most layers, long on two), paired heads on four layers, the partial key offset
  on the long ones, XSA on four, output gates on two, value embeddings (five tables, gated per head) on five, and
  the DC side path on the last.
- MUDD (#81, #85): small per-token MLPs make the last layer's coefficients (which earlier activations feed its values
  and its residual, and its lambdas) and the final mix of saved activations; the MUDD gate makes the other layers'
  per-token gates (XSA strengths, output gates, x0 / bigram gates, the skip gate, DC weights), once from x0 and once
  mid-way from the residual stream.
- Head and losses (#51, #53, #54, #61, #88): lm_head stored transposed (C, V), tied to the embedding at init (the
  optimizer unties them, muon.py); logits 23·sigmoid((z + 5)/7.5). The training objective (train mode, summed) adds
  multi-token prediction and the prefix-token loss and runs the head in FP8 (fp8.py); everything else is plain
  next-token cross-entropy with the plain head.

layer_plan(L) says which layer plays which role, for any depth. Parameters are fp32 masters (train_gpt.py stores
them as the record does on CUDA); activations are bf16 on CUDA, fp32 on the CPU (float64 for a float64 model).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fp8
import speedrun_kernels
from attention import CachedAttention, FullAttention, rope_frequencies, xsa, yarn


@dataclass
class GPTConfig:
    vocab_size: int = 50257            # record: L2235 (embeddings and lm_head padded to a multiple of 128, L1216)
    num_layers: int = 11               # record: L2236
    model_dim: int = 768               # record: L2239
    num_heads: int = 6                 # record: L2237
    head_dim: int = 128                # record: L2238 (num_heads * head_dim == model_dim, L1090)
    max_seq_len: int = 262144          # longest sequence: the validation's 262,144 tokens   # record: L2240
    mlp_ratio: int = 4                 # record: L1299
    block_len: int = 128               # windows are counted in blocks of this many tokens   # record: L2021
    windows: tuple = (6, 20)           # (short, long) blocks when forward gets none: the final validation's
                                       # record: L1987 (short 6), L1933 (long 20)
    softcap: tuple = (23.0, 5.0, 7.5)  # logits = A·sigmoid((z + B) / C)   # record: L1690
    rope_base: float = 1024.0          # record: L1006
    attn_scale: float = 0.1            # initial softmax scale   # record: L1035
    yarn: tuple = (1.0, 32.0, 0.2)     # alpha, beta, scale growth per ln(new/old)   # record: L1037, L1055
    eos_token_id: int = 50256          # documents start at it   # record: L1709
    fp8: bool = True                   # FP8 lm_head in the training objective and FP8 MLP in training (fp8.py)
    bigram_vocab_size: int | None = None  # None: padded vocab·15//2 = 377,280   # record: L1902
    bigram_dim: int | None = None      # None: model_dim (768)   # record: L1903
    bigram_sign_rows: int = 8192       # record: L1904
    ve_init_std: float = 0.01          # record: L1261
    lm_head_init_std: float = 0.005    # record: L1226
    mudd_dim: int = 64                 # record: L1372
    mudd_scale: float = 0.1            # record: L1371
    mudd_gate_dim: int = 64            # record: L1438
    mudd_gate_scale: float = 0.1       # init of the learnable scale   # record: L1437
    smear_gate_dim: int = 12           # record: L1326
    ve_gate_dim: int = 6               # the VE gate reads this many channels of the input and of the embedding
                                       # record: L1613
    dc_window: int = 112               # tokens   # record: L1147
    # ablation switches: each idea off exactly (README's ablation table)
    bigram: bool = True
    value_embeds: bool = True
    paired_heads: bool = True
    key_offset: bool = True
    xsa: bool = True
    dc: bool = True

    def __post_init__(self):
        C, H, D = self.model_dim, self.num_heads, self.head_dim
        checks = [
            (self.num_layers >= 1, f"num_layers={self.num_layers}: use at least 1"),
            (H % 2 == 0, f"num_heads={H}: paired heads need an even number of heads"),
            (H * D == C, f"num_heads * head_dim = {H * D} != model_dim={C}: make them equal"),
            (D % 4 == 0, f"head_dim={D}: rotary needs a multiple of 4"),
            (self.smear_gate_dim <= C and self.ve_gate_dim <= C,
             f"smear_gate_dim={self.smear_gate_dim}, ve_gate_dim={self.ve_gate_dim}: at most model_dim={C}"),
            (self.bigram_width <= C, f"bigram_dim={self.bigram_dim}: at most model_dim={C}"),
            (len(self.windows) == 2, f"windows={self.windows}: give (short, long) blocks"),
            (self.dc_window >= 1, f"dc_window={self.dc_window}: use at least 1 token"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GPTConfig.{message}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 128) * 128

    @property
    def bigram_rows(self) -> int:
        return self.bigram_vocab_size or self.padded_vocab_size * 15 // 2

    @property
    def bigram_width(self) -> int:
        return self.bigram_dim or self.model_dim


# -----------------------------------------------------------------------------
# The layer plan: which layer plays which role. Record #89 picks by index for its 11 layers (L1238-1252, L1494,
# L1543); these rules give its choices at L = 11 and keep every role at any depth from 4:
#
#   role                         rule                                             L = 11 (record)
#   readers (attend from save)   the last R layers, R = min(3, max(1, round(3L/11)))   8, 9, 10
#   save                         last - R                                         7
#   no attention (skip target)   save - 1                                         6
#   skip source                  no_attn // 2                                     3
#   post gate                    skip_src + 1 (the second MUDD gate is made here) 4
#   long window (+ key offset)   skip_src, last                                   3, 10
#   paired heads                 {0, 2, no_attn - 1, last - 1} - long - no_attn   0, 2, 5, 9
#   XSA                          attention layers <= save, not paired             1, 3, 4, 7
#   value embeddings             ({1, 2} + the last 3) with attention, not 0      1, 2, 8, 9, 10 (tables 0..4)
#   attention output gates       skip_src, last                                   3, 10
#   DC, MUDD block 0             last                                             10
#   x0 / bigram gates            attention layers but the last (it has MUDD's)    0-5, 7-9
#
# Below 4 layers (tiny fine-tuning policies) the plan is reduced: every layer has attention, so there is no skip and
# no second gate (all gates come from x0); the other rules apply as written, roles that find no layer are dropped.

@dataclass(frozen=True)
class LayerPlan:
    num_layers: int
    attn: tuple          # layers with attention
    no_attn: int | None  # the layer without attention (the gated skip lands there)
    skip_src: int | None  # the layer whose output the skip carries
    save: int | None     # the layer whose output the readers attend from
    readers: tuple
    post_gate: int | None  # the layer at whose start the second MUDD gate is computed
    long: tuple          # long window and partial key offset
    paired: tuple
    xsa: tuple
    ve: tuple            # value-embedding layers; table j is layer ve[j]'s
    gated: tuple         # attention output gates
    inject: tuple        # x0 / bigram gates

    @property
    def last(self) -> int:
        return self.num_layers - 1


def layer_plan(L: int) -> LayerPlan:
    last = L - 1
    R = min(3, max(1, round(3 * L / 11)))
    save = last - R if last - R >= 0 else None
    readers = tuple(range(last - R + 1, L)) if save is not None else ()
    no_attn = save - 1 if L >= 4 else None
    skip_src = no_attn // 2 if L >= 4 else None
    attn = tuple(i for i in range(L) if i != no_attn)
    long = tuple(sorted({skip_src, last} - {None}))
    candidates = {0, 2, last - 1} | ({no_attn - 1} if L >= 4 else set())
    paired = tuple(sorted(i for i in candidates if 0 <= i < L and i not in long and i != no_attn))
    return LayerPlan(
        num_layers=L, attn=attn, no_attn=no_attn, skip_src=skip_src, save=save, readers=readers,
        post_gate=skip_src + 1 if L >= 4 else None, long=long, paired=paired,
        xsa=tuple(i for i in attn if save is not None and i <= save and i not in paired),
        ve=tuple(i for i in attn if i != 0 and (i in (1, 2) or i >= last - 2)),
        gated=long, inject=tuple(i for i in attn if i != last))


# -----------------------------------------------------------------------------
# The bigram hash (#62): data/ computes it for each training chunk (bigram_hash), the model for everything else

BIGRAM_MULTIPLIERS = (36313, 27191)  # record: L1786-1787


def bigram_pairs(cur: Tensor, prev: Tensor, has_prev: Tensor, bigram_vocab_size: int) -> Tensor:
    """Hash of each (prev, cur) token pair into [0, Vb - 1); Vb - 1 where there is no previous token."""
    a, b = BIGRAM_MULTIPLIERS
    h = torch.bitwise_xor(a * cur, b * prev) % (bigram_vocab_size - 1)
    return torch.where(has_prev, h, bigram_vocab_size - 1)


def bigram_hash(idx: Tensor, bigram_vocab_size: int) -> Tensor:
    """idx (..., T) int64 -> (..., T) int64: position 0 of each row gets the reserved Vb - 1, position t the hash of
    (idx[t-1], idx[t]) (across document starts, as the record)."""
    prev = F.pad(idx[..., :-1], (1, 0))
    return bigram_pairs(idx, prev, torch.arange(idx.size(-1), device=idx.device) > 0, bigram_vocab_size)


# -----------------------------------------------------------------------------
# The blocks

def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def uniform(*shape, fan_in: int) -> Tensor:
    """U(±sqrt(3)·0.5/sqrt(fan_in)): std 0.5/sqrt(fan_in) (#64)."""
    bound = math.sqrt(3) * 0.5 * fan_in ** -0.5
    return torch.empty(*shape).uniform_(-bound, bound)


def add_bigram(x: Tensor, term: Tensor) -> Tensor:
    """x (B, T, C) + term (B, T, bd) on the first bd channels."""
    if term.size(-1) == x.size(-1):
        return x + term
    return torch.cat([x[..., :term.size(-1)] + term, x[..., term.size(-1):]], dim=-1)


@dataclass
class LayerInputs:
    """What a layer takes from the rest of the model, per token. Gates are (B, T, 1) or, per head, (B, T, H)."""
    resid_attn: Tensor = None    # x <- resid_attn·x + post_attn·attn + inject·inject_gate
    post_attn: Tensor = None
    inject: Tensor = None        # x0 (the last layer: the input of layer 0)
    inject_gate: Tensor = None
    xb: Tensor = None            # bigram embedding (B, T, bd), added with bigram_gate after the attention
    bigram_gate: Tensor = None
    resid_mlp: Tensor = None     # x <- resid_mlp·x + post_mlp·MLP(norm(x))
    post_mlp: Tensor = None
    ve: Tensor = None            # value embedding (B, T, C)
    ve_gate: Tensor = None       # (B, T, H) given (the last layer: MUDD's), else the layer's own gate
    v_extra: Tensor = None       # added to the values (B, T, C) (the last layer: MUDD's)
    xsa_alpha: Tensor = None     # (B, T, H)
    attn_gate: Tensor = None     # (B, T, H)
    dc: tuple = None             # (w1, w2), each (B, T, H)
    fp8: bool = False            # FP8 MLP (training)


class Block(nn.Module):
    """Layer i: attention (not on the plan's no-attention layer) and the MLP. It holds the weights that only it uses,
    so grpo/fsdp.py can shard each block as a unit."""

    def __init__(self, config: GPTConfig, plan: LayerPlan, i: int):
        super().__init__()
        C, H = config.model_dim, config.num_heads
        self.num_heads, self.has_attn = H, i in plan.attn
        if self.has_attn:
            self.slot = plan.attn.index(i)  # its place in the KV cache
            self.window = "long" if i in plan.long else "short"
            self.paired = config.paired_heads and i in plan.paired
            self.key_offset = config.key_offset and i in plan.long and not self.paired
            self.attn_qk = nn.Parameter(uniform(H, 2 * config.head_dim, C, fan_in=C))  # Q head pairs, K head pairs
            self.attn_vo = nn.Parameter(uniform(2, C, C, fan_in=C))  # W_V (hdim, C), W_O (C, hdim)   # record: L1288
            self.sa_lambdas = nn.Parameter(torch.tensor([0.5, 1.0]))  # scale W_qkv, W_O   # record: L1344
        own_ve_gate = config.value_embeds and i in plan.ve and i != plan.last
        self.ve_gate = nn.Parameter(torch.zeros(H, 2 * config.ve_gate_dim)) if own_ve_gate else None  # record: L1264
        hidden = config.mlp_ratio * C
        self.mlp_fc = nn.Parameter(uniform(1, hidden, C, fan_in=C))  # record: L1304-1307
        self.mlp_proj = nn.Parameter(torch.zeros(1, hidden, C))  # used as post @ W   # record: L1308
        self.register_buffer("fp8_state", torch.ones(3))  # fp8.mlp's delayed scales   # record: L1311-1313

    def forward(self, x: Tensor, a: Tensor | None, inputs: LayerInputs, attn) -> Tensor:
        """x (B, T, C) residual stream, a (B, T, C) the normed attention input -> x after the layer."""
        if self.has_attn:
            out = self.attention(a, inputs, attn)
            x = inputs.resid_attn * x + inputs.post_attn * out + inputs.inject * inputs.inject_gate
            if inputs.bigram_gate is not None:
                x = add_bigram(x, inputs.xb * inputs.bigram_gate)
        h = fp8.mlp(norm(x), self.mlp_fc[0], self.mlp_proj[0], self.fp8_state, inputs.fp8)
        return inputs.resid_mlp * x + inputs.post_mlp * h

    def attention(self, a: Tensor, inputs: LayerInputs, attn) -> Tensor:
        B, T, C = a.shape
        H, g = self.num_heads, (self.ve_gate.size(-1) // 2 if self.ve_gate is not None else 0)
        w = torch.cat([self.attn_qk.flatten(0, 1), self.attn_vo[0]]) * self.sa_lambdas[0]  # (3C, C)
        q, k, v = F.linear(a, w.type_as(a)).view(B, T, 3 * H, C // H).chunk(3, dim=2)  # each (B, T, H, D)
        q, k = attn.rotate(norm(q), self.paired), attn.rotate(norm(k), self.paired)
        if inputs.ve is not None:
            gate = inputs.ve_gate
            if gate is None:  # 2·sigmoid(W · [a[:g], ve[:g]]) per head (#55, #70)
                gate = 2 * torch.sigmoid(F.linear(torch.cat([a[..., :g], inputs.ve[..., :g]], dim=-1),
                                                  self.ve_gate.type_as(a)))
            v = v + gate[..., None] * inputs.ve.view_as(v)
        if inputs.v_extra is not None:
            v = v + inputs.v_extra.view_as(v)
        y = attn(self.slot, q, k, v, self.window, self.paired, self.key_offset, inputs.dc)  # (B, T, H, D)
        if inputs.xsa_alpha is not None:
            y = xsa(y, v, inputs.xsa_alpha)
        if inputs.attn_gate is not None:
            y = y * inputs.attn_gate.type_as(y)[..., None]
        return F.linear(y.reshape(B, T, C), (self.attn_vo[1] * self.sa_lambdas[1]).type_as(y))


@dataclass
class KVCache:
    """Static KV cache for decoding, shared protocol with grpo/hf_model.py's decoder (grpo/engine.py decodes both)."""
    k: Tensor  # (n_layers, B, max_len, n_kv_heads, head_dim)
    v: Tensor  # (n_layers, B, max_len, n_kv_heads, head_dim)
    tokens: Tensor | None = None  # (B, max_len) int64: the token at each position (our GPT's smear and bigram hash
                                  # read the previous one); None for models that need none


class Head(nn.Module):
    """The lm_head, stored transposed as the record stores it (#61): z = x @ weight, weight (C, V)."""

    def __init__(self, C: int, V: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, V) * std)  # record: L1226


# MUDD block 0 (start of the last layer) makes 14 coefficients, block 1 (after the loop) 5 (record: L1356-1368)
MUDD_COEFFICIENTS = (14, 5)  # record: L1603, L1678
# MUDD's bias init at the effective scale (divided by mudd_scale when stored): block 0's VE gate lanes 2.0, resid
# sqrt(1.1), post 1, bigram 0.05 (attention half), resid sqrt(1.1), post 1 (MLP half); block 1's backout -0.5
MUDD_BIAS = {(0, 6): 2.0, (0, 7): 2.0, (0, 8): 1.1 ** 0.5, (0, 9): 1.0, (0, 11): 0.05, (0, 12): 1.1 ** 0.5,
             (0, 13): 1.0, (1, 1): -0.5}  # record: L1382-1395
# the MUDD gate's bias init at the effective scale, by kind; the other kinds start at 0   # record: L1451-1463
GATE_BIAS = {"attn_gate": 0.25, "bigram": 0.05, "skip": 0.5, "dc_w1": 1.0}
YARN_SLOTS = 8  # long windows the YaRN history holds (the speedrun applies 3 changes: 4 windows)
# Without autograd (validation) the head and the loss run on this many tokens at a time: all the logits of a
# 256K-token validation sequence would take 26 GB in bf16. On the CPU a (32, V) fp32 chunk stays in cache.
EVAL_CHUNK_CUDA, EVAL_CHUNK_CPU = 8192, 32
MUON_LABELS = ("attn_qk", "attn_vo", "mlp_fc", "mlp_proj")  # param_groups' labels of the hidden matrices


def gate_layout(config: GPTConfig, plan: LayerPlan) -> dict:
    """The MUDD gate's outputs: (kind, layer) -> (gate block, first column, width). Per block, in the record's order
    (L1469-1484): the XSA strengths of its XSA layers, its attention gate, the (x0, bigram) gate pairs of its layers,
    then (the post block) the skip gate and the DC weights w1, w2."""
    H, layout, sizes = config.num_heads, {}, [0, 0]

    def put(kind, layer, width, block):
        layout[kind, layer] = (block, sizes[block], width)
        sizes[block] += width

    def block(i):
        return 0 if plan.post_gate is None or i < plan.post_gate else 1
    for i in plan.xsa if config.xsa else ():
        put("xsa", i, H, block(i))
    for i in plan.gated:
        put("attn_gate", i, H, block(i))
    for i in plan.inject:
        put("x0", i, 1, block(i))
        if config.bigram:
            put("bigram", i, 1, block(i))
    if plan.no_attn is not None:
        put("skip", plan.no_attn, 1, block(plan.no_attn))
    if config.dc:
        put("dc_w1", plan.last, H, block(plan.last))
        put("dc_w2", plan.last, H, block(plan.last))
    return layout


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.layer_plan = plan = layer_plan(config.num_layers)
        L, V, C = config.num_layers, config.padded_vocab_size, config.model_dim
        self.lm_head = Head(C, V, config.lm_head_init_std)
        self.embed = nn.Embedding(V, C)
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head.weight.T)  # tied at init   # record: L1228-1231
        self.smear_gate = nn.Linear(config.smear_gate_dim, 1, bias=False)
        nn.init.zeros_(self.smear_gate.weight)  # record: L1327
        self.smear_lambda = nn.Parameter(torch.zeros(1))  # record: L1345
        self.num_ve = len(plan.ve) if config.value_embeds else 0
        if self.num_ve:  # one parameter (n_ve·V, C), viewed (n_ve, V, C)   # record: L1261
            self.value_embeds = nn.Parameter(config.ve_init_std * torch.randn(self.num_ve * V, C))
        if config.bigram:
            self.bigram_embed = nn.Embedding(config.bigram_rows, config.bigram_width)
            nn.init.zeros_(self.bigram_embed.weight)  # record: L1330
            # ±1 from its own generator (the record: the seeded global one, broadcast from rank 0): one table per
            # config, the same on every rank and in every model made from it
            signs = torch.randn(config.bigram_sign_rows, config.bigram_width, device="cpu",
                                generator=torch.Generator().manual_seed(0)).sign().to(torch.int8)  # record: L1331
            self.register_buffer("bigram_signs", signs.to(self.embed.weight.device))
        self.blocks = nn.ModuleList([Block(config, plan, i) for i in range(L)])
        # (L, 2): [:, 0] the attention sublayer, [:, 1] the MLP's. Unused, as in the record: the last layer's (MUDD
        # makes them) and the attention half of the no-attention layer
        self.resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1 ** 0.5))  # record: L1338
        self.post_lambdas = nn.Parameter(torch.ones(L, 2))  # record: L1334
        if plan.no_attn is not None:
            self.skip_lambda = nn.Parameter(torch.tensor([-1.5]))  # sigmoid: 0.18   # record: L1346
        # MUDD: 2 blocks of x -> GELU(W1 x) -> W2 · + b2, times mudd_scale   # record: L1370-1401
        self.mudd_w1 = nn.Parameter(torch.stack([nn.init.kaiming_uniform_(torch.empty(config.mudd_dim, C),
                                                                          a=math.sqrt(5)) for _ in range(2)]))
        self.mudd_w2 = nn.Parameter(torch.zeros(2, MUDD_COEFFICIENTS[0], config.mudd_dim))
        bias = torch.zeros(2, MUDD_COEFFICIENTS[0])
        for (b, j), value in MUDD_BIAS.items():
            bias[b, j] = value / config.mudd_scale
        self.mudd_b2 = nn.Parameter(bias)
        # the MUDD gate: that MLP with a learnable scale, 1 block (below 4 layers) or 2   # record: L1436-1463
        self.gate_layout = gate_layout(config, plan)
        n_blocks = 1 if plan.post_gate is None else 2
        sizes = [sum(w for b, _, w in self.gate_layout.values() if b == j) for j in range(n_blocks)]
        self.gate_sizes = sizes
        self.mudd_gate_w1 = nn.Parameter(torch.stack([nn.init.kaiming_uniform_(
            torch.empty(config.mudd_gate_dim, C), a=math.sqrt(5)) for _ in range(n_blocks)]))
        self.mudd_gate_w2 = nn.Parameter(torch.zeros(n_blocks, max(sizes), config.mudd_gate_dim))
        bias = torch.zeros(n_blocks, max(sizes))
        for (kind, _), (b, start, width) in self.gate_layout.items():
            bias[b, start:start + width] = GATE_BIAS.get(kind, 0.0) / config.mudd_gate_scale
        self.mudd_gate_b2 = nn.Parameter(bias)
        self.mudd_gate_scale = nn.Parameter(torch.tensor([config.mudd_gate_scale]))  # (1,): FSDP shards no 0-dim
        # YaRN: the long windows (tokens) applied so far, in order (0: none). The rotary frequencies and the softmax
        # scale are computed from them (rope()): integers survive any dtype cast of the model and its checkpoints
        self.register_buffer("yarn_windows", torch.zeros(YARN_SLOTS, dtype=torch.int64))
        # token -> its longest proper prefix token (-1: none), for the prefix loss; the trainer fills it (#88)
        self.register_buffer("prefix_table", torch.full((V,), -1, dtype=torch.int64), persistent=False)
        self.refresh_fp8(bootstrap=True)

    # -- rotary state, FP8 state ------------------------------------------------------------------------------------

    def rope(self) -> tuple[Tensor, Tensor]:
        """-> rotary frequencies (D/4,) fp32 and the softmax scale () fp32, after the YaRN changes applied so far."""
        cfg, device = self.config, self.yarn_windows.device
        freq = rope_frequencies(cfg.head_dim, cfg.rope_base, device)
        scale = torch.full((), cfg.attn_scale, device=device)
        windows = self.yarn_windows.float()
        for j in range(YARN_SLOTS - 1):  # fixed trip count: no host sync, one compiled graph for every history
            changed = windows[j + 1] > 0
            new_freq, new_scale = yarn(freq, scale, windows[j], windows[j + 1].clamp(min=1), *cfg.yarn)
            freq, scale = torch.where(changed, new_freq, freq), torch.where(changed, new_scale, scale)
        return freq, scale

    def apply_yarn(self, old_long_blocks: int, new_long_blocks: int) -> None:
        """The long window changes from old to new blocks (the trainer calls it at each stage change, not for the
        final validation's longer window, #33)."""
        old, new = old_long_blocks * self.config.block_len, new_long_blocks * self.config.block_len
        history = [w for w in self.yarn_windows.tolist() if w > 0] or [old]
        if history[-1] != old or len(history) == YARN_SLOTS:
            raise ValueError(f"apply_yarn({old_long_blocks}, {new_long_blocks}): the long window is "
                             f"{history[-1] // self.config.block_len} blocks, with {len(history) - 1} of "
                             f"{YARN_SLOTS - 1} changes used; pass the current window as old")
        history.append(new)
        self.yarn_windows.copy_(torch.tensor(history + [0] * (YARN_SLOTS - len(history))))

    def reset_yarn(self) -> None:
        self.yarn_windows.zero_()

    def refresh_fp8(self, bootstrap: bool) -> None:
        """After each optimizer step (and at init): the MLP down projections' delayed FP8 weight scales."""
        if self.config.fp8:
            for block in self.blocks:
                fp8.refresh_mlp_weights(block.mlp_proj[0], block.fp8_state, bootstrap)

    # -- the trunk, shared by full forwards and cached decoding -----------------------------------------------------

    def _activation_dtype(self, idx: Tensor) -> torch.dtype:
        return torch.bfloat16 if idx.is_cuda else torch.promote_types(torch.float32, self.embed.weight.dtype)

    def _mlp(self, x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, block: int, n: int, scale) -> Tensor:
        """MUDD's and the MUDD gate's per-token MLP: x (B, T, C) -> (B, T, n)."""
        h = F.gelu(F.linear(x, w1[block].type_as(x)))
        return (F.linear(h, w2[block, :n].type_as(x)) + b2[block, :n].type_as(x)) * scale

    def _embeddings(self, idx: Tensor, prev: Tensor, has_prev: Tensor, bigram_idx: Tensor | None, dtype):
        """-> x0 (B, T, C) the smeared embedding normed, value embeddings (n_ve, B, T, C) or None, the bigram
        embedding xb (B, T, bd) or None."""
        cfg = self.config
        e = self.embed(idx).to(dtype)  # (B, T, C)
        smear = self.smear_lambda.type_as(e) * torch.sigmoid(
            F.linear(e[..., :cfg.smear_gate_dim], self.smear_gate.weight.type_as(e)))  # (B, T, 1)
        x0 = norm(e + smear * self.embed(prev).to(dtype) * has_prev[..., None])  # record: L1547-1549
        ve = self.value_embeds.view(self.num_ve, -1, cfg.model_dim)[:, idx].to(dtype) if self.num_ve else None
        xb = None
        if cfg.bigram:
            if bigram_idx is None:
                bigram_idx = bigram_pairs(idx, prev, has_prev, cfg.bigram_rows)
            sign_idx = torch.where(has_prev, torch.bitwise_xor(prev, idx) % cfg.bigram_sign_rows, 0)  # record: L1536
            xb = self.bigram_embed(bigram_idx).to(dtype) * self.bigram_signs[sign_idx].to(dtype)  # (B, T, bd)
        return x0, ve, xb

    def _trunk(self, idx: Tensor, prev: Tensor, has_prev: Tensor, bigram_idx: Tensor | None, attn,
               fp8_mlp: bool) -> Tensor:
        """idx (B, T) tokens, prev (B, T) the token before each (any id where has_prev (B, T) is False) -> final
        hidden states (B, T, C), normed. attn: attention.FullAttention or CachedAttention."""
        cfg, plan = self.config, self.layer_plan
        H, last, dtype = cfg.num_heads, plan.last, self._activation_dtype(idx)
        x0, ve, xb = self._embeddings(idx, prev, has_prev, bigram_idx, dtype)
        ve_of = {layer: ve[j] for j, layer in enumerate(plan.ve)} if ve is not None else {}  # each (B, T, C)
        gates = [self._mlp(x0, self.mudd_gate_w1, self.mudd_gate_w2, self.mudd_gate_b2, 0, self.gate_sizes[0],
                           self.mudd_gate_scale.type_as(x0)), None]  # from x0; gates[1] from the post-gate layer

        def gate(kind, layer):  # -> (B, T, width) or None
            if (kind, layer) not in self.gate_layout:
                return None
            block, start, width = self.gate_layout[kind, layer]
            return gates[block][..., start:start + width]

        def mix(*terms):  # Σ coefficient · source over the sources that exist
            return sum((c * s for c, s in terms if s is not None), torch.zeros((), dtype=dtype, device=idx.device))

        x = x0 if gate("bigram", 0) is None else add_bigram(x0, xb * gate("bigram", 0))  # before layer 0
        x_in, saved, skipped, last_in = x, None, None, None  # the record's cache[0], cache[save], cache[skip], cache[9]
        ra, pa = self.resid_lambdas[:, 0], self.post_lambdas[:, 0]
        rm, pm = self.resid_lambdas[:, 1], self.post_lambdas[:, 1]
        for i, block in enumerate(self.blocks):
            if i == plan.post_gate:
                gates[1] = self._mlp(x, self.mudd_gate_w1, self.mudd_gate_w2, self.mudd_gate_b2, 1, self.gate_sizes[1],
                                     self.mudd_gate_scale.type_as(x))
            inputs = LayerInputs(resid_mlp=rm[i], post_mlp=pm[i], fp8=fp8_mlp)
            if i == plan.no_attn:  # the gated skip   # record: L1592-1595
                x = x + torch.sigmoid(self.skip_lambda).type_as(x) * gate("skip", i) * skipped
                x = block(x, None, inputs, attn)
            else:
                a = norm(saved if i in plan.readers else x)  # record: L1598
                inputs.ve, inputs.xb, inputs.xsa_alpha = ve_of.get(i), xb, gate("xsa", i)
                inputs.attn_gate = gate("attn_gate", i)
                if i == last:  # MUDD block 0 makes this layer's coefficients   # record: L1601-1616, L1634-1663
                    last_in = x
                    mu = self._mlp(x, self.mudd_w1, self.mudd_w2, self.mudd_b2, 0, MUDD_COEFFICIENTS[0],
                                   cfg.mudd_scale).split(1, dim=-1)  # 14 x (B, T, 1)
                    inputs.v_extra = mix((mu[0], x_in), (mu[1], saved), (mu[2], x))
                    x = (1 + mu[5]) * x + mix((mu[3], x_in), (mu[4], saved))
                    inputs.ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(H // 2, dim=-1)  # (B, T, H)
                    inputs.resid_attn, inputs.post_attn, inputs.inject, inputs.inject_gate = mu[8], mu[9], x_in, mu[10]
                    inputs.bigram_gate = mu[11] if cfg.bigram else None
                    inputs.resid_mlp, inputs.post_mlp = mu[12], mu[13]
                    if cfg.dc:
                        inputs.dc = (gate("dc_w1", i), gate("dc_w2", i))
                else:
                    inputs.resid_attn, inputs.post_attn, inputs.inject = ra[i], pa[i], x0
                    inputs.inject_gate = gate("x0", i)
                    inputs.bigram_gate = gate("bigram", i) if i != 0 else None  # layer 0's came before it
                x = block(x, a, inputs, attn)
            if i == plan.skip_src:
                skipped = x
            if i == plan.save:
                saved = x
        mu = self._mlp(x, self.mudd_w1, self.mudd_w2, self.mudd_b2, 1, MUDD_COEFFICIENTS[1],
                       cfg.mudd_scale).split(1, dim=-1)  # MUDD block 1   # record: L1677-1680
        first_ve = ve[0] if self.num_ve else None
        x = x + mix((mu[0], x_in), (mu[1], saved), (mu[2], last_in), (mu[3], first_ve), (mu[4], skipped))
        return norm(x)

    # -- training, scoring ------------------------------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, windows=None, mtp_weights: Tensor | None = None,
                prefix_weight: Tensor | None = None, bigram_idx: Tensor | None = None, reduction: str = "mean",
                grad_scale: float = 1.0) -> Tensor:
        """idx (B, T) int64 -> with targets (B, T) (-100: none): the loss, else logits (B, T, vocab_size) fp32.

        In train mode with reduction="sum" the loss is the training objective (#53, #88): per position i,
        Σ_k mtp_weights[k]·CE(logits_i, targets[i + k]) (targets within the row) + prefix_weight·CE(logits_i,
        prefix_table[targets[i]]), summed, with the FP8 head if config.fp8 (grad_scale: the factor the caller
        multiplies this sum by before backward, for the FP8 gradient's scale). mtp_weights (K,) fp32, None: [1];
        prefix_weight () fp32, None: no prefix term. Otherwise plain next-token cross-entropy, summed or ("mean")
        averaged over the targets. windows: (short, long) blocks as ints or 0-dim tensors (tensors: no recompiles),
        None: config.windows. bigram_idx (B, T): bigram_hash(idx) from the loader, None: computed here."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"GPT.forward: reduction={reduction!r}, use 'mean' or 'sum'")
        x = self.hidden(idx, windows, bigram_idx)  # (B, T, C)
        if targets is None:
            return self.head(x)
        if self.training and reduction == "sum":
            return self._objective(x, targets, mtp_weights, prefix_weight, grad_scale)
        loss = self._next_token_loss(x.flatten(0, 1), targets.flatten())
        return loss if reduction == "sum" else loss / (targets != -100).sum()

    def _objective(self, x: Tensor, targets: Tensor, mtp_weights, prefix_weight, grad_scale: float) -> Tensor:
        # x (B, T, C), targets (B, T) -> () fp32: the summed training objective over a (B·T, K (+1)) target matrix
        weights = torch.ones(1, device=x.device) if mtp_weights is None else mtp_weights.float()
        columns = [F.pad(targets[:, k:], (0, k), value=-100) for k in range(weights.numel())]  # target of i + k
        if prefix_weight is not None:
            prefix = self.prefix_table[targets.clamp(min=0)]
            columns.append(torch.where((targets >= 0) & (prefix >= 0), prefix, -100))
            weights = torch.cat([weights, prefix_weight.float().reshape(1)])
        z = fp8.head_logits(x.flatten(0, 1), self.lm_head.weight, grad_scale, self.config.fp8)  # (B·T, V)
        target_matrix = torch.stack(columns, dim=-1).flatten(0, 1)  # (B·T, K)
        return speedrun_kernels.softcap_cross_entropy(z, target_matrix, weights, self.config.softcap).sum()

    def _next_token_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """x (N, C), targets (N,) -> summed cross-entropy (fp32) over targets != -100, plain head. Without autograd
        the head runs EVAL_CHUNK_* tokens at a time."""
        chunk = x.size(0) if torch.is_grad_enabled() else EVAL_CHUNK_CUDA if x.is_cuda else EVAL_CHUNK_CPU
        one, total = torch.ones(1, device=x.device), torch.zeros((), device=x.device)
        for xs, ts in zip(x.split(chunk), targets.split(chunk)):
            z = fp8.head_logits(xs, self.lm_head.weight, 1.0, fp8=False)
            total = total + speedrun_kernels.softcap_cross_entropy(z, ts[:, None], one, self.config.softcap).sum()
        return total

    def hidden(self, idx: Tensor, windows=None, bigram_idx: Tensor | None = None) -> Tensor:
        """idx (B, T) int64 -> final hidden states (B, T, C): forward without the head (objective.token_logprobs
        applies head() to a chunk of them at a time). windows, bigram_idx: as forward's."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > GPTConfig.max_seq_len={cfg.max_seq_len}")
        short, long = cfg.windows if windows is None else windows
        attn = FullAttention(idx, cfg.eos_token_id, {"short": short * cfg.block_len, "long": long * cfg.block_len},
                             *self.rope(), cfg.dc_window)
        prev = F.pad(idx[:, :-1], (1, 0))  # (B, T)
        has_prev = (torch.arange(T, device=idx.device) > 0).expand(B, T)
        return self._trunk(idx, prev, has_prev, bigram_idx, attn, fp8_mlp=cfg.fp8 and self.training)

    def head(self, x: Tensor) -> Tensor:
        """x (..., C) from hidden() -> softcapped logits (..., vocab_size) fp32 (the plain head)."""
        z = fp8.head_logits(x.flatten(0, -2), self.lm_head.weight, 1.0, fp8=False)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        logits = speedrun_kernels.softcap_logits(z, self.config.softcap)
        return logits.view(*x.shape[:-1], -1)[..., :self.config.vocab_size]

    # -- cached decoding (the KV-cache protocol of grpo/engine.py's rollout engine) -----------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        cfg = self.config
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} > GPTConfig.max_seq_len={cfg.max_seq_len}")
        device = self.embed.weight.device
        dtype = self._activation_dtype(torch.empty(0, device=device))
        shape = (len(self.layer_plan.attn), batch_size, max_len, cfg.num_heads, cfg.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(batch_size, max_len, dtype=torch.int64, device=device))

    def forward_cached(self, idx: Tensor, pos: Tensor, cache: KVCache, logits: bool = True) -> Tensor | None:
        """idx, pos (B, t) int64 -> logits (B, t, vocab_size) fp32 (logits=False: None, only the cache writes of a
        prefill). Writes this step's tokens, keys and values at pos; every query attends to the cached positions <=
        its own within its layer's window (config.windows, counted from position 0), one document per row; the
        token at pos - 1 (smear, bigram hash) comes from the cache. Equals hidden() + head() on the whole rows."""
        if cache.tokens is None:
            raise ValueError("GPT.forward_cached: the cache has no token ids: make it with GPT.init_cache")
        cfg = self.config
        rows = torch.arange(idx.size(0), device=idx.device)[:, None]
        cache.tokens[rows, pos] = idx
        prev = cache.tokens[rows, (pos - 1).clamp(min=0)]
        short, long = cfg.windows
        attn = CachedAttention(cache, pos, {"short": short * cfg.block_len, "long": long * cfg.block_len},
                               *self.rope(), cfg.dc_window)
        x = self._trunk(idx, prev, pos > 0, None, attn, fp8_mlp=False)
        return self.head(x) if logits else None

    # -- optimizer grouping and FLOPs --------------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter under one label (train_gpt.py's optimizer table): the MUON_LABELS are the hidden matrices,
        each parameter a batch of (rows, cols) matrices along its first dim; the rest go to Adam."""
        blocks = list(self.blocks)
        attn = [b for b in blocks if b.has_attn]
        optional = lambda name: [getattr(self, name)] if hasattr(self, name) else []  # noqa: E731
        groups = {
            "attn_qk": [b.attn_qk for b in attn],             # (H, 2D, C): Q head pairs, then K head pairs
            "attn_vo": [b.attn_vo for b in attn],             # (2, C, C): W_V, W_O
            "mlp_fc": [b.mlp_fc for b in blocks],             # (1, 4C, C)
            "mlp_proj": [b.mlp_proj for b in blocks],         # (1, 4C, C)
            "embed": [self.embed.weight],                     # (V, C)
            "lm_head": [self.lm_head.weight],                 # (C, V)
            "value_embeds": optional("value_embeds"),         # (n_ve·V, C)
            "bigram_embed": [self.bigram_embed.weight] if self.config.bigram else [],  # (Vb, bd)
            "ve_gates": [b.ve_gate for b in blocks if b.ve_gate is not None],  # (H, 2·ve_gate_dim) each
            "smear_gate": [self.smear_gate.weight],           # (1, smear_gate_dim)
            "scalars": [b.sa_lambdas for b in attn] + [self.smear_lambda] + optional("skip_lambda"),
            "resid_lambdas": [self.resid_lambdas],            # (L, 2)
            "post_lambdas": [self.post_lambdas],              # (L, 2)
            "mudd_w1": [self.mudd_w1], "mudd_w2": [self.mudd_w2], "mudd_b2": [self.mudd_b2],
            "mudd_gate_w1": [self.mudd_gate_w1], "mudd_gate_w2": [self.mudd_gate_w2],
            "mudd_gate_b2": [self.mudd_gate_b2], "mudd_gate_scale": [self.mudd_gate_scale],
        }
        ids = [id(p) for g in groups.values() for p in g]
        assert len(ids) == len(set(ids)) == len(list(self.parameters())), "param_groups must cover each parameter once"
        return groups

    def estimate_flops_per_token(self, windows=None) -> float:
        """Training FLOPs per token (forward + backward, 3 x 2 per multiply-add): the matmul weights (the embedding
        tables are lookups), the MUDD MLPs at the widths used, and attention's QKᵀ and AV over the keys a query
        sees (its layer's window; DC's on the last layer). The count nanoGPT's 12·L·H·Q·T makes: every query against
        its whole window, not the causal half."""
        cfg = self.config
        C, H, D, V = cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.padded_vocab_size
        short, long = (int(w) for w in (cfg.windows if windows is None else windows))
        macs = C * V + cfg.smear_gate_dim  # the head; the smear gate
        macs += sum(2 * cfg.mlp_ratio * C * C + (4 * C * C if b.has_attn else 0) for b in self.blocks)
        macs += sum(b.ve_gate.numel() for b in self.blocks if b.ve_gate is not None)
        macs += sum(cfg.mudd_dim * (C + n) for n in MUDD_COEFFICIENTS)
        macs += sum(cfg.mudd_gate_dim * (C + n) for n in self.gate_sizes)
        reach = {"short": short * cfg.block_len, "long": long * cfg.block_len}
        macs += sum(2 * H * D * min(reach[b.window] + 1, (2 if b.paired else 1) * cfg.max_seq_len)  # paired: 2T
                    for b in self.blocks if b.has_attn)
        if cfg.dc:
            macs += 2 * H * D * min(cfg.dc_window, cfg.max_seq_len)
        return 6.0 * macs
