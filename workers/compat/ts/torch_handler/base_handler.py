"""TorchServe's ``BaseHandler`` (``docs/torchserve-compat.md#basehandler``), loading weights safely.

``initialize`` picks the device and loads ``serializedFile`` from the model directory:

* with ``modelFile`` (eager mode): the file must define exactly one ``torch.nn.Module``
  class, which is instantiated without arguments and given the state dict from
  ``serializedFile``: ``.safetensors`` through ``safetensors.torch.load_file``, anything
  else through ``torch.load(..., weights_only=True)``. A checkpoint that needs full
  unpickling (arbitrary objects, code) is refused, never executed;
* without ``modelFile``: a ``.pt`` TorchScript archive through ``torch.jit.load``.

ONNX, AOT-compiled ``.so``, ``torch.compile`` options, IPEX and the profiler path of
the original are not supported.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import pickle
import time
import warnings
import zipfile
from typing import Any

import torch

from workers.handling.context import Context

from ..handler_utils.timer import timed
from ..utils.util import list_classes_from_module, load_label_mapping

logger = logging.getLogger(__name__)


class BaseHandler(abc.ABC):  # noqa: B024 - abstract by convention, as upstream
    """Load a TorchScript or eager model; ``handle`` = preprocess → inference → postprocess."""

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, str] | None = None
        self.device: torch.device | None = None
        self.map_location: str | None = None
        self.initialized = False
        self.context: Context | None = None
        self.manifest: dict[str, Any] | None = None
        self.model_pt_path: str | None = None
        self.model_yaml_config: dict[str, Any] = {}
        self.explain = False
        self.target = 0
        self.profiler_args: dict[str, Any] = {}

    def initialize(self, context: Context) -> None:
        """Pick the device, load the model and ``index_to_name.json``; set ``initialized``.

        Raises RuntimeError when no weights can be loaded.
        """
        self.context = context
        self.model_yaml_config = context.model_yaml_config
        properties = context.system_properties
        self.device = select_device(properties.get("gpu_id"))
        self.map_location = self.device.type
        self.manifest = context.manifest
        model_dir = str(properties.get("model_dir"))
        self.model = self._load_model(model_dir)
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def _load_model(self, model_dir: str) -> Any:
        model_info: dict[str, Any] = (self.manifest or {}).get("model", {})
        serialized = model_info.get("serializedFile")
        self.model_pt_path = os.path.join(model_dir, serialized) if serialized else None
        model_file = model_info.get("modelFile", "")
        if model_file:
            model = self._load_pickled_model(model_dir, model_file, self.model_pt_path)
            model.to(self.device)
            model.eval()
            return model
        if self.model_pt_path is not None and self.model_pt_path.endswith(".pt"):
            scripted = self._load_torchscript_model(self.model_pt_path)
            scripted.eval()
            return scripted
        raise RuntimeError("No model weights could be loaded")

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        """``torch.jit.load`` a TorchScript archive; RuntimeError for anything else."""
        if not is_torchscript(model_pt_path):
            raise RuntimeError(
                f"{os.path.basename(model_pt_path)} is not a TorchScript archive; an eager "
                "model needs a modelFile and a state_dict checkpoint"
            )
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript, but TorchServe archives still carry it:
            # loading one is this layer's promise, not something the model owner can fix.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            # torch.jit.load has no annotations in torch's own stubs.
            return torch.jit.load(model_pt_path, map_location=self.device)  # type: ignore[no-untyped-call]

    def _load_pickled_model(
        self, model_dir: str, model_file: str, model_pt_path: str | None
    ) -> torch.nn.Module:
        """Instantiate the one ``nn.Module`` of ``model_file`` and load its state dict.

        The name is upstream's (subclasses override it); nothing is fully unpickled.
        """
        if not os.path.isfile(os.path.join(model_dir, model_file)):
            raise RuntimeError("Missing the model.py file")
        module = importlib.import_module(model_file.split(".")[0])
        classes = list_classes_from_module(module, torch.nn.Module)
        if len(classes) != 1:
            names = ", ".join(cls.__name__ for cls in classes) or "none"
            raise ValueError(f"Expected only one class as model definition (found: {names})")
        model: torch.nn.Module = classes[0]()
        if model_pt_path:
            model.load_state_dict(self._load_state_dict(model_pt_path))
        return model

    def _load_state_dict(self, path: str) -> Any:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device=str(self.device))
        try:
            return torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise RuntimeError(
                f"{os.path.basename(path)} needs full unpickling, which is refused: save a "
                f"plain state_dict or use safetensors ({_refusal_reason(exc)})"
            ) from None

    @timed
    def preprocess(self, data: Any) -> torch.Tensor:
        """``torch.as_tensor(data)`` on the model's device; override for real inputs."""
        return torch.as_tensor(data, device=self.device)

    @timed
    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the model under ``torch.inference_mode()``."""
        with torch.inference_mode():
            return self.model(data.to(self.device), *args, **kwargs)

    @timed
    def postprocess(self, data: torch.Tensor) -> Any:
        """``data.tolist()``: one element per request of the batch."""
        return data.tolist()

    def handle(self, data: Any, context: Context) -> Any:
        """Describe, explain or predict for one batch; records ``HandlerTime`` (ms)."""
        start = time.time()
        self.context = context
        if self._is_describe():
            output: Any = [self.describe_handle()]
        else:
            data_preprocess = self.preprocess(data)
            if self._is_explain():
                output = self.explain_handle(data_preprocess, data)
            else:
                output = self.postprocess(self.inference(data_preprocess))
        elapsed_ms = round((time.time() - start) * 1000, 2)
        context.metrics.add_time("HandlerTime", elapsed_ms, None, "ms")
        return output

    def explain_handle(self, data_preprocess: Any, raw_data: Any) -> Any:
        """Explanations via ``get_insights(data, inputs, target)`` of the first request."""
        inputs = None
        target: Any = 0
        row = raw_data[0]
        if isinstance(row, dict):
            inputs = row.get("data") or row.get("body")
            target = row.get("target") or 0
        return self.get_insights(data_preprocess, inputs, target)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any) -> Any:
        """Subclasses that serve ``/explanations`` compute them here (e.g. with Captum)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_insights")

    def describe_handle(self) -> Any:
        """Custom metadata for describe calls; None unless a subclass overrides it."""
        return None

    def get_device(self) -> torch.device | None:
        return self.device

    def _is_explain(self) -> bool:
        if self.context is not None and self.context.get_request_header(0, "explain") == "True":
            self.explain = True
            return True
        return False

    def _is_describe(self) -> bool:
        return self.context is not None and self.context.get_request_header(0, "describe") == "True"


def select_device(gpu_id: int | None) -> torch.device:
    """``cuda:<gpu_id>`` (or xpu/mps) when a GPU id was assigned and one exists, else CPU."""
    if gpu_id is not None:
        if torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device(f"xpu:{gpu_id}")
        if torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


def is_torchscript(path: str) -> bool:
    """True for a TorchScript archive: a zip with ``<name>/constants.pkl`` and code.

    ``torch.save`` checkpoints are zips too, but without those members.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        tails = {name.split("/", 1)[-1] for name in archive.namelist()}
    return "constants.pkl" in tails and any(tail.startswith("code/") for tail in tails)


def _refusal_reason(exc: BaseException) -> str:
    """The one informative sentence of torch's long weights-only refusal."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split(". ", 1)[0]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
