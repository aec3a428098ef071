"""Two classes and no ``handle`` function: TorchServe cannot pick one."""


class First:
    def handle(self, data, context):
        return data


class Second:
    def handle(self, data, context):
        return data
