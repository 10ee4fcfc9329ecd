"""Augmentations of our own on top of MONAI's (a module of its own so that MONAI is imported only when
training, and the classes stay picklable for spawned loader workers)."""

from __future__ import annotations

from monai.transforms import RandRotate90d


class SquareRandRotate90d(RandRotate90d):
    """``RandRotate90d`` that leaves an item whose two rotated axes differ in size unchanged: a quarter turn
    would swap its height and width, and the items of one batch must keep one shape (non-square images
    are the norm in medical imaging)."""

    def __call__(self, data, lazy=None):
        shape = tuple(data[self.keys[0]].shape[1:])
        if shape[self.spatial_axes[0]] != shape[self.spatial_axes[1]]:
            return dict(data)
        return super().__call__(data, lazy=lazy)
