"""timm-dropres: timm's BatchNorm residual CNNs with dropout where Kim et al. (UAI 2023) say it belongs.

``import timm_dropres`` registers ``<arch>_dropres`` models with timm; ``convert`` retrofits an
existing model in place.
"""
from .models import cifar  # noqa: F401  (registers the paper's CIFAR networks)
from .models.convert import convert, dropout_args, residual_blocks, resolve_position
from .models.dropres import SKIPPED, SUFFIX, registered_models, supported_base_models
from .models.layers import (
    AFTER_LAST_BN,
    AUTO,
    BEFORE_LAST_CONV,
    DEFAULT_HEAD_DROP_RATE,
    DEFAULT_POST_ACT_POS,
    DEFAULT_RES_DROP_RATE,
    HEAD_BEFORE_POOL,
    RES_DROP_POSITIONS,
    ResidualDropout,
)
from .models.summary import DropoutSite, describe, dropout_sites

__version__ = '0.1.0'

__all__ = [
    'convert', 'dropout_args', 'residual_blocks', 'resolve_position', 'describe', 'dropout_sites',
    'DropoutSite', 'ResidualDropout', 'registered_models', 'supported_base_models', 'SKIPPED', 'SUFFIX',
    'AFTER_LAST_BN', 'BEFORE_LAST_CONV', 'AUTO', 'HEAD_BEFORE_POOL', 'RES_DROP_POSITIONS',
    'DEFAULT_RES_DROP_RATE', 'DEFAULT_HEAD_DROP_RATE', 'DEFAULT_POST_ACT_POS', '__version__',
]
