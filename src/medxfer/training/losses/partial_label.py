"""Partial labels: which classes each case annotates, and the marginal logits of the ``partial_*`` losses.

The name ``partial_<base>`` (e.g. ``partial_dice_ce``) gives the marginal version of any loss (Shi G.,
Xiao L., Chen Y., Zhou S. K., "Marginal loss and exclusion loss for partially supervised multi-organ
segmentation", Medical Image Analysis 70, 2021). In a case where class ``k`` is not annotated, a background
pixel may really be class ``k``, so the probabilities of the unannotated classes are merged into
background: the marginal background logit is ``logsumexp`` over background and the unannotated classes,
and the unannotated classes get probability 0. Cross-entropy and focal then use
``-log(p_0 + sum_unannotated p_k)`` at background pixels (marginal CE), and Dice/Tversky are computed on
the merged probabilities with the unannotated classes of a case left out of its class average (batch
Dice: a class counts only over the cases that annotate it). The loss therefore depends on the background
and unannotated logits only through their ``logsumexp``: the gradient along the background-vs-unannotated
split is zero. A pixel labelled with a class its case does not annotate is a :class:`DataError`. The
option is the name prefix (not a ``partial=True`` option) so that one string, e.g. ``train.loss`` or the
result of :func:`~medxfer.training.losses.select_loss`, says everything.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from medxfer.errors import DataError

PARTIAL_PREFIX = "partial_"

# Unannotated classes get a logit this far below the largest logit: exp(-1e4) is exactly 0 in float32,
# so they carry no probability, while staying finite (focal's ``log p * 0`` would be NaN at -inf).
_ABSENT_LOGIT_GAP = 1e4

Annotated = Union[None, Tensor, np.ndarray, Sequence[Optional[Sequence[int]]]]


def annotated_mask(annotated: Annotated, n_cases: int, n_classes: int, device=None) -> Tensor:
    """``annotated`` in any accepted form -> bool ``(n_cases, n_classes)``, background column True."""
    if annotated is None:
        return torch.ones(n_cases, n_classes, dtype=torch.bool, device=device)
    if isinstance(annotated, (Tensor, np.ndarray)):
        mask = torch.as_tensor(annotated, device=device)
        if tuple(mask.shape) != (n_cases, n_classes):
            raise DataError(
                f"annotated classes: expected a bool array of shape ({n_cases}, {n_classes}) "
                f"(cases, classes incl. background), got shape {tuple(mask.shape)}"
            )
        mask = mask.to(torch.bool).clone()
        mask[:, 0] = True
        return mask
    if isinstance(annotated, (str, bytes)):
        raise DataError(f"annotated classes: expected a sequence of class tuples, got {annotated!r}")
    entries = list(annotated)
    if len(entries) != n_cases:
        raise DataError(f"annotated classes: {len(entries)} entries for {n_cases} cases")
    rows = []
    for case, entry in enumerate(entries):
        row = [True] * n_classes
        if entry is not None:
            if isinstance(entry, (Tensor, np.ndarray)) and entry.dtype in (torch.bool, np.bool_):
                raise DataError(
                    "annotated classes: per-case bool rows must be stacked into one (N, C) array"
                )
            row = [False] * n_classes
            row[0] = True
            for value in entry:
                k = int(value)
                if not 0 <= k < n_classes:
                    raise DataError(
                        f"annotated classes: case {case} lists class {k}, outside 0..{n_classes - 1}"
                    )
                row[k] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=device)


def marginal_logits(logits: Tensor, class_annotated: Tensor) -> Tensor:
    """Logits of the marginal distribution: unannotated classes merged into background (Shi et al. 2021).

    Channel 0 becomes ``logsumexp`` over background and the case's unannotated classes; the unannotated
    channels get a logit ``1e4`` below the largest one (probability exactly 0 in float32) with no gradient.
    ``softmax`` of the result is ``p_0 + sum_unannotated p_k`` for background and ``p_k`` for annotated
    classes, and depends on the merged logits only through their ``logsumexp``.
    """
    shape = tuple(class_annotated.shape) + (1,) * (logits.ndim - 2)
    unannotated = (~class_annotated).view(shape)
    merged = unannotated.clone()
    merged[:, 0] = True
    background = torch.logsumexp(logits.masked_fill(~merged, float("-inf")), dim=1, keepdim=True)
    absent = logits.detach().amax(dim=1, keepdim=True) - _ABSENT_LOGIT_GAP
    rest = torch.where(unannotated[:, 1:], absent, logits[:, 1:])
    return torch.cat([background, rest], dim=1)
