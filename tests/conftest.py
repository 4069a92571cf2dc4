"""Test setup: on a machine without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything defines a @triton.jit function, hence here, at import.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def device():
    return DEVICE

