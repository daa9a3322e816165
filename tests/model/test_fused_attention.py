"""`xla` and `cudnn` (jax.nn.dot_product_attention): the causal and document masks they are
given, against `dense`. cuDNN itself needs a GPU (bench/gpu.sh runs it); here the same
call with JAX's XLA implementation checks everything xgen builds around it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.config.validate import validate
from xgen.model.attention import causal_attention, fused_attention


def test_fused_attention_keeps_documents_apart_like_dense():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 40, 4, 16))
    k, v = (jax.random.normal(key, (2, 40, 2, 16)) for key in keys[1:])
    segments = jnp.asarray(np.stack([np.repeat([0, 1], [25, 15]), np.repeat([3, 4, 5], [5, 5, 30])]))
    want = causal_attention(q, k, v, segment_ids=segments, kernel="dense")
    got = fused_attention(q, k, v, segments, implementation=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    no_docs = fused_attention(q, k, v, None, implementation=None)
    np.testing.assert_allclose(np.asarray(no_docs), np.asarray(causal_attention(q, k, v, kernel="dense")), atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("execution.attention=cudnn",), "execution.attention=cudnn is cuDNN's GPU kernel and hardware=cpu is cpu"),
        (("execution.attention=splash", "hardware=gpu_1"), "execution.attention=splash is a TPU (Pallas Mosaic) kernel"),
    ],
)
def test_a_kernel_for_other_hardware_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(*overrides))
