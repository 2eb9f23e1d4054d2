import os
import zlib

# The Triton interpreter must be switched on before any kernel is decorated, i.e. before the package
# is imported; the tests run every Triton kernel on CPU tensors this way.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws its own random inputs from a seed derived from its id; set AEF_TEST_SEED to
    draw a different set (the seed in use is part of a failure's report)."""
    base_seed = int(os.environ.get("AEF_TEST_SEED", "0"))
    seed = zlib.crc32(request.node.nodeid.encode()) ^ base_seed
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
