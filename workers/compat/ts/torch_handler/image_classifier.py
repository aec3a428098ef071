"""TorchServe's ``image_classifier``: top-5 ``{label: probability}`` per image.

Needs torchvision and Pillow (importing this module without them raises
ModuleNotFoundError naming the missing package). Labels come from
``index_to_name.json`` when the archive has one, else the class index.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..utils.util import map_class_to_label
from ._optional import require
from .vision_handler import VisionHandler

transforms: Any = require("torchvision.transforms", "torchvision", "image_classifier")


class ImageClassifier(VisionHandler):
    """Resize 256, center-crop 224, ImageNet normalisation; softmax top-k."""

    topk = 5
    image_processing = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )

    def set_max_result_classes(self, topk: int) -> None:
        self.topk = topk

    def get_max_result_classes(self) -> int:
        return self.topk

    def postprocess(self, data: torch.Tensor) -> Any:
        """The ``topk`` most probable classes (fewer if the model has fewer)."""
        probabilities = F.softmax(data, dim=1)
        probs, classes = torch.topk(probabilities, min(self.topk, data.shape[1]), dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())
