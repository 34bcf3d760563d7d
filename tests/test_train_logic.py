"""Device-dependent choices, tested as pure logic (the CUDA paths cannot run on this machine)."""

import pytest

from pipelines.train import resolve_precision


@pytest.mark.parametrize("requested,cuda,bf16,expected", [
    ("auto", False, False, "fp32"), ("fp16", False, False, "fp32"), ("bf16", False, True, "fp32"),
    ("auto", True, True, "bf16"), ("auto", True, False, "fp16"), ("fp32", True, True, "fp32"),
    ("fp16", True, True, "fp16"), ("bf16", True, False, "fp16"),
])
def test_precision(requested, cuda, bf16, expected):
    assert resolve_precision(requested, cuda, bf16) == expected
