"""Model classes whose head applies dropout to the feature map *before* global pooling.

timm's ``drop_rate`` drops pooled features; the paper shows dropout before pooling is more stable
(the pool averages H*W independently dropped positions). These subclasses re-state only the head
forward; they add no parameters, so state dicts match the base model's.
"""

import torch
import torch.nn as nn
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from torchvision.models.resnet import ResNet as TvResNet

__all__ = ['DropResNet', 'DropResNetV2', 'DropResTvResNet', 'MODEL_TYPES']


class DropResNet(ResNet):
    """timm ``ResNet`` (ResNet/ResNeXt/Wide-ResNet/SE/ECA) with head dropout before pooling."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)


class DropResNetV2(ResNetV2):
    """timm pre-activation ``ResNetV2`` with head dropout before pooling (the head's own dropout is removed)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        return self.head(x, pre_logits=pre_logits)


class DropResTvResNet(TvResNet):
    """torchvision ``ResNet`` with head dropout before pooling (for ``convert``)."""

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.head_drop(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


#: base model class -> dropres model class.
MODEL_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    ResNet: DropResNet,
    ResNetV2: DropResNetV2,
    TvResNet: DropResTvResNet,
}
