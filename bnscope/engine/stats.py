"""Float64 per-channel moment accumulators with a stable merge.

Population statistics pool every element of every call: mu = sum(x)/N,
var = sum((x - mu)^2)/N. Batches are merged with the pairwise update of Chan, Golub & LeVeque
(1979), "Updating formulae and a pairwise algorithm for computing sample variances":

    delta = mean_b - mean_a,  n = n_a + n_b
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

so the result does not depend on how the data is split into batches (up to float64 rounding) and
never forms the cancellation-prone float32 E[x^2] - E[x]^2. This equals the batch-size-weighted
E[mu_B^2 + var_B] - E[mu_B]^2 of Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", App. A.
Across processes, :func:`bnscope.engine.distributed.all_reduce_moments` pools accumulators the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

F64 = torch.float64


class MomentAccumulator:
    """Per-channel count, mean and M2 (sum of squared deviations) in float64.

    ``update(mean_b, var_b, n)`` adds one batch given its mean and *biased* variance over ``n``
    elements per channel; ``update_tensor(x, dims)`` computes those from a tensor first.
    """

    def __init__(self, num_features: int, device: torch.device | str = "cpu") -> None:
        self.num_features = int(num_features)
        self.count = 0
        self.mean = torch.zeros(self.num_features, dtype=F64, device=device)
        self.m2 = torch.zeros(self.num_features, dtype=F64, device=device)

    def update(self, mean_b: torch.Tensor, var_b: torch.Tensor, n: int) -> None:
        """Merge a batch of ``n`` elements per channel with mean ``mean_b`` and biased variance
        ``var_b`` (Chan et al. 1979)."""
        if n <= 0:
            return
        mean_b = mean_b.detach().to(device=self.mean.device, dtype=F64).reshape(-1)
        m2_b = var_b.detach().to(device=self.mean.device, dtype=F64).reshape(-1) * n
        if mean_b.numel() != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {mean_b.numel()}")
        if self.count == 0:
            self.mean = mean_b.clone()
            self.m2 = m2_b.clone()
            self.count = n
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta * delta * (self.count * n / total)
        self.count = total

    def add_moments(self, mean_b: torch.Tensor, m2_b: torch.Tensor, n: int) -> None:
        """Merge ``n`` elements per channel given as their float64 mean and M2 (sum of squared
        deviations from that mean), already on this accumulator's device (Chan et al. 1979):
        four in-place device operations, no host read."""
        if n <= 0:
            return
        if self.count == 0:
            self.mean, self.m2, self.count = mean_b, m2_b, n
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean.add_(delta, alpha=n / total)
        self.m2.add_(m2_b).addcmul_(delta, delta, value=self.count * n / total)
        self.count = total

    def add_rows(
        self, means: torch.Tensor, variances: torch.Tensor, n: int, var_scale: float = 1.0
    ) -> None:
        """Merge ``r`` batches at once: ``means`` and biased variances ``var_scale *
        variances`` are float64 [r, C] (one row per batch of ``n`` elements per channel). The
        block's own moments come from the law of total variance, M2 = n (sum_k var_k + sum_k
        (mean_k - mean)^2), then one Chan merge; the result equals ``r`` calls of
        :meth:`update` up to float64 rounding."""
        r = means.shape[0]
        if r == 0 or n <= 0:
            return
        if means.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {means.shape[1]}")
        block_mean = means.mean(0)
        dev = means - block_mean
        m2 = torch.add(dev.square().sum(0).mul_(n), variances.sum(0), alpha=n * var_scale)
        self.add_moments(block_mean, m2, r * n)

    def update_tensor(self, x: torch.Tensor, dims: Sequence[int]) -> None:
        """Add every element of ``x`` reduced over ``dims`` (float64 two-pass per batch)."""
        xd = x.detach().to(F64)
        n = 1
        for d in dims:
            n *= x.shape[d]
        if n == 0:
            return
        var_b, mean_b = torch.var_mean(xd, dim=tuple(dims), correction=0)
        self.update(mean_b, var_b, n)

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """A new accumulator holding both (neither input changes). Associative and commutative
        up to float64 rounding."""
        out = MomentAccumulator(self.num_features, self.mean.device)
        out.update(self.mean, self.var_or_zero(), self.count)
        out.update(other.mean.to(self.mean.device), other.var_or_zero(), other.count)
        return out

    def var_or_zero(self) -> torch.Tensor:
        return self.m2 / self.count if self.count else torch.zeros_like(self.m2)

    @property
    def population_mean(self) -> torch.Tensor:
        """mu_pop = sum(x) / N."""
        if self.count == 0:
            raise ValueError("no data accumulated")
        return self.mean

    @property
    def population_var(self) -> torch.Tensor:
        """var_pop = sum((x - mu_pop)^2) / N (biased: what ``running_var`` receives)."""
        if self.count == 0:
            raise ValueError("no data accumulated")
        return self.m2 / self.count

    def state(self) -> torch.Tensor:
        """(count, mean, M2) packed as one float64 tensor [3, C] for all-reduce helpers."""
        return torch.stack([torch.full_like(self.mean, float(self.count)), self.mean, self.m2])


def normalized_mean_shift(
    mu_a: torch.Tensor, mu_b: torch.Tensor, var_ref: torch.Tensor, eps: float
) -> torch.Tensor:
    """d_mu = |mu_a - mu_b| / sqrt(var_ref + eps), per channel (docs/statistics.md, section 3)."""
    return (mu_a.to(F64) - mu_b.to(F64)).abs() / torch.sqrt(var_ref.to(F64) + eps)


def log_var_ratio(var_a: torch.Tensor, var_b: torch.Tensor, eps: float) -> torch.Tensor:
    """d_var = |log((var_a + eps) / (var_b + eps))|, per channel (docs/statistics.md, section 3)."""
    return torch.log((var_a.to(F64) + eps) / (var_b.to(F64) + eps)).abs()
