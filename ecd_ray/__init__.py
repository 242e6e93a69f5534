"""ecd_ray: Evolutionary Contrastive Distillation and Automatic Pair Construction on Ray."""

__version__ = "0.1.0"
