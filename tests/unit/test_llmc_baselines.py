"""llm-compressor's GPTQ and AWQ as `quept eval` baselines, and our GPTQ held against llm-compressor's."""

import math

import pytest
import torch
from test_gptq import correlated_inputs, output_error
from tiny_lm import tiny_folder

from quept_core.eval.baselines.gptq import DAMPING, gptq_quantize
from quept_core.eval.baselines.llmc import LLMC_METHODS, llmc_quantize
from quept_core.eval.perplexity import perplexity
from quept_core.io.models import load_model
from quept_core.quant.sources import TableWeights, dequantized_weights, use_weights

pytest.importorskip("llmcompressor")


def llmc_gptq_quantize(weight, hessian, bits, group_size, actorder):
    """llm-compressor's own GPTQ on one layer: min-max group parameters of the weight, then its loop."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                            group_size=group_size, actorder=actorder)
    grouped = weight.reshape(weight.shape[0], -1, group_size)
    scale, zero = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), args)
    quantized, _, fallback = quantize_weight(weight[None].clone(), hessian[None].float().clone(), scale[None],
                                             zero[None], None, args, blocksize=128, percdamp=DAMPING)
    assert not fallback.any()
    return quantized[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_our_gptq_with_act_order_matches_llmc(bits):
    x = correlated_inputs(512, 128)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    hessian = x.T @ x
    ours = gptq_quantize(weight, hessian, bits, 32, act_order=True).dequantize()
    theirs = llmc_gptq_quantize(weight, hessian, bits, 32, "static")
    # Same algorithm and grid: the same codes up to float rounding in the error propagation.
    assert (ours - theirs).abs().gt(1e-4).float().mean() < 0.01
    assert output_error(x, weight, ours) == pytest.approx(output_error(x, weight, theirs), rel=0.02)


@pytest.mark.parametrize("bits", [3, 4])
def test_our_gptq_without_act_order_is_no_worse_than_llmc(bits):
    # Ours fixes each group's scale when the column loop reaches it (the GPTQ paper's way); llm-compressor
    # fixes every group from the unmodified weight first. The reconstruction error must not be worse.
    x = correlated_inputs(512, 128)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    hessian = x.T @ x
    ours = output_error(x, weight, gptq_quantize(weight, hessian, bits, 32).dequantize())
    theirs = output_error(x, weight, llmc_gptq_quantize(weight, hessian, bits, 32, None))
    assert ours <= 1.02 * theirs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(tiny_folder(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.mark.parametrize("method", list(LLMC_METHODS))
def test_llmc_model_is_on_the_claimed_grid_and_evaluates_finite(tiny, method, one_thread):
    before = {n: p.clone() for n, p in tiny.model.named_parameters()}
    tokens = torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 127, (2, 32), generator=torch.Generator().manual_seed(1))
    quantized, table = llmc_quantize(tiny.model, tiny.tokenizer, tokens, method, bits=3, group_size=32)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    for name, qweight in table.items():
        out_features, in_features = qweight.codes.shape
        assert qweight.codes.max() <= 7 and qweight.scale.shape == (out_features, in_features // 32)
        assert torch.equal(qweight.zero, qweight.zero.round())
    # The codes reproduce llm-compressor's own fake-quantized model exactly.
    expected = quantized(windows).logits
    weights = dequantized_weights(TableWeights({(n, 3): q for n, q in table.items()}), {n: 3 for n in table})
    with use_weights(quantized, weights):
        torch.testing.assert_close(quantized(windows).logits, expected, rtol=1e-4, atol=1e-4)
        ppl = perplexity(quantized, windows).ppl
    assert math.isfinite(ppl) and ppl > 1
