"""Publishing: the Hugging Face folder format (``export``), model cards (``model_card``) and uploads (``push``).
Depends on :mod:`timm_dropres.models`.
"""
