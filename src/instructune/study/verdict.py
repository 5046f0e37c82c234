"""The verdict of `instructune study` on the three claims made for instruction masking.

Each claim is tested by one number per seed: the difference between the masked arm (weight 0) and
the unmasked one (weight 1, or the largest weight swept) at the last epoch, in the direction the claim
predicts. The verdict is stated only when the seeds agree:

- **supported**: every seed's difference points the claim's way and their mean is larger than the
  threshold (1 % of the masked arm's value: smaller gaps are within what an fp32 run and a few dozen
  rows can resolve);
- **not supported**: every seed points the other way, beyond the threshold;
- **no difference**: otherwise (the mean is under the threshold, or the seeds disagree: the spread
  between seeds is larger than the effect).

With one seed there is no estimate of the noise; the report says so next to the verdict.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

SUPPORTED, NOT_SUPPORTED, NO_DIFFERENCE = "supported", "not supported", "no difference"

RELATIVE_THRESHOLD = 0.01
"""A difference under 1 % of the masked arm's value counts as none."""

PAPERS = {
    "responses": "Shi et al. (NeurIPS 2024, 'Instruction Tuning With Loss Over Instructions'): scoring the "
                 "instructions too *improves* the responses when instructions are long and outputs short, or "
                 "examples few. Huerta-Enochian & Ko (arXiv 2401.13586): on short-completion data a small "
                 "instruction weight (0.01-0.5) beats both 0 and 1; on long-completion data the weight hardly "
                 "matters.",
    "overfitting": "Shi et al.: loss over instructions *reduces* overfitting (a smaller train/held-out gap), most "
                   "in the long-instruction / few-example regimes - the opposite of the claim.",
    "compute": "Neither paper measures time; masking only removes the scored instruction positions from the "
               "head and the loss, while the transformer reads every token either way.",
}


@dataclass
class Verdict:
    """One claim: what was measured, per seed and together, and the verdict."""

    claim: str
    key: str
    metric: str
    differences: list[float]
    """Per seed: unmasked minus masked, signed so that a positive value supports the claim."""
    baseline: float
    """The masked arm's value (mean over seeds), which the threshold is relative to."""
    verdict: str
    detail: str
    papers: str

    @property
    def mean(self) -> float:
        """The mean difference over seeds."""
        return statistics.fmean(self.differences)

    def to_dict(self) -> dict:
        """Plain data for summary.json."""
        return {"claim": self.claim, "key": self.key, "metric": self.metric, "differences": self.differences,
                "mean": self.mean, "spread": [min(self.differences), max(self.differences)],
                "baseline": self.baseline, "threshold": RELATIVE_THRESHOLD * abs(self.baseline),
                "seeds": len(self.differences), "verdict": self.verdict, "detail": self.detail,
                "papers": self.papers}


def decide(differences: list[float], baseline: float) -> str:
    """supported / not supported / no difference, by the rule in the module docstring."""
    threshold = RELATIVE_THRESHOLD * abs(baseline)
    mean = statistics.fmean(differences)
    if abs(mean) <= threshold:
        return NO_DIFFERENCE
    if all(d > 0 for d in differences):
        return SUPPORTED if mean > 0 else NO_DIFFERENCE
    if all(d < 0 for d in differences):
        return NOT_SUPPORTED
    return NO_DIFFERENCE


def _final(summary: dict, seed: int, weight: float) -> dict:
    arm = next(a for a in summary["arms"] if a["seed"] == seed and a["weight"] == weight)
    return arm["epochs"][-1]


def _arm(summary: dict, seed: int, weight: float) -> dict:
    return next(a for a in summary["arms"] if a["seed"] == seed and a["weight"] == weight)


def verdicts(summary: dict) -> list[Verdict]:
    """The three claims, judged on the summary's numbers (the masked arm against the largest weight)."""
    seeds, weights = summary["settings"]["seeds"], summary["settings"]["weights"]
    top = max(weights)
    results = []

    # 1. Masking focuses learning on the responses: a lower held-out response loss with masking.
    diffs = [_final(summary, s, top)["response_loss"] - _final(summary, s, 0.0)["response_loss"] for s in seeds]
    base = statistics.fmean(_final(summary, s, 0.0)["response_loss"] for s in seeds)
    results.append(Verdict(
        "Masking focuses learning on the responses", "responses",
        f"held-out response loss at the last epoch, weight {top:g} minus weight 0", diffs, base,
        decide(diffs, base), _best_weight(summary), PAPERS["responses"]))

    # 2. Masking prevents overfitting to instruction patterns: a smaller generalisation gap with masking.
    diffs = [_final(summary, s, top)["gap"] - _final(summary, s, 0.0)["gap"] for s in seeds]
    base = statistics.fmean(_final(summary, s, 0.0)["response_loss"] for s in seeds)  # gaps are relative to a loss
    memorised = [_final(summary, s, top)["instruction_gap"] for s in seeds]
    detail = (f"instruction loss, held-out minus training prompts, with weight {top:g}: "
              f"{statistics.fmean(memorised):+.3f} (weight 0: "
              f"{statistics.fmean(_final(summary, s, 0.0)['instruction_gap'] for s in seeds):+.3f}; "
              "positive = the training prompts were memorised beyond what carries over)")
    results.append(Verdict(
        "Masking prevents overfitting to instruction patterns", "overfitting",
        f"generalisation gap (held-out minus training response loss) at the last epoch, weight {top:g} minus "
        "weight 0", diffs, base, decide(diffs, base), detail, PAPERS["overfitting"]))

    # 3. Masking saves computation: fewer positions through the head, less time per step.
    paired = summary.get("paired_timing")
    if paired:
        ratios = [m / u for m, u in zip(paired["masked_s"], paired["unmasked_s"], strict=True)]
        diffs = [1 - r for r in ratios]  # share of the time saved, per timed pair
        metric = "time saved per step, the same batches timed side by side (1 - masked/unmasked, per pair)"
    else:
        diffs = [1 - _arm(summary, s, 0.0)["compute"]["median_step_s"] / _arm(summary, s, top)["compute"]["median_step_s"]
                 for s in seeds]
        metric = f"time saved per step (1 - weight 0 / weight {top:g} median step time, per seed)"
    head = statistics.fmean(_arm(summary, s, 0.0)["compute"]["head_tokens_per_step"] for s in seeds)
    head_top = statistics.fmean(_arm(summary, s, top)["compute"]["head_tokens_per_step"] for s in seeds)
    tokens = statistics.fmean(_arm(summary, s, 0.0)["compute"]["tokens_per_step"] for s in seeds)
    detail = (f"per step, of the {tokens:.0f} tokens read, {head:.0f} go through the LM head with masking "
              f"({head / tokens:.0%}), {head_top:.0f} with weight {top:g} ({head_top / tokens:.0%})")
    results.append(Verdict("Masking saves computation", "compute", metric, diffs, 1.0,
                           _compute_decision(diffs), detail, PAPERS["compute"]))
    return results


def _compute_decision(savings: list[float]) -> str:
    """Time is noisier than loss: a saving counts when the median pair saves over 3 % and most pairs agree."""
    median = statistics.median(savings)
    agree = sum(s > 0 for s in savings) / len(savings)
    if median > 0.03 and agree >= 0.75:
        return SUPPORTED
    if median < -0.03 and agree <= 0.25:
        return NOT_SUPPORTED
    return NO_DIFFERENCE


def _best_weight(summary: dict) -> str:
    """Which weight ends with the lowest held-out response loss, mean over seeds."""
    means = mean_final_by_weight(summary, "response_loss")
    best = min(means, key=means.get)
    return ("lowest held-out response loss at the last epoch, mean over seeds: weight " + f"{best:g} ("
            + ", ".join(f"{w:g}: {v:.3f}" for w, v in means.items()) + ")")


def mean_final_by_weight(summary: dict, key: str) -> dict[float, float]:
    """{weight: mean over seeds of the last epoch's `key`}."""
    seeds = summary["settings"]["seeds"]
    return {w: statistics.fmean(_final(summary, s, w)[key] for s in seeds) for w in summary["settings"]["weights"]}
