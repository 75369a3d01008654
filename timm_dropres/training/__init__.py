"""Fine-tuning with accelerate: configuration (``config``), model building (``build``), data (``data``,
``fmnist``), checkpoints (``checkpoints``), the loop (``trainer``) and evaluation (``evaluate``).
Depends on :mod:`timm_dropres.models` and :mod:`timm_dropres.hub` (runs export their weights in its folder format).
"""
