"""Cross-entropy over softcapped logits with several weighted targets per row (the torch reference).

The model caps its logits z before the loss (record #54: A, B, C = 23, 5, 7.5):
    y = A * sigmoid((z + B) / C)
and scores each row against K targets (next token, the multi-token-prediction targets, the prefix token):
    loss_i = sum_k weights[k] * (logsumexp(y_i) - y_i[targets[i, k]])   over the targets != -100
The gradient flows to the logits in their own dtype.
"""
import torch

IGNORE_INDEX = -100


def softcap_logits(z, softcap=(23.0, 5.0, 7.5)):
    # z (..., V) -> capped logits y, same shape and dtype
    A, B, C = softcap
    return A * torch.sigmoid((z + B) / C)


def softcap_cross_entropy_reference(logits, targets, weights, softcap=(23.0, 5.0, 7.5)):
    # logits (N, V) any float dtype, targets (N, K) int64, weights (K,) -> (N,) fp32 (float64 for float64 logits)
    y = softcap_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)), softcap)
    lse = y.logsumexp(dim=-1, keepdim=True)  # (N, 1)
    valid = targets != IGNORE_INDEX
    picked = y.gather(1, targets.clamp(min=0))  # (N, K)
    return torch.where(valid, (lse - picked) * weights.to(y.dtype), 0.0).sum(dim=1)


def softcap_cross_entropy(logits, targets, weights, softcap=(23.0, 5.0, 7.5)):
    """Per-row weighted cross-entropy of softcapped logits: logits (N, V) (the raw lm_head output z), targets (N, K)
    int64 in [0, V) or -100, weights (K,) fp32 -> (N,) fp32, differentiable in logits."""
    if logits.dim() != 2 or targets.dim() != 2 or targets.size(0) != logits.size(0) or \
            weights.shape != targets.shape[1:]:
        raise ValueError(f"softcap_cross_entropy: want logits (N, V), targets (N, K), weights (K,), got "
                         f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(weights.shape)}")
    return softcap_cross_entropy_reference(logits, targets, weights, softcap)
