"""jaxtune: fine-tune pretrained models in JAX.

Layers (an arrow means "may import"): cli -> train -> tuning -> models; train -> data.
"""

__version__ = "0.1.0"
