"""
Compact GRPO fine-tuner: reinforcement learning with verifiable rewards (the DeepSeek-R1 recipe), in one file.

    python train_grpo.py                                    # CPU demo: tiny policy, arithmetic, SFT then GRPO
    torchrun --nproc_per_node=8 train_grpo.py --policy hf:Qwen/Qwen2.5-0.5B-Instruct --task gsm8k ...

Per step: sample P prompts x G completions, score them with rule-based rewards (tasks.py), turn rewards into
group-relative advantages, then take clipped policy-gradient steps on the completion tokens.
"""

import torch


# -----------------------------------------------------------------------------
# the algorithm: advantages and the clipped policy-gradient loss

def group_advantages(rewards, group_size, scale="group"):
    # rewards (N,) in contiguous groups of group_size -> advantages (N,). A group whose rewards are all equal
    # carries no signal and gets exactly 0, whatever the scale.
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} is not a multiple of group_size={group_size}")
    if group_size == 1:                                                     # nothing to compare with
        return torch.zeros_like(rewards)
    groups = rewards.view(-1, group_size)                                   # (P, G)
    centred = groups - groups.mean(dim=1, keepdim=True)                     # (P, G)
    if scale == "group":                                                    # GRPO
        advantages = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":                                                  # one std for the whole batch
        advantages = centred / (rewards.std() + 1e-4)
    elif scale == "none":                                                   # Dr. GRPO: centre only
        advantages = centred
    else:
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    all_equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)         # (P, 1)
    return advantages.masked_fill(all_equal, 0.0).view(-1)


def policy_loss(logp, old_logp, advantages, mask, *, loss_type="dapo", level="token", eps_low=0.2, eps_high=0.2,
                ref_logp=None, beta=0.0, max_completion_length=None, num_tokens=None, entropy=None):
    # logp, old_logp, ref_logp, entropy, mask: (B, T) over completion tokens; advantages (B,) -> (loss, metrics)
    # Masked positions (prompt, padding, after EOS) are replaced by constants before any arithmetic, so they get
    # exactly zero gradient even when their logp is -inf.
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
    per_token = -torch.minimum(ratio * adv, clipped * adv)                  # (B, T)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("policy_loss: beta > 0 needs ref_logp (the frozen reference model's log-probs)")
        d = torch.where(mask, ref_logp - logp, 0.0)                         # (B, T)
        kl = torch.exp(d) - d - 1                                           # k3 estimator, >= 0, 0 where equal
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, 0.0)
    if loss_type == "grpo":                                                 # mean over tokens, then sequences
        loss = (per_token.sum(dim=1) / tokens_per_row.clamp(min=1)).mean()
    elif loss_type == "dr_grpo":                                            # constant normaliser B * L_max
        if max_completion_length is None:
            raise ValueError("policy_loss: loss_type='dr_grpo' needs max_completion_length")
        loss = per_token.sum() / (logp.shape[0] * max_completion_length)
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
            "ratio": (ratio * maskf).sum() / n,
            "kl": (kl * maskf).sum() / n if kl is not None else torch.zeros((), device=logp.device),
        }
        if entropy is not None:
            metrics["entropy"] = (entropy * maskf).sum() / n
    return loss, metrics
