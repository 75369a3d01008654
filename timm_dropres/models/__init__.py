"""The plugin itself: the dropout layer and its vocabulary, dropres blocks and heads, ``convert``, the
dropout-site description, registration of the ``*_dropres`` models with timm (module ``dropres``: timm keys
models by the last part of the module name, so ``timm.list_models(module='dropres')`` lists them), the paper's
CIFAR networks, the registry of published weights, the Hugging Face folder format (``hf_folder``) and the model
reference (``reference``: a model string parsed once). Depends on timm and torch only.
"""
