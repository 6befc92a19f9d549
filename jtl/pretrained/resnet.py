"""torchvision ResNet names -> jtl's `resnet18/34/50/101` (He et al., 2016; torchvision's v1.5
Bottleneck, stride on the 3x3 conv, as `jtl.models.resnet`).

  conv1 / bn1                      -> backbone/stem_conv / stem_bn
  layer{i}.{j}.conv{k} / bn{k}     -> backbone/stage{i}_block{j}/conv{k} / bn{k}
  layer{i}.{j}.downsample.0 / .1   -> backbone/stage{i}_block{j}/downsample_conv / downsample_bn
  fc                               -> head
`num_batches_tracked` only drives torch's momentum=None mode and is skipped. The maths already agree
(BatchNorm epsilon 1e-5; convs padded symmetrically by kernel // 2; max-pool padded with -inf), so
the weights carry over as they are, up to layout (`naming.torch_leaf`). timm's ResNets use the same
names.
"""
from __future__ import annotations

from collections.abc import Collection

from jtl.pretrained.naming import TorchModuleTable

TORCHVISION_RESNET = TorchModuleTable(
    "torchvision ResNet",
    modules=[
        (r"backbone/stem_conv", "conv1"),
        (r"backbone/stem_bn", "bn1"),
        (r"backbone/stage(\d+)_block(\d+)/(conv\d+|bn\d+)", r"layer\1.\2.\3"),
        (r"backbone/stage(\d+)_block(\d+)/downsample_conv", r"layer\1.\2.downsample.0"),
        (r"backbone/stage(\d+)_block(\d+)/downsample_bn", r"layer\1.\2.downsample.1"),
        (r"head", "fc"),
    ],
    ignore=r".*num_batches_tracked")


def convention_for(keys: Collection[str]) -> TorchModuleTable | None:
  """The torchvision convention if the file looks like a torchvision/timm ResNet state dict."""
  if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return TORCHVISION_RESNET
  return None
