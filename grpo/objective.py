"""
GRPO's math: the log-probs of sampled tokens (flat in memory), group-relative advantages, the clipped
policy-gradient loss (GRPO, Dr. GRPO, DAPO, GSPO, CISPO-style delta clipping) and its KL estimators.

    token_logprobs(model, tokens, ...)          -> (logp, entropy)   log-probs of given tokens: old, current, reference
    group_advantages(rewards, group_size, ...)  -> advantages        reward minus its group's mean (and / std)
    policy_loss(logp, old_logp, advantages, mask, ...) -> (loss, metrics)

token_logprobs never holds more than one chunk of logits (LOGITS_CHUNK): the head runs a chunk of positions at a
time, forward and backward, so a 152K vocabulary costs the same memory as a small one. With prompt_lens the rows of
a group run their shared prompt once (the model's hidden_shared). Given the ids the rollout engine never samples
(undecodable), the log-probs and entropies are of the same distribution as the sampler's: those logits are -inf.
"""

import torch
import torch.distributed as dist
from torch import Tensor



# -----------------------------------------------------------------------------
# Log-probs of given tokens with flat memory: training, reference and old log-probs, the SFT loss

LOGITS_CHUNK = 2 ** 26  # logits per head chunk in token_logprobs: 256 MiB in fp32, whatever the vocabulary


def chunk_logits(model, h: Tensor, temperature: float, undecodable: Tensor | None) -> Tensor:
    """h (c, C) final hidden states -> logits / temperature (c, V) fp32 (temperature 0 or 1: no division), -inf at
    the undecodable ids (in place: no second (c, V) tensor). The head runs on the 2-D h: its backward through a
    (1, c, C) view is slower."""
    logits = model.head(h)
    logits = logits if temperature in (0.0, 1.0) else logits / temperature
    return logits if undecodable is None else logits.index_fill_(-1, undecodable, float("-inf"))


def chunk_forward(model, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                  undecodable: Tensor | None):
    """h (c, C), targets (c,) -> (log-probs (c,), entropies (c,) or None). A function of its own so that this
    chunk's (c, V) tensors are freed on return, before the next chunk's are made."""
    logp_all = torch.log_softmax(chunk_logits(model, h, temperature, undecodable), dim=-1)  # (c, V)
    entropy = None
    if with_entropy:
        p_logp = logp_all.exp().mul_(logp_all)  # (c, V); 0 * -inf is nan: the undecodable ids' terms are 0
        entropy = -(p_logp if undecodable is None else p_logp.index_fill_(-1, undecodable, 0.0)).sum(dim=-1)
    return logp_all.gather(1, targets[:, None])[:, 0], entropy


def chunk_backward(model, h: Tensor, targets: Tensor, temperature: float, undecodable: Tensor | None,
                   grad_logp: Tensor, params: list, grad_params: list) -> Tensor:
    """Recompute the chunk's logits z and backpropagate grad_logp (c,) through them: d logp / d z = onehot(target)
    - softmax(z) (0 at the undecodable ids). Adds the parameters' gradients (the head's; None for the others) into
    grad_params; -> grad of h (c, C)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        z = chunk_logits(model, h, temperature, undecodable)  # (c, V)
        g = grad_logp[:, None]  # (c, 1)
        grad_z = torch.softmax(z.detach(), dim=-1).mul_(-g).scatter_add_(1, targets[:, None], g)
        grad_h, *grads = torch.autograd.grad(z, [h, *params], grad_z, allow_unused=True)
    for k, grad in enumerate(grads):
        if grad is not None:
            grad_params[k] = grad if grad_params[k] is None else grad_params[k].add_(grad)
    return grad_h


class ChunkedLogprobs(torch.autograd.Function):
    """h (n, C), targets (n,) -> (log-probs (n,) of the targets under softmax(chunk_logits), that distribution's
    entropy (n,) or an empty tensor), running the head on `chunk` positions at a time, forward and backward (which
    recomputes each chunk's logits). params: every trainable parameter of the model, so that the head's get gradients."""

    @staticmethod
    def forward(ctx, h, targets, model, temperature, chunk, with_entropy, undecodable, *params):
        """The log-probs and entropies, chunk by chunk; saves h and the parameters for the backward."""
        parts = [chunk_forward(model, h[i:i + chunk], targets[i:i + chunk], temperature, with_entropy, undecodable)
                 for i in range(0, h.size(0), chunk)]
        logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat([p[1] for p in parts]) if parts and with_entropy else logp.new_zeros(0)
        ctx.save_for_backward(h, targets, *params)
        ctx.model, ctx.temperature, ctx.chunk, ctx.undecodable = model, temperature, chunk, undecodable
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _):
        """The gradients of h and of the parameters, each chunk's logits recomputed (the entropy has none)."""
        h, targets, *params = ctx.saved_tensors
        grad_h, grad_params = torch.zeros_like(h), [None] * len(params)
        for i in range(0, h.size(0), ctx.chunk):
            grad_h[i:i + ctx.chunk] = chunk_backward(ctx.model, h[i:i + ctx.chunk], targets[i:i + ctx.chunk],
                                                     ctx.temperature, ctx.undecodable, grad_logp[i:i + ctx.chunk],
                                                     params, grad_params)
        return grad_h, None, None, None, None, None, None, *grad_params


def prompt_groups(tokens: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens (B, L), prompt_lens (B,) -> (prompts (P, Tp): the distinct prompts, -1 past each one's end; group (B,):
    the index of each row's prompt). Rows with equal prompts share one, wherever they sit in the batch."""
    Tp = int(prompt_lens.max())
    col = torch.arange(Tp, device=tokens.device)
    key = torch.where(col < prompt_lens[:, None], tokens[:, :Tp], -1)  # (B, Tp)
    return torch.unique(key, dim=0, return_inverse=True)


def shared_hidden(model, tokens: Tensor, prompt_lens: Tensor, mask: Tensor) -> Tensor:
    """model.hidden(tokens[:, :-1])[mask] (n, C), with each distinct prompt's trunk run once (model.hidden_shared).
    mask (B, L-1) must score nothing before a row's last prompt token (completions' targets only)."""
    B, L = tokens.shape
    first = prompt_lens - 1  # (B,) the first scored position a row may have: its last prompt token
    if bool((mask & (torch.arange(L - 1, device=tokens.device) < first[:, None])).any()):
        raise ValueError("token_logprobs: with prompt_lens, the mask may score only targets after the prompt")
    prompts, group = prompt_groups(tokens, prompt_lens)  # (P, Tp), (B,)
    Tc = max(1, int((L - 1 - prompt_lens).max()))  # completion positions whose hidden states are scored
    at = first[:, None] + torch.arange(1 + Tc, device=tokens.device)  # (B, 1+Tc): positions Lp-1, Lp, ...
    completions = tokens.gather(1, at[:, 1:].clamp(max=L - 1))  # (B, Tc): past a row's end, any token (causal)
    hp, hc = model.hidden_shared(prompts.clamp(min=0), (prompts >= 0).sum(1), completions, group)
    h = torch.cat([hp[group, first][:, None], hc], dim=1)  # (B, 1+Tc, C): the hidden states at positions `at`
    scored = (at < L - 1) & mask.gather(1, at.clamp(max=L - 2))  # (B, 1+Tc)
    return h[scored]  # row-major, positions increasing: the order of hidden(tokens[:, :-1])[mask]


def token_logprobs(model, tokens: Tensor, temperature: float = 1.0, mask: Tensor | None = None,
                   with_entropy: bool = False, chunk_tokens: int | None = None, prompt_lens: Tensor | None = None,
                   undecodable: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """tokens (B, L) -> (logp (B, L-1): the log-prob of tokens[:, 1:] under softmax(logits / temperature), the
    sampler's distribution (temperature 0 or 1: softmax(logits), no division); entropy (B, L-1) of that distribution
    (no grad) or None). mask (B, L-1) bool: score only those targets (0 elsewhere); the head never sees the others.
    prompt_lens (B,): rows whose first prompt_lens tokens are equal share one trunk pass over them (GRPO's groups;
    needs a policy with hidden_shared: policy.shares_prompts); the mask must then score only targets after the
    prompt. undecodable (k,) int64: ids whose logits are -inf, as engine.generate's sampler has them (a padded
    vocabulary's rows).

    Flat memory: the trunk runs once (model.hidden), then the head runs on chunk_tokens positions at a time (default:
    LOGITS_CHUNK logits' worth) and each chunk keeps only its targets' log-probs and entropies; backward recomputes
    the chunks one at a time (ChunkedLogprobs). One chunk of (chunk_tokens, V) logits is the most that ever lives,
    whatever B * L: no (B, L, V) tensor is made, in any dtype. Training, reference and old log-probs and the SFT loss
    all come from here."""
    B, L = tokens.shape
    mask = torch.ones(B, L - 1, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    if prompt_lens is not None:
        h = shared_hidden(model, tokens, prompt_lens, mask)  # (n, C)
    else:
        h = model.hidden(tokens[:, :-1])[mask]  # (n, C): the scored positions only
    chunk = chunk_tokens or max(1, LOGITS_CHUNK // model.config.vocab_size)
    undecodable = None if undecodable is None else undecodable.to(tokens.device)
    logp, entropy = ChunkedLogprobs.apply(h, tokens[:, 1:][mask], model, temperature, chunk, with_entropy,
                                          undecodable, *(p for p in model.parameters() if p.requires_grad))

    def place(values):
        """values (n,) at the mask's positions -> (B, L-1), 0 off the mask."""
        out = torch.zeros(B, L - 1, dtype=values.dtype, device=tokens.device)
        out[mask] = values
        return out
    return place(logp), place(entropy) if with_entropy else None



# -----------------------------------------------------------------------------
# the algorithm: advantages and the clipped policy-gradient loss

def overlong_penalty(lengths, max_new_tokens, buffer):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward: lengths (N,) of completion
    tokens -> (N,) 0 up to max_new_tokens - buffer tokens, then falling linearly to -1 at max_new_tokens (a
    truncated completion). It teaches a policy to end: a right answer with junk after it scores less than one that
    stops."""
    return ((max_new_tokens - buffer - lengths.double()) / buffer).clamp(-1.0, 0.0)


def group_statistics(rewards, group_size):
    """rewards (N,) in contiguous groups of group_size, NaN where the verifier failed -> (valid (P, G), centred (P, G):
    reward minus the mean of its group's valid rewards, 0 at failed rows; count (P, 1) of valid rows, informative (P,):
    the group has two valid rewards that differ). Failed rows are left out of the statistics entirely."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} is not groups of group_size={group_size}")
    groups = rewards.view(-1, group_size)                                   # (P, G)
    valid = ~torch.isnan(groups)                                            # (P, G)
    count = valid.sum(dim=1, keepdim=True)                                  # (P, 1)
    mean = torch.where(valid, groups, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, groups - mean, 0.0)                        # (P, G)
    lowest = torch.where(valid, groups, torch.inf).amin(dim=1)              # (P,)
    highest = torch.where(valid, groups, -torch.inf).amax(dim=1)            # (P,)
    return valid, centred, count, (count.squeeze(1) >= 2) & (lowest < highest)


def global_sum(values, device):
    """list of floats -> their sums over ranks (one all_reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def batch_std(values):
    """values (n,) on this rank -> the unbiased std of every rank's values together: count, sum and sum of squares
    are all-reduced in float64 (a collective: every rank must call it, with or without values)."""
    n, total, squares = global_sum([values.numel(), values.double().sum().item(), values.double().square().sum().item()],
                                   values.device)
    return (max(squares - total * total / n, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0


def group_advantages(rewards, group_size, scale="group"):
    """rewards (N,) in contiguous groups of group_size, NaN where the verifier failed -> advantages (N,). A failed row
    is left out of its group's mean and std and gets exactly 0; so does every row of a group whose valid rewards
    are all equal (or fewer than two): it carries no signal, whatever the scale."""
    valid, centred, count, informative = group_statistics(rewards, group_size)
    if scale == "group":                                                    # GRPO: Bessel std of the group
        std = (centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        advantages = centred / (std + 1e-4)
    elif scale == "batch":                                                  # one std: all valid rewards, all ranks
        advantages = centred / (batch_std(rewards[~torch.isnan(rewards)]) + 1e-4)
    elif scale == "none":                                                   # Dr. GRPO: centre only
        advantages = centred
    else:
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    return torch.where(valid & informative[:, None], advantages, 0.0).view(-1)


def policy_loss(logp, old_logp, advantages, mask, *, loss_type="dapo", level="token", eps_low=0.2, eps_high=0.2,
                delta=None, ref_logp=None, beta=0.0, kl_estimator="k3", max_completion_length=None, num_tokens=None,
                num_rows=None, entropy=None):
    """logp, old_logp, ref_logp, entropy, mask: (B, T) over completion tokens; advantages (B,) -> (loss, metrics).
    Every loss_type divides by counts of the whole optimizer step, over all its micro-batches and ranks: num_tokens
    (dapo: the step's completion tokens) or num_rows (grpo: each row's token mean, summed; dr_grpo: times
    max_completion_length); None: this batch's own. So a micro-batch's loss is its share of the step's loss, the
    shares add up to it whatever the batching, and the trainer's one scaling, the world size (it undoes the mean
    the gradients' all-reduce takes), holds for every loss_type. A new loss_type must normalise the same way
    (tests/test_grpo.py checks micro-batches, tests/test_objective.py 2 ranks, against one batch in one process, for
    each).
    Masked positions (prompt, padding, after EOS) are replaced by constants before any arithmetic, so they get
    exactly zero gradient even when their logp is -inf.
    delta: INTELLECT-2's two-sided clipping (arXiv 2505.07291, sec. 4.1): the unclipped ratio is capped at delta, so
    a token with A < 0 whose ratio has grown past delta stops pushing; it must exceed 1 + eps_high, where A > 0 is
    already clipped. kl_estimator (beta > 0), the per-token KL to the reference, d = log pi_ref - log pi_theta:
      "k3"     exp(d) - d - 1 (DeepSeekMath eq. 4, in GRPO's objective eq. 3). Its value estimates KL(pi_theta ||
               pi_ref), but on-policy its expected gradient is that of the forward KL(pi_ref || pi_theta).
      "k3-is"  k3 times the token's ratio pi_theta / pi_old, with its gradient (DeepSeek-V3.2, arXiv 2512.02556,
               eq. 7; TRL's default): the gradient is then an unbiased estimate of that of KL(pi_theta || pi_ref).
               The ratio is the token's at either level (TRL uses the sequence ratio at level "sequence")."""
    mask = mask.bool()
    maskf = mask.to(logp.dtype)                                             # (B, T)
    tokens_per_row = maskf.sum(dim=1)                                       # (B,)
    log_ratio = torch.where(mask, logp - old_logp, 0.0)                     # (B, T)
    if level == "token":
        ratio = torch.exp(log_ratio)                                        # (B, T)
    elif level == "sequence":                                               # GSPO: one length-normalised ratio
        seq_log_ratio = log_ratio.sum(dim=1) / tokens_per_row.clamp(min=1)  # (B,)
        ratio = torch.exp(seq_log_ratio)[:, None].expand_as(logp)           # (B, T)
    else:
        raise ValueError(f"policy_loss: level must be 'token' or 'sequence', got {level!r}")
    adv = advantages[:, None].to(logp.dtype)                                # (B, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    if delta is not None and not delta > 1 + eps_high:
        raise ValueError(f"policy_loss: delta={delta} must exceed 1 + eps_high = {1 + eps_high} (INTELLECT-2 uses 4)")
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)  # (B, T)
    per_token = -torch.minimum(unclipped * adv, clipped * adv)              # (B, T)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("policy_loss: beta > 0 needs ref_logp (the frozen reference model's log-probs)")
        d = torch.where(mask, ref_logp - logp, 0.0)                         # (B, T)
        kl = torch.exp(d) - d - 1                                           # k3 estimator, >= 0, 0 where equal
        if kl_estimator == "k3-is":
            kl = kl * torch.exp(log_ratio)                                  # the token ratio, gradient through it
        elif kl_estimator != "k3":
            raise ValueError(f"policy_loss: kl_estimator must be 'k3' or 'k3-is', got {kl_estimator!r}")
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, 0.0)
    rows = logp.shape[0] if num_rows is None else num_rows
    if loss_type == "grpo":                                                 # mean over tokens, then sequences
        loss = (per_token.sum(dim=1) / tokens_per_row.clamp(min=1)).sum() / rows
    elif loss_type == "dr_grpo":                                            # constant normaliser rows * L_max
        if max_completion_length is None:
            raise ValueError("policy_loss: loss_type='dr_grpo' needs max_completion_length")
        loss = per_token.sum() / (rows * max_completion_length)
    elif loss_type == "dapo":                                               # token mean over the optimizer step
        total = maskf.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device)
        loss = per_token.sum() / total.clamp(min=1)
    else:
        raise ValueError(f"policy_loss: loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")

    with torch.no_grad():
        n = maskf.sum().clamp(min=1)
        metrics = {
            "clip_low": ((ratio < 1 - eps_low) & (adv < 0) & mask).sum() / n,    # clipped below, A < 0
            "clip_high": ((ratio > 1 + eps_high) & (adv > 0) & mask).sum() / n,  # clipped above, A > 0
            "clip_delta": ((ratio > (delta or torch.inf)) & (adv < 0) & mask).sum() / n,  # capped at delta, A < 0
            "ratio": (ratio * maskf).sum() / n,
            "kl": (kl * maskf).sum() / n if kl is not None else torch.zeros((), device=logp.device),
        }
        if entropy is not None:
            metrics["entropy"] = (entropy * maskf).sum() / n
    return loss, metrics
