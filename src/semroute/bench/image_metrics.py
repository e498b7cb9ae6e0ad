"""Real-image metrics on a pretrained network's features (`bench.judge`), each with its chance level.

- FD: the Frechet distance between two feature sets (FID's formula on these features). Its floor is the
  distance between two random halves of the real images (`split_half_fd`): a generator whose FD is near
  the floor matches the real images as well as the real images match themselves at that sample size.
- Retrieval: generated image i should be closer (cosine) to real image i than to every other real image
  (top-1) or be among its 5 closest (top-5); chance is k / N for N real images.
- Attribute accuracy: within a group of captions that differ in one attribute (skin tones of one emoji,
  the members of a family), generated image i should be closest to real image i among the group's real
  images; chance is the mean of 1 / group size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for feature sets (N, D) and (M, D).

    Tr((S_a S_b)^(1/2)) is computed without a non-symmetric matrix square root: with centred features X
    and Y, the non-zero eigenvalues of S_a S_b are the squared singular values of X Y^T / sqrt((N-1)(M-1)),
    so the trace is that matrix's nuclear norm (small when there are fewer images than features); with
    more images than features it is the trace of (S_a^(1/2) S_b S_a^(1/2))^(1/2), from symmetric
    eigendecompositions. Both are exact up to rounding, unlike scipy's sqrtm on singular covariances.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 images per set, got {len(a)} and {len(b)}")
    x, y = a.double().numpy(), b.double().numpy()
    mu = x.mean(0) - y.mean(0)
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, m, dim = len(x), len(y), x.shape[1]
    trace_a, trace_b = (xc**2).sum() / (n - 1), (yc**2).sum() / (m - 1)
    if min(n, m) <= dim:
        cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    else:
        cov_a, cov_b = xc.T @ xc / (n - 1), yc.T @ yc / (m - 1)
        w, u = np.linalg.eigh(cov_a)
        root_a = (u * np.sqrt(w.clip(min=0))) @ u.T
        cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(mu @ mu + trace_a + trace_b - 2 * cross)


def split_half_fd(real: torch.Tensor, repeats: int = 10, seed: int = 0) -> float:
    """The FD floor: mean distance between two random halves of the real features."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(repeats):
        order = torch.randperm(len(real), generator=generator)
        half = len(real) // 2
        values.append(frechet_distance(real[order[:half]], real[order[half : 2 * half]]))
    return float(np.mean(values))


def _cosine(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(generated.double(), dim=1) @ F.normalize(real.double(), dim=1).T


def _rank_of_own(similarity: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """(N, M) similarities and (N,) the own candidate's -> (N,) how many other candidates are at least as
    close (ties count against it, so identical features cannot all score a hit)."""
    own = own.unsqueeze(1)
    return (similarity > own).sum(1) + (similarity == own).sum(1) - 1


def retrieval(generated: torch.Tensor, real: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(N,) bools: is real image i among the k nearest (cosine) of generated image i? Chance: k / N."""
    if generated.shape != real.shape:
        raise ValueError(
            f"generated and real features must pair up, got {tuple(generated.shape)} and {tuple(real.shape)}"
        )
    similarity = _cosine(generated, real)
    return _rank_of_own(similarity, similarity.diagonal()) < k


def attribute_hits(
    generated: torch.Tensor, bank: torch.Tensor, candidates: Sequence[Sequence[int]], targets: Sequence[int]
) -> tuple[torch.Tensor, float]:
    """Is each generated image closest (cosine) to its own real image among its siblings?

    generated: (N, D) features; bank: (M, D) real features; candidates[i]: indices into `bank` of the real
    images of generated image i's sibling captions (those that differ in one attribute), including
    `targets[i]`, its own. Returns one bool per generated image and the chance level, the mean of
    1 / len(candidates[i]).
    """
    if not len(generated) == len(candidates) == len(targets):
        raise ValueError(
            f"every generated image needs candidates and a target, got {len(generated)}, "
            f"{len(candidates)} and {len(targets)}"
        )
    hits, chance = [], []
    for feature, group, target in zip(generated, candidates, targets, strict=True):
        group = list(group)
        if len(group) < 2 or target not in group:
            raise ValueError(
                f"a sibling group needs at least 2 real images, its target {target} among them, got {group}"
            )
        similarity = _cosine(feature[None], bank[torch.tensor(group)])
        hits.append(bool(_rank_of_own(similarity, similarity[:, group.index(target)])[0] == 0))
        chance.append(1 / len(group))
    if not hits:
        return torch.zeros(0, dtype=torch.bool), float("nan")
    return torch.tensor(hits), float(np.mean(chance))


def sibling_groups(rows: Sequence[dict], key: str = "base") -> list[list[int]]:
    """For each row, the indices of the rows sharing its `key` (e.g. the same emoji in other skin tones);
    rows without a sibling get a group of their own and are left out of attribute accuracy by the caller."""
    by_key: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_key.setdefault(row[key], []).append(i)
    return [by_key[row[key]] for row in rows]
