"""jtl: JAX/Flax transfer, fine-tuning, multitask and contrastive learning on one trainer."""
