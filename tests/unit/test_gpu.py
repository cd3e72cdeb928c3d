"""The same engine on CUDA, where a GPU exists: every plan runs and agrees with the CPU engine."""

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.protocol import SamplingParams, SequenceRequest
from quept_core.runtime.weights import ElasticWeights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp", "w8", "w6", "w4", "w3"])
def test_cuda_engine_agrees_with_cpu(precision):
    loaded = tiny_loaded()
    elastic = tiny_elastic(loaded)
    weights = ElasticWeights(loaded, elastic)
    cpu = QueptEngine(weights, loaded.tokenizer, device="cpu")
    cuda = QueptEngine(weights, loaded.tokenizer, device="cuda")
    assert cuda.model.final_norm.device.type == "cuda"
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    want = cpu.logits(tokens, cpu.plan(precision))
    got = cuda.logits(tokens, cuda.plan(precision)).cpu()
    assert ((got - want).norm() / want.norm()) < 0.05
    plan, other = cuda.plan(precision), cuda.plan("w4")
    cuda.add(SequenceRequest([5, 6, 7], plan, SamplingParams(max_new_tokens=4)))
    cuda.add(SequenceRequest([9, 10], other, SamplingParams(max_new_tokens=4, temperature=0.8, seed=1, logprobs=2)))
    events = []
    while cuda.running:
        events.extend(cuda.step())
    assert len(events) == 8 and cuda.free_slots == cuda.max_running
