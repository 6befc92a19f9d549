"""Objectives: one per paradigm, all behind `jtl.objectives.base.Objective`."""
from __future__ import annotations

import difflib

import ml_collections

from jtl.data import labelled
from jtl.errors import ConfigError
from jtl.objectives.adain import AdaIN
from jtl.objectives.base import Objective, apply_model
from jtl.objectives.clip import CLIP
from jtl.objectives.contrastive import SimCLR, SupCon
from jtl.objectives.distill import Distill
from jtl.objectives.domain import CORAL, DANN, MMD
from jtl.objectives.maml import MAML
from jtl.objectives.multitask import Multitask
from jtl.objectives.protonet import ProtoNet
from jtl.objectives.style import StyleTransfer
from jtl.objectives.supervised import Supervised

OBJECTIVES = {"supervised": Supervised, "simclr": SimCLR, "supcon": SupCon, "clip": CLIP}
OBJECTIVES.update({"distill": Distill, "dann": DANN, "coral": CORAL, "mmd": MMD})
OBJECTIVES.update(protonet=ProtoNet, maml=MAML)  # meta-learning on episodes (jtl.data.episodes)
OBJECTIVES.update(multitask=Multitask)  # tasks x sharing architectures x weightings
OBJECTIVES.update(style=StyleTransfer)  # Gatys et al.: the image's pixels are the parameters
OBJECTIVES.update(adain=AdaIN)  # Huang & Belongie: a decoder trained through AdaIN


def build(config: ml_collections.ConfigDict) -> Objective:
  """The objective named by `config.objective`, built from the whole config."""
  name = config.get("objective", "supervised")
  if name not in OBJECTIVES:
    close = difflib.get_close_matches(name, OBJECTIVES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown objective {name!r}{hint}; choose one of {sorted(OBJECTIVES)} "
                      "(--config.objective)")
  if name != "multitask" and labelled.hidden_features(config.get("data")):
    raise ConfigError(f"data.label_fraction hides training labels, which only the multitask "
                      f"objective skips (objective {name!r} would read -1 as a class); set "
                      "--config.data.label_fraction={}")
  return OBJECTIVES[name].from_config(config)


__all__ = ["CLIP", "OBJECTIVES", "Objective", "SimCLR", "SupCon", "Supervised", "apply_model",
           "build"]
__all__ += ["CORAL", "DANN", "Distill", "MMD"]
__all__ += ["MAML", "ProtoNet"]
__all__ += ["Multitask"]
__all__ += ["AdaIN", "StyleTransfer"]
