"""The Llama 4 pieces of ``mcore/modules`` without a process group: the chunked causal mask against transformers'
own mask function (whole sequence and a query block at the end of a longer key range), and which layers count as
NoPE under both forms of megatron's ``no_rope_freq``. The modules' forward is proven end to end against transformers
in ``tests/distributed/test_llama4.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
masking_utils = pytest.importorskip("transformers.masking_utils")

from megatron_bridge_ext.mcore.modules import chunked_causal_mask, is_nope_layer  # noqa: E402


@pytest.mark.parametrize("sq,sk,chunk", [(12, 12, 5), (12, 12, 1), (12, 12, 16), (3, 12, 5), (1, 11, 4)])
def test_chunked_causal_mask_is_transformers_chunked_mask(sq, sk, chunk):
    attend = masking_utils.chunked_causal_mask_function(chunk, torch.zeros(1, dtype=torch.long))
    q = torch.arange(sk - sq, sk).view(sq, 1)  # the queries are the last sq positions
    k = torch.arange(sk).view(1, sk)
    want = ~attend(0, 0, q, k)
    got = chunked_causal_mask(sq, sk, chunk)
    assert got.shape == (1, 1, sq, sk) and got.dtype == torch.bool
    assert torch.equal(got[0, 0], want.expand(sq, sk))


def test_nope_layers_from_no_rope_freq():
    class Config:
        no_rope_freq = [0, 1, 1, 0]

    assert [is_nope_layer(Config, n) for n in range(1, 5)] == [False, True, True, False]
    Config.no_rope_freq = 2  # megatron-core's int form: every 2nd layer
    assert [is_nope_layer(Config, n) for n in range(1, 5)] == [False, True, False, True]
    Config.no_rope_freq = None
    assert not any(is_nope_layer(Config, n) for n in range(1, 5))
