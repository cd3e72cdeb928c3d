"""The real default model served from its serving store: the first start writes the store and frees
the transformers model and its packs; a later start never loads the model and reads its packs. Needs the calibrated fast artifact (the first
run of `quept serve` or `quept calibrate --preset fast` makes it)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import PreTrainedModel

from quept_core.artifact.serving import ServingStore
from quept_core.precision import FP
from quept_core.runtime import engine as engine_module
from quept_core.runtime.protocol import SamplingParams
from service.engine import loading
from service.engine.pipeline import GenerationSpec, Pipeline
from service.settings import Settings
from tests.support import WIKITEXT_TEST

pytestmark = pytest.mark.integration


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def test_the_second_start_serves_from_the_store_without_loading_the_model(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(loading, "serving_store_dir", lambda artifact_dir: tmp_path / "store")
    models = []
    real_load_model = loading.load_model

    def recording_load_model(spec):
        loaded = real_load_model(spec)
        models.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(loading, "load_model", recording_load_model)
    settings = Settings(threads=2)
    first = loading.load_backend(settings)
    assert len(models) == 1 and (tmp_path / "store" / "manifest.json").is_file()
    gc.collect()
    assert models[0]() is None, "the transformers model is still referenced after the first start"
    pipeline = Pipeline(first, controller=None, scheduler=None, metrics=None, max_new_tokens_limit=64,
                        queue_timeout_s=1, max_running=1)
    prompt = pipeline.prompt_ids(GenerationSpec(
        None, [{"role": "user", "content": "What is the capital of France? Answer with one word."}],
        SamplingParams()))
    del pipeline
    first_tokens = first.engine.generate(prompt, first.resolve("w8"), SamplingParams(max_new_tokens=16))
    del first
    gc.collect()

    def no_model(spec):
        raise AssertionError("a start with a serving store loaded the transformers model")

    def no_packing(*_):
        raise AssertionError("a start with pack files packed weights from their codes")

    monkeypatch.setattr(loading, "load_model", no_model)
    monkeypatch.setattr(engine_module, "pack_weight", no_packing)
    second = loading.load_backend(settings)
    assert isinstance(second.engine.weights, ServingStore)
    assert not [o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)]
    tokens = second.engine.generate(prompt, second.resolve("w8"), SamplingParams(max_new_tokens=16))
    assert tokens == first_tokens and "Paris" in second.tokenizer.decode(tokens, skip_special_tokens=True)
    resident = second.resident_bytes()
    # Every quantized plan's packs are read at start; fp is sized from its pack file, read on first use.
    assert resident.pop("fp") == 0 and all(resident.values()), resident
    fp = second.resolve(FP)
    assert second.describe(fp).weight_bytes == second.engine.weight_bytes(fp) > 0
    print(f"\nRSS after the second start, every uniform plan resident: {resident_mb():.0f} MB "
          f"(packs {second.engine.cache.resident_bytes / 2**20:.0f} MiB)")


def test_the_served_tokenizer_gives_what_transformers_gives_on_the_real_model():
    """The server reads its tokenizer without transformers (runtime/tokenizer.py); on the default
    model's own folder it must give the same ids, text and chat prompts."""
    from transformers import AutoTokenizer

    from quept_core.eval.perplexity import read_text

    store, _ = loading._served(Settings())
    folder = store.folder / "tokenizer"
    hf, ours = AutoTokenizer.from_pretrained(folder), store.tokenizer()
    text = read_text(WIKITEXT_TEST)[:200_000]
    ids = hf.encode(text)
    assert ours.encode(text) == ids and ours.decode(ids) == hf.decode(ids)
    assert ours.all_special_ids == hf.all_special_ids and ours.eos_token_id == hf.eos_token_id
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi 🙂"},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Ça va ?"}],
    ]
    for conversation in conversations:
        for generation_prompt in (True, False):
            expected = hf.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
            assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt,
                                            tokenize=False) == expected
            with_special = hf.encode(expected, add_special_tokens=False)
            assert ours.decode(with_special) == hf.decode(with_special)
            assert ours.decode(with_special, skip_special_tokens=True) == hf.decode(with_special,
                                                                                     skip_special_tokens=True)
