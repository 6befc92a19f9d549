"""Pretrained weights from PyTorch (.pt/.pth), .safetensors and .npz into jtl's ResNets and ViTs.

  abstract = jax.eval_shape(model.init, jax.random.key(0), images, train=False)
  loaded, report = jtl.pretrained.load_pretrained("resnet18.pth", abstract_variables=abstract)
  logging.info(jtl.pretrained.format_report(report, "resnet18.pth"))
  variables = jtl.pretrained.merge_into(model.init(rng, images, train=False), loaded)

Namings read (detected from the file's tensor names): torchvision ResNet (`resnet`), timm ViT and
vit_jax / big_vision ViT (`vit`), and jtl's own paths (`save_npz`). PyTorch files are read without
torch, by a restricted unpickler that runs no pickled code (`torch_pickle`). Layout conventions
(OIHW -> HWIO, transposed linear weights, BN and LayerNorm epsilons) are in `naming`.

Modules: `files` (formats), `torch_pickle` (.pt reader), `naming` (rules, layouts), `resnet`, `vit`
(conventions, pos_embed resize, big_vision export), `loader` (matching, report, save).
"""
from __future__ import annotations

from jtl.pretrained.files import FORMATS, read_tensors
from jtl.pretrained.loader import (NAMINGS, detect_convention, format_report, load_pretrained,
                                   merge_into, save_npz, split_variables)
from jtl.pretrained.torch_pickle import read_state_dict
from jtl.pretrained.vit import adapt_pos_embed, resize_grid, to_big_vision

__all__ = ["FORMATS", "NAMINGS", "adapt_pos_embed", "detect_convention", "format_report",
           "load_pretrained", "merge_into", "read_state_dict", "read_tensors", "resize_grid",
           "save_npz", "split_variables", "to_big_vision"]
