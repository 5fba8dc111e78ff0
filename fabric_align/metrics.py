"""How a recipe's per-micro-batch metrics combine over micro-batches and ranks into one number each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from lightning.fabric import Fabric

ONE = "_one"  # the weight of a metric averaged with every micro-batch counting once


@dataclass(frozen=True)
class MetricSpec:
    """Every metric a recipe's micro-batch returns, declared once: a weighted mean, a sum, or a weight.

    ``means`` maps a metric to the key it is weighted by (a count the parts also return, or ``ONE``); ``sums`` are added
    up (counts, tokens); ``weights`` are hidden weights (names starting with ``_``), summed but never reported. A key
    that is not declared is an error, not silently summed.
    """

    means: Mapping[str, str]
    sums: Sequence[str] = ()
    weights: Sequence[str] = field(default=())

    def __post_init__(self) -> None:
        declared = self.keys()
        for metric, weight in self.means.items():
            if weight != ONE and weight not in declared:
                raise ValueError(f"metric {metric!r} is weighted by {weight!r}, which is neither a sum nor a weight")
        if any(not w.startswith("_") for w in self.weights):
            raise ValueError(f"hidden weights must start with '_': {list(self.weights)}")

    def keys(self) -> set[str]:
        return {*self.means, *self.sums, *self.weights}


def reduce_metrics(fabric: Fabric, parts: list[dict[str, torch.Tensor]], spec: MetricSpec) -> dict[str, float]:
    """Combine the micro-batches' metrics over this rank's parts and every rank (one all-reduce). A mean over no
    examples (a step without one label) is omitted, not reported as 0."""
    keys = sorted(spec.keys())
    for part in parts:
        if part.keys() != set(keys):
            unknown, missing = sorted(part.keys() - set(keys)), sorted(set(keys) - part.keys())
            raise KeyError(f"metrics do not match the recipe's MetricSpec: undeclared {unknown}, missing {missing}")
    totals = torch.zeros(2 * len(keys) + 1, dtype=torch.float64)
    for part in parts:
        for i, key in enumerate(keys):
            value = float(part[key])
            if key in spec.means:
                weight = 1.0 if spec.means[key] == ONE else float(part[spec.means[key]])
                totals[2 * i] += value * weight
                totals[2 * i + 1] += weight
            else:
                totals[2 * i] += value
    totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
    out = {}
    for i, key in enumerate(keys):
        if key in spec.weights:
            continue
        total, weight = float(totals[2 * i]), float(totals[2 * i + 1])
        if key in spec.sums:
            out[key] = total
        elif weight > 0:
            out[key] = total / weight
    return out
