"""The shape of DeepSpeed's engine as model code sees it, for unit tests of unwrapping (the real
engine runs in test_train.py): forward delegates, `.module` is the wrapped model."""

import torch


class FakeEngine(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
