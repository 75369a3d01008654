"""Publishing: model cards (``model_card``) and uploads (``push``) of folders in the Hugging Face format that
:mod:`timm_dropres.models.hf_folder` writes. Depends on :mod:`timm_dropres.models`.
"""
