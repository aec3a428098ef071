"""A class whose ``initialize`` fails as model-config.yaml ``fail`` says."""

import os


class Failing:
    def initialize(self, context):
        fail = context.model_yaml_config.get("fail")
        if fail == "memory":
            raise MemoryError()
        if fail == "cuda":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if fail == "file":
            model_dir = context.system_properties["model_dir"]
            with open(os.path.join(model_dir, "weights", "missing.bin"), "rb"):
                pass

    def handle(self, data, context):
        return data
