"""Models: Flax linen modules behind a small registry.

  model = jtl.models.build(config.model)       # config.model.name in jtl.models.available()
  variables = model.init(rng, x, train=False)  # {'params': {'backbone', 'head'}, 'batch_stats'?}
  logits = model.apply(variables, x)           # [B, num_classes]
  features = model.apply(variables, x, method='features')  # [B, D]

Importing this package registers every model below.
"""
from jtl.models import resnet, small, vit  # noqa: F401  (registers the models)
from jtl.models.classifier import HEAD_INITS, Classifier
from jtl.models.layers import BatchNorm, current_frozen_norms, frozen_norms
from jtl.models.registry import available, build, options, register

__all__ = ['BatchNorm', 'Classifier', 'HEAD_INITS', 'available', 'build', 'current_frozen_norms',
           'frozen_norms', 'options', 'register']
