"""Published 3D weights of MONAI networks (BasicUNet, SegResNet, DynUNet) import into medxfer encoders: key maps
checked on state dicts of the real architectures (random weights, no download)."""

from __future__ import annotations

import pytest
import torch

from medxfer.errors import CheckpointError
from medxfer.models.importing import import_weights
from medxfer.models.monai_encoders import build_monai_network
from medxfer.models.weights import encoder_from_checkpoint

CASES = [("basicunet3d", "basicunet", 5),
         pytest.param("segresnet3d", "segresnet", 4, marks=pytest.mark.slow),
         pytest.param("dynunet3d", "dynunet", 5, marks=pytest.mark.slow)]


def _monai_encoder_path(net, network: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The features of MONAI's own encoder path, level by level, computed by MONAI's modules."""
    if network == "segresnet":
        return list(net.encode(x)[1])
    if network == "basicunet":
        modules = [net.conv_0, net.down_1, net.down_2, net.down_3, net.down_4]
    else:
        modules = [net.input_block, *net.downsamples, net.bottleneck]
    out = []
    for module in modules:
        x = module(x)
        out.append(x)
    return out


@pytest.mark.parametrize("preset, network, depth", CASES)
def test_monai_checkpoint_imports_and_gives_monais_features(tmp_path, preset, network, depth):
    torch.manual_seed(0)
    net = build_monai_network(network, in_channels=1, spatial_dims=3, width=8).eval()
    path = tmp_path / "monai.pt"
    torch.save({"state_dict": net.state_dict()}, path)  # as MONAI's CheckpointSaver / bundles wrap it
    imported = import_weights(str(path), preset, tmp_path / "out", in_channels=1, depth=depth, width=8)
    encoder = encoder_from_checkpoint(imported).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ours, theirs = encoder(x), _monai_encoder_path(net, network, x)
    assert len(ours) == len(theirs) == depth
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_a_monai_file_of_another_width_is_a_one_line_error(tmp_path):
    net = build_monai_network("basicunet", in_channels=1, spatial_dims=3, width=16)
    torch.save(net.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError) as error:
        import_weights(str(tmp_path / "wide.pt"), "basicunet3d", tmp_path / "out", in_channels=1, depth=5, width=8)
    message = str(error.value)
    assert "\n" not in message and "wide.pt" in message and "other shapes" in message
