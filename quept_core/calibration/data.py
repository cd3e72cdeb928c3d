"""Calibration tokens: windows of a user's text file, or text the model writes itself (data-free).

Data-free calibration samples the model's own answers to a fixed set of seed prompts, so no
dataset ships with the product and the evaluation text is never seen. The generated tokens are
cached per (model checksum, seed, shape): GPTQ baselines and QuEPT calibrate on identical data.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quept_core.io.models import LoadedModel
from quept_core.io.paths import cache_dir

SEED_TOPICS = (
    "the history of the Roman Empire", "how vaccines train the immune system", "the water cycle",
    "the life of Marie Curie", "how a compiler turns source code into machine code", "the geography of Japan",
    "the causes of the French Revolution", "how photosynthesis works", "the rules and history of football",
    "the architecture of Gothic cathedrals", "how stock markets set prices", "the migration of birds",
    "the discovery of penicillin", "how the internet routes packets", "the plays of William Shakespeare",
    "volcanoes and plate tectonics", "the economy of medieval Europe", "how batteries store energy",
    "the Apollo moon landings", "the music of Johann Sebastian Bach", "coral reefs and ocean ecology",
    "the invention of the printing press", "how elections work in a parliamentary democracy",
    "the life cycle of stars", "the Silk Road trade routes", "how bread is baked", "the history of chess",
    "the human nervous system", "the industrial revolution in Britain", "the culture of ancient Egypt",
    "how airplanes fly", "the mathematics of prime numbers",
)
GENERATION_BATCH = 8
# Answers stop at this length, or earlier when the batch has written all the tokens still needed.
MAX_ANSWER_TOKENS = 512


class CalibrationDataError(ValueError):
    """The calibration text cannot provide the requested tokens."""


def _windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n_samples` non-overlapping windows of `seqlen` tokens, chosen reproducibly from `ids`."""
    available = ids.numel() // seqlen
    if available < n_samples:
        raise CalibrationDataError(
            f"calibration text has {ids.numel()} tokens: {n_samples} windows of {seqlen} need "
            f"{n_samples * seqlen}; give a longer text or fewer/shorter samples"
        )
    starts = sorted(random.Random(seed).sample(range(available), n_samples))
    return torch.stack([ids[s * seqlen : (s + 1) * seqlen] for s in starts])


def text_file_tokens(loaded: LoadedModel, text_file: Path, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    path = Path(text_file)
    if not path.is_file():
        raise CalibrationDataError(f"calibration text file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return _windows(ids, n_samples, seqlen, seed)


@torch.inference_mode()
def _generate_stream(loaded: LoadedModel, n_tokens: int, seed: int, progress: bool) -> torch.Tensor:
    """Sample the model's answers to seed prompts until `n_tokens` tokens of text exist."""
    tokenizer, model = loaded.tokenizer, loaded.model
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream: list[int] = []
    bar = tqdm(total=n_tokens, desc="calibration text (model-generated)", unit="tok", disable=not progress)
    while len(stream) < n_tokens:
        topics = rng.sample(SEED_TOPICS, GENERATION_BATCH)
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Write a long, detailed encyclopedia article about {topic}."}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for topic in topics
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch, do_sample=True, temperature=0.9, top_p=0.95, repetition_penalty=1.1,
            max_new_tokens=min(MAX_ANSWER_TOKENS, -(-(n_tokens - len(stream)) // GENERATION_BATCH)),
            pad_token_id=pad_id,
        )
        before = len(stream)
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            stream.extend(t for t in row if t not in (pad_id, tokenizer.eos_token_id))
        bar.update(min(len(stream), n_tokens) - before)
    bar.close()
    return torch.tensor(stream[:n_tokens], dtype=torch.long)


def generated_tokens(loaded: LoadedModel, n_samples: int, seqlen: int, seed: int,
                     progress: bool = False) -> torch.Tensor:
    path = cache_dir() / "calib" / f"{loaded.checksum[:16]}-seed{seed}-{n_samples}x{seqlen}.pt"
    if path.is_file():
        return torch.load(path)
    tokens = _generate_stream(loaded, n_samples * seqlen, seed, progress).reshape(n_samples, seqlen)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(tokens, partial)
    partial.replace(path)  # atomic: a half-written cache file is never read
    return tokens


def calibration_tokens(
    loaded: LoadedModel, text_file: Path | None = None, n_samples: int = 16, seqlen: int = 512, seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """LongTensor [n_samples, seqlen] of calibration tokens (model-generated unless a text file is given)."""
    if n_samples < 1 or seqlen < 2:
        raise CalibrationDataError("n_samples must be >= 1 and seqlen >= 2")
    if text_file is not None:
        return text_file_tokens(loaded, text_file, n_samples, seqlen, seed)
    return generated_tokens(loaded, n_samples, seqlen, seed, progress)
