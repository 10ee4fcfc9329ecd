"""Augmentations of our own on top of MONAI's (a module of its own so that MONAI is imported only when
training, and the classes stay picklable for spawned loader workers)."""

from __future__ import annotations

import math

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


def nnunet_augmentation(spatial_dims: int) -> list:
    """nnU-Net's training augmentation as MONAI dictionary transforms on ``{"image", "label"}`` (after patch
    sampling), with nnU-Net v2's ranges and probabilities (``nnUNetTrainer.get_training_transforms``, Isensee et
    al. 2021):

    - spatial, p 0.36 (nnU-Net: rotation p 0.2 and scaling p 0.2, drawn apart; here one resampling does
      both): rotation +-30 degrees about every axis in 3D (+-180 degrees in-plane in 2D), isotropic scaling
      0.7-1.4; labels nearest-neighbour, outside the image background;
    - elastic deformation, p 0.2 (nnU-Net v2 turns it off; issue #27 asks for it): MONAI's
      ``Rand{2,3}DElasticd`` with smoothing sigma 5-8 voxels, magnitude 100-200 (MONAI's own 3D example);
    - Gaussian noise p 0.1 (variance up to 0.1), Gaussian blur p 0.2 (sigma 0.5-1 voxel), multiplicative
      brightness p 0.15 (x0.75-1.25), contrast p 0.15 (x0.75-1.25 about the mean), low-resolution
      simulation p 0.25 (down to 0.5-1 of the size, nearest, and back, linear), gamma p 0.1 on the inverted
      image and p 0.3 on the image (0.7-1.5, intensity range kept), mirroring p 0.5 per axis.
    """
    from monai import transforms as mt

    both = ["image", "label"]
    three_d = spatial_dims == 3
    angle = math.pi / 6 if three_d else math.pi
    rotate = (angle,) * 3 if three_d else (angle,)
    elastic = (mt.Rand3DElasticd(keys=both, prob=0.2, sigma_range=(5, 8), magnitude_range=(100, 200),
                                 mode=("bilinear", "nearest"), padding_mode="zeros") if three_d else
               mt.Rand2DElasticd(keys=both, prob=0.2, spacing=(16, 16), magnitude_range=(1, 2),
                                 mode=("bilinear", "nearest"), padding_mode="zeros"))
    steps = [
        mt.RandAffined(keys=both, prob=0.36, rotate_range=rotate, scale_range=(0.3, 0.3) if not three_d else
                       (0.3, 0.3, 0.3), mode=("bilinear", "nearest"), padding_mode="zeros"),
        elastic,
        mt.RandGaussianNoised(keys=["image"], prob=0.1, std=math.sqrt(0.1)),
        mt.RandGaussianSmoothd(keys=["image"], prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                               sigma_z=(0.5, 1.0)),
        mt.RandScaleIntensityd(keys=["image"], prob=0.15, factors=0.25),
        mt.RandScaleIntensityFixedMeand(keys=["image"], prob=0.15, factors=0.25, preserve_range=True),
        mt.RandSimulateLowResolutiond(keys=["image"], prob=0.25, zoom_range=(0.5, 1.0),
                                      upsample_mode="trilinear" if three_d else "bilinear"),
        mt.RandAdjustContrastd(keys=["image"], prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        mt.RandAdjustContrastd(keys=["image"], prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ]
    steps += [mt.RandFlipd(keys=both, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    return steps
