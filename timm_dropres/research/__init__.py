"""Research tools: analysis of variance shift and noise (``analysis``), the placement audit (``audit``), the
dropout placements and the first from-scratch study's spec and records (``ablation``), paired statistics
(``stats``) and the first studies' reports (``report``). No training loop: studies train through the trainer
(:mod:`timm_dropres.study`). Depends on every layer below: models, hub, training.
"""
