import torch

import neuralmem_fast as nm


def test_extension_loads_and_registers_schemas():
    assert nm.has_extension()
    for name in ("content_addressing", "memory_read", "content_read", "memory_write", "memory_write_",
                 "usage_update", "content_write_"):
        assert hasattr(torch.ops.neuralmem, name), name


def test_auto_backend_on_cpu_is_native():
    assert nm.available_backends("cpu")[0] == "cpu"
