"""Device and dtypes of the kernel tests: Triton's interpreter on CPU (fp32, fp16), a GPU when present
and TRITON_INTERPRET is not 1 (bf16 too; bf16 ``tl.dot`` is garbage in the interpreter, so a test module
of a kernel without ``tl.dot`` says ``NO_DOT = True`` to run in bf16 in the interpreter as well).  The
interpreter flag itself is set by tests/conftest.py before any kernel is imported."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def pytest_generate_tests(metafunc):
    """Every kernel test with a ``dtype`` argument runs in each dtype the device supports."""
    if "dtype" in metafunc.fixturenames:
        dtypes = DTYPES
        if getattr(metafunc.module, "NO_DOT", False) and torch.bfloat16 not in dtypes:
            dtypes = [*DTYPES, torch.bfloat16]
        metafunc.parametrize("dtype", dtypes, ids=lambda d: str(d).removeprefix("torch."))


@pytest.fixture
def device() -> str:
    return DEVICE
