"""A BaseHandler subclass as users write them: JSON lists in, model outputs out."""

import torch
from ts.torch_handler.base_handler import BaseHandler


class TensorHandler(BaseHandler):
    def preprocess(self, data):
        rows = [row.get("data") or row.get("body") for row in data]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def postprocess(self, data):
        if self.mapping:
            best = data.argmax(1).tolist()
            return [{self.mapping[str(i)]: row} for i, row in zip(best, data.tolist(), strict=True)]
        return data.tolist()

    def describe_handle(self):
        return {"handler": "TensorHandler", "device": str(self.device)}

    def get_insights(self, tensor_data, raw_data, target):
        return [{"target": target, "inputs": raw_data} for _ in tensor_data]
