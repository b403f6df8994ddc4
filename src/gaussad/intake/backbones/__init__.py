"""Backbone registry: every feature network is created by name, timm-style.

A family module (``efficientnet``, ``resnet``, ``mobilenet``) registers a :class:`BackboneSpec` per network with
:func:`register`; the spec says what is known before building (input size, level names, recommended map levels,
normalisation, weights), and its factory builds a :class:`gaussad.intake.backbones.base.Backbone` (a torch module whose
``forward_levels`` yields the feature map of each level). This module and the family modules import no torch:
listing backbones and resolving levels stay light, and torch is imported only when a factory runs.
"""

from .registry import (BackboneSpec, create_backbone, get_spec, list_backbones, register, resolve_levels, weights_file)

from . import efficientnet  # noqa: E402,F401  (registers the EfficientNet family)
from . import resnet  # noqa: E402,F401  (registers the ResNet family)
from . import mobilenet  # noqa: E402,F401  (registers MobileNetV2)
