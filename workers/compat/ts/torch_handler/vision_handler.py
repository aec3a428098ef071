"""TorchServe's ``VisionHandler``: images (bytes or base64) in, a batch tensor out.

Needs Pillow (importing this module without it raises ModuleNotFoundError naming the
package). Explanations additionally need Captum.
"""

from __future__ import annotations

import abc
import base64
import io
from typing import Any

import torch

from workers.handling.context import Context

from ._optional import require
from .base_handler import BaseHandler

Image: Any = require("PIL.Image", "Pillow", "vision_handler")


class VisionHandler(BaseHandler, abc.ABC):
    """Base for image handlers; subclasses set ``image_processing`` (a transform)."""

    image_processing: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.ig: Any = None

    def initialize(self, context: Context) -> None:
        """BaseHandler's load, then honour ``limit_max_image_pixels``."""
        super().initialize(context)
        if not context.system_properties.get("limit_max_image_pixels"):
            Image.MAX_IMAGE_PIXELS = None

    def preprocess(self, data: Any) -> torch.Tensor:
        """Decode each request's ``data``/``body`` image and stack the transformed tensors.

        A string is base64 of the image; a list is taken as the tensor itself.
        """
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            if isinstance(image, bytes | bytearray):
                picture = Image.open(io.BytesIO(image))
                images.append(self.image_processing(picture))
            else:
                images.append(torch.as_tensor(image, dtype=torch.float32))
        return torch.stack(images).to(self.device)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any = 0) -> Any:
        """Integrated-gradients attributions (needs Captum)."""
        if self.ig is None:
            captum = require("captum.attr", "captum", type(self).__name__)
            self.ig = captum.IntegratedGradients(self.model)
        return self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()
