"""Fine-tuning with accelerate: configuration (``config``), model building (``build``), data (``data``,
``fmnist``), checkpoints (``checkpoints``), run folders (``runs``), progress and history (``progress``), the loop
(``trainer``) and evaluation (``evaluate``). Depends on :mod:`timm_dropres.models` only (runs export their
weights in its Hugging Face folder format, :mod:`timm_dropres.models.hf_folder`).
"""
