"""
The metrics of a GRPO step, each declared once: its name, how the ranks' counts make it, how the run log writes it
and what the console's per-step line shows of it.

    step_metrics(counts, device, **given) -> metrics   this rank's counts (collect() and rl_update() add to one
                                                        Counter) -> the step's metrics, the same dict on every rank
    log_line(metrics, steps)                           the run log's line of the step: "step:3/120 loss:0.0123 ..."
    console_line(metrics, steps, target, tools)        the line the user sees: "step 3/120 | loss 0.0123 lr ..."

The metrics dict is all that a step reports: the --log-file JSON line is the dict itself, the run log's step line is
every entry as name:value (records/compare.py reads any such line back into the same names, log_line's precision),
and the console line shows the metrics that declare a piece of it. A metric is made from the counts its `value`
function names as parameters: summed over ranks (over_ranks "sum"), their maximum or minimum ("max", "min"), or
this rank's own ("rank"); the `given` values (the learning rates, the clocks) are the loop's, on every rank alike.
Adding a metric is one line below, plus the count in collect() or rl_update() if it needs a new one; a count
that no metric reads is an error, not a silent loss.

For TRL users: loss, learning_rate (here lr, and muon_lr), reward, reward_std, kl, entropy, grad_norm and num_tokens
are the same quantities; completions/{mean,min,max}_length are completion_len{,_min,_max},
completions/mean_terminated_length is completion_len_eos, completions/clipped_ratio is truncated,
clip_ratio/{low,high,region}_mean are clip_{low,high,region}, frac_reward_zero_std is zero_std.
"""
import dataclasses
import inspect
from typing import Callable

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric of a step, declared once: how the ranks' counts make it, its run-log format, its console piece."""
    name: str                   # its key in the metrics: the --log-file JSON, the run log's step line
    value: Callable             # the counts (and given values) named by its parameters -> the metric
    log: str                    # its format in the run log's step line
    show: str = ""              # its piece of the console line ({} is the value, {target} the groups a step wants)
    when: str = "always"        # when the console shows it: "always", "nonzero", "tools" (a run with --tools)
    over_ranks: str = "sum"     # how the ranks' counts it reads combine: "sum", "max", "min", "rank" (this rank's)

    @property
    def reads(self) -> tuple[str, ...]:
        """The names of the counts (and given values) it is made from: its value function's parameters."""
        return tuple(inspect.signature(self.value).parameters)


def reward_std(reward_sum, reward_sq, rewards):
    """The unbiased (Bessel) std of every verified reward sampled this step, refills included, from their count, sum
    and sum of squares."""
    mean = reward_sum / max(rewards, 1)
    return (max(reward_sq - rewards * mean ** 2, 0) / (rewards - 1)) ** 0.5 if rewards > 1 else 0.0


# In the order of the console line (and of the JSON and the run log's line). Counts: samples (rows sampled, refills
# included), rewards (verified ones), tokens (completion tokens trained on), gap_tokens (those compared with the
# sampler's log-probs), optimizer_steps; the others are named for what they sum.
METRICS = [
    Metric("loss", lambda loss, optimizer_steps, world: loss / max(optimizer_steps / world, 1), "{:.6g}",
           " | loss {:.4g}"),                          # each rank counts its share of the loss and every optimizer step
    Metric("lr", lambda lr: lr, "{:.6g}", " lr {:.1e}", over_ranks="rank"),
    Metric("muon_lr", lambda muon_lr: muon_lr, "{:.6g}", over_ranks="rank"),           # None (left out) without Muon
    Metric("reward", lambda reward_sum, rewards: reward_sum / max(rewards, 1), "{:.4f}", " | reward {:.3f}"),
    Metric("reward_std", reward_std, "{:.4f}", " ± {:.3f}"),
    Metric("groups", lambda groups: int(groups), "{:d}"),                              # sampled, refills included
    Metric("kept_groups", lambda kept_groups: int(kept_groups), "{:d}", " | groups {}/{target}"),   # trained on
    Metric("zero_std", lambda zero_std_groups, groups: zero_std_groups / max(groups, 1), "{:.4f}", " zero-std {:.2f}"),
    Metric("completion_len_min", lambda len_min: int(len_min), "{:d}", " | len {}", over_ranks="min"),
    Metric("completion_len", lambda completion_len, samples: completion_len / max(samples, 1), "{:.2f}", "/{:.1f}"),
    Metric("completion_len_max", lambda len_max: int(len_max), "{:d}", "/{}", over_ranks="max"),
    Metric("completion_len_eos", lambda eos_len, eos_rows: eos_len / max(eos_rows, 1), "{:.2f}", " eos {:.1f}"),
    Metric("truncated", lambda truncated, samples: truncated / max(samples, 1), "{:.4f}", " trunc {:.2f}"),
    Metric("num_tokens", lambda num_tokens_before, prompt_len, completion_len:       # prompt + completion, all steps
           int(num_tokens_before + prompt_len + completion_len), "{:d}"),
    Metric("clip_low", lambda clip_low, tokens: clip_low / max(tokens, 1), "{:.4f}", " | clip {:.3f}"),
    Metric("clip_high", lambda clip_high, tokens: clip_high / max(tokens, 1), "{:.4f}", "/{:.3f}"),
    Metric("clip_region", lambda clip_low, clip_high, tokens: (clip_low + clip_high) / max(tokens, 1), "{:.4f}"),
    Metric("clip_delta", lambda clip_delta, tokens: clip_delta / max(tokens, 1), "{:.4f}"),
    Metric("ratio", lambda ratio, tokens: ratio / max(tokens, 1), "{:.6g}"),
    Metric("kl", lambda kl, tokens: kl / max(tokens, 1), "{:.6g}", " | kl {:.4f}"),
    Metric("entropy", lambda entropy, tokens: entropy / max(tokens, 1), "{:.4f}", " | ent {:.3f}"),
    Metric("logp_gap", lambda logp_gap, gap_tokens: logp_gap / max(gap_tokens, 1), "{:.3e}", " | gap {:.1e}"),
    Metric("grad_norm", lambda grad_norm, optimizer_steps: grad_norm / max(optimizer_steps, 1), "{:.6g}",
           " | gnorm {:.3f}"),
    Metric("tok_per_s", lambda completion_len, gen_s, world: completion_len / max(gen_s / world, 1e-9), "{:.0f}",
           " | {:.0f} tok/s"),                                                          # all ranks together
    Metric("gen_s", lambda gen_s: gen_s, "{:.3f}", " | gen {:.2f}s", over_ranks="rank"),
    Metric("reward_s", lambda reward_s: reward_s, "{:.3f}", " reward {:.2f}s", over_ranks="rank"),
    Metric("train_s", lambda train_s: train_s, "{:.3f}", " train {:.2f}s", over_ranks="rank"),
    Metric("tool_calls", lambda tool_calls, samples: tool_calls / max(samples, 1), "{:.4f}",   # per completion
           " | tools {:.2f}/completion", when="tools"),
    Metric("tool_errors", lambda tool_errors: int(tool_errors), "{:d}", " errors {}", when="tools"),  # program failed
    Metric("sandbox_s", lambda sandbox_s, world: sandbox_s / world, "{:.3f}", " sandbox {:.2f}s",  # per rank
           when="tools"),
    Metric("reward_errors", lambda reward_errors: int(reward_errors), "{:d}", " | reward errors {}",  # left out
           when="nonzero"),
    Metric("skipped", lambda skipped: skipped > 0, "{:d}", " | no reward spread: no update", when="nonzero"),
    Metric("train_time", lambda train_time: train_time, "{:.0f}ms", over_ranks="rank"),  # the run's clock (ms)
]


def reduced(names, counts, device, op):
    """{name: this rank's count (0 where it has none) reduced over ranks by op}, one all_reduce in float64."""
    t = torch.tensor([float(counts.get(name, 0)) for name in names], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return dict(zip(names, t.tolist()))


def step_metrics(counts, device, **given) -> dict:
    """This rank's counts of the step -> its metrics, equal on every rank ("rank" ones are this rank's): a dict in
    METRICS' order, after given["step"]. given: the loop's values that metrics read by name (step, lr, muon_lr, the
    clocks, num_tokens_before, world). A collective: every rank calls it, with the same given names."""
    unread = set(counts) - {name for m in METRICS for name in m.reads}
    if unread:
        raise ValueError(f"counted {sorted(unread)}, which no metric reads: declare it in grpo/metrics.py's METRICS")
    counted = {kind: list(dict.fromkeys(n for m in METRICS if m.over_ranks == kind for n in m.reads if n not in given))
               for kind in ("sum", "max", "min", "rank")}          # the counts each kind of metric reads, in order
    sums = reduced(counted["sum"], counts, device, dist.ReduceOp.SUM)
    # one MAX all_reduce for both extremes: a minimum is minus the maximum of the negated counts
    negated = {n: -counts.get(n, 0) for n in counted["min"]}
    extremes = reduced(counted["max"] + counted["min"], {**counts, **negated}, device, dist.ReduceOp.MAX)
    extremes.update({n: -extremes[n] for n in counted["min"]})
    combined = {"sum": sums, "max": extremes, "min": extremes, "rank": {n: counts.get(n, 0) for n in counted["rank"]}}
    metrics = {"step": given["step"]}
    for m in METRICS:
        inputs = {**combined[m.over_ranks], **given}
        value = m.value(*(inputs[name] for name in m.reads))
        if value is not None:
            metrics[m.name] = value
    return metrics


def log_line(metrics, steps) -> str:
    """The run log's line of a step: step:N/steps, then every metric as name:value (records/compare.py reads it)."""
    return f"step:{metrics['step']}/{steps}" + "".join(f" {m.name}:{m.log.format(metrics[m.name])}" for m in METRICS
                                                       if m.name in metrics)


def console_line(metrics, steps, target, tools) -> str:
    """The per-step line the user sees (nanochat's style). target: the groups a step trains on when none is dropped
    (P x world); tools: whether the run has --tools (the tool metrics are shown then)."""
    shown = {"always": lambda value: True, "nonzero": bool, "tools": lambda value: tools}
    return f"step {metrics['step']}/{steps}" + "".join(
        m.show.format(metrics[m.name], target=target) for m in METRICS
        if m.show and m.name in metrics and shown[m.when](metrics[m.name]))
