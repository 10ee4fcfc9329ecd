"""Deep supervision: the run's loss over the logits of several decoder resolutions (nnU-Net's scheme).

``deep_supervision_loss(loss, outputs, target)`` with ``outputs = [full resolution, 1/2, 1/4, ...]`` (what
``Segmenter.forward_deep_supervision`` returns) is ``sum_i w_i * loss(outputs[i], target at outputs[i]'s size)``.
The weights are nnU-Net's: ``1 / 2**i`` over the decoder's outputs, the coarsest one's set to 0 (medxfer builds no
head for it), normalised to sum to 1; so the full-resolution term weighs most. The label map is brought to each size
by nearest-neighbour resampling (``monai.losses.DeepSupervisionLoss``, which sums the terms), so ignored voxels (255)
stay ignored and no label is averaged into another.
"""

from __future__ import annotations

from typing import Callable, Sequence

from monai.losses import DeepSupervisionLoss
from torch import Tensor
from torch.nn.modules.loss import _Loss

from medxfer.training.losses.partial_label import Annotated


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Loss weights of ``n_outputs`` supervised outputs, finest first: ``1 / 2**i``, normalised to sum to 1
    (nnU-Net's weights with the coarsest decoder output, weight 0, left out)."""
    raw = [0.5**i for i in range(max(1, int(n_outputs)))]
    total = sum(raw)
    return [w / total for w in raw]


class _LabelMapLoss(_Loss):
    """A medxfer loss as MONAI's wrapper calls it: the label map arrives as a float ``(N, 1, ...)`` tensor (MONAI
    resamples it with ``F.interpolate``, which needs a channel and floats; labels up to 255 are exact in float32)."""

    def __init__(self, loss: Callable, annotated: Annotated):
        super().__init__()
        self.inner = loss
        self.annotated = annotated

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.inner(logits, target[:, 0].round().long(), annotated=self.annotated)


def deep_supervision_loss(loss: Callable, outputs: Sequence[Tensor], target: Tensor,
                          annotated: Annotated = None) -> Tensor:
    """The weighted sum of ``loss`` over ``outputs`` (finest first; see the module docstring). ``target``: the
    integer label map ``(N, *spatial)`` at the first output's size; ``annotated`` goes to every term."""
    if target.ndim == outputs[0].ndim:  # (N, 1, ...) accepted as the losses accept it
        target = target[:, 0]
    wrapper = DeepSupervisionLoss(_LabelMapLoss(loss, annotated), weights=deep_supervision_weights(len(outputs)))
    return wrapper(list(outputs), target[:, None].float())
