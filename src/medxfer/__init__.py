"""medxfer: transfer learning for medical image segmentation.

Pretrain encoders with checkpoints along the way, score the transferability of each checkpoint on the
target data, fine-tune U-Net-family models with few images, evaluate with the full metric suite, sweep
and report. See README.md and the docs/ site (docs/architecture.md for the layout).
"""

__version__ = "0.1.0"

# Before anything imports torch: OpenMP reads its wait policy once, when torch loads it (medxfer.threads).
from medxfer.threads import default_wait_policy as _default_wait_policy  # noqa: E402

_default_wait_policy()
