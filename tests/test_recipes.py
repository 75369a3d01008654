"""Shipped training recipes use the documented dropout defaults, or say on the line why not."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from timm_dropres import DEFAULT_HEAD_DROP_RATE, DEFAULT_RES_DROP_RATE
from timm_dropres.recipes import RECIPES_DIR, list_recipes

README = Path(__file__).resolve().parents[1] / 'README.md'
DEFAULTS = dict(drop_rate=DEFAULT_HEAD_DROP_RATE, res_drop_rate=DEFAULT_RES_DROP_RATE, res_drop_pos='auto')
#: recipes that are not dropres-finetune runs of a user's data: launch configs, studies, the paper's reproductions
#: (whose header states the paper's own settings)
NOT_TRAINING = ('accelerate/', 'studies/', 'paper/', 'study_', 'ablation_')
TRAINING = [n for n in list_recipes() if not n.startswith(NOT_TRAINING)]


def test_readme_documents_the_package_defaults():
    section = README.read_text().split('## Defaults', 1)[1]
    assert f'`res_drop_rate={DEFAULT_RES_DROP_RATE}`' in section and f'`drop_rate={DEFAULT_HEAD_DROP_RATE}`' in section
    assert "`res_drop_pos='auto'`" in section


def test_training_recipes_are_found():
    assert {'fashion_mnist_resnet18', 'pets_resnet50'} <= set(TRAINING)


@pytest.mark.parametrize('name', TRAINING)
def test_recipe_uses_the_documented_defaults_or_says_why_not(name):
    path = RECIPES_DIR / f'{name}.yaml'
    text = path.read_text()
    cfg = yaml.safe_load(text)
    for key, default in DEFAULTS.items():
        if key not in cfg or cfg[key] == default:
            continue
        line = next(i for i, s in enumerate(text.splitlines()) if re.match(rf'{key}\s*:', s))
        comment = ' '.join(s.partition('#')[2] for s in text.splitlines()[line:line + 3])
        assert 'not the default' in comment, f'{path}: {key}: {cfg[key]} differs from the documented default ' \
                                             f'{default} without a comment saying why'
