"""The same engine on CUDA, where a GPU exists: every plan runs and agrees with the CPU engine."""

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.protocol import SamplingParams, SequenceRequest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp", "w8", "w6", "w4", "w3"])
def test_cuda_engine_agrees_with_cpu(precision):
    loaded = tiny_loaded()
    elastic = tiny_elastic(loaded)
    cpu = QueptEngine(loaded, elastic, device="cpu")
    cuda = QueptEngine(loaded, elastic, device="cuda")
    assert cuda.model.final_norm.device.type == "cuda"
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    want = cpu.logits(tokens, cpu.plan(precision))
    got = cuda.logits(tokens, cuda.plan(precision)).cpu()
    assert ((got - want).norm() / want.norm()) < 0.05
    requests = [SequenceRequest([5, 6, 7], SamplingParams(max_new_tokens=4)),
                SequenceRequest([9, 10], SamplingParams(max_new_tokens=4, temperature=0.8, seed=1))]
    batch = cuda.start_batch(requests, cuda.plan(precision))
    events = []
    while not batch.done:
        events.extend(batch.step())
    assert len(events) == 8
