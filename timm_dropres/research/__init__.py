"""Research tools: analysis of variance shift and noise (``analysis``), the placement audit (``audit``), the
dropout studies (``ablation``: from scratch, ``transfer``: fine-tuning), their paired statistics (``stats``) and
reports (``report``). Depends on every layer below: models, hub, training.
"""
