"""The demo model set: Orpheus-shaped models with random weights, written in the upstream formats.

It lets the whole pipeline run with no download: a small Llama with Orpheus's
exact vocabulary layout (156,940 ids), the real SNAC 24 kHz architecture, and
a byte-level tokenizer.json whose special and audio tokens sit at Orpheus's
ids. The weights are random, so the audio is noise; every code path (prompt,
LLM, framing, SNAC, streaming) is the real one. Tests build the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .constants import BEGIN_OF_TEXT, CUSTOM_TOKEN_BASE, END_OF_TEXT, MIN_VOCAB_SIZE, VOCAB_SIZE

DEMO_VERSION = "v3"  # v2: Snake alphas drawn, not all 1; v3: the custom tokens ordinary added tokens, as upstream
LLM_DIR = "llm"
SNAC_DIR = "snac"

# Upstream hubertsiuzdak/snac_24khz config: the architecture Orpheus decodes with.
SNAC_24KHZ_CONFIG = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}

# Orpheus 3B (canopylabs/orpheus-3b-0.1-ft) for reference: hidden 3072, 28 layers,
# 24 heads, 8 KV heads, intermediate 8192, tied embeddings, llama3 rope scaling.
ORPHEUS_3B_SHAPE = {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                    "num_key_value_heads": 8, "intermediate_size": 8192}
DEMO_LLM_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 384}


@dataclass(frozen=True)
class ModelSet:
    """A directory holding ``llm/`` (HF Llama + tokenizer.json) and ``snac/`` (upstream SNAC)."""

    root: Path

    @property
    def llm(self) -> Path:
        return self.root / LLM_DIR

    @property
    def snac(self) -> Path:
        return self.root / SNAC_DIR

    def check(self) -> None:
        """Refuse a model set the server's models would refuse as they load, naming the file and the
        problem: ``serve`` runs this before tritonserver starts, where a refusal left only "failed to load
        all models", its reason buried in the server's log. Configs and the weight files' headers only:
        no weights are read (Orpheus 3B's are 6 GB)."""
        from .llama import check_checkpoint, read_llama_config  # noqa: PLC0415
        from .prompt import load_tokenizer  # noqa: PLC0415 (keeps import light)
        from .snac_codec import check_snac  # noqa: PLC0415

        if not self.root.is_dir():
            raise FileNotFoundError(f"model set {self.root} does not exist")
        for need in ("config.json",):
            if not (self.llm / need).is_file():
                raise FileNotFoundError(
                    f"{self.llm / need} not found: {self.root} must hold llm/ (Hugging Face Llama checkpoint "
                    f"with tokenizer.json) and snac/ (SNAC config.json + pytorch_model.bin)"
                )
        if not list(self.llm.glob("*.safetensors")):
            raise FileNotFoundError(f"{self.llm} holds no *.safetensors weights")
        vocab = read_llama_config(self.llm).vocab_size
        if vocab < MIN_VOCAB_SIZE:  # the engine would fail every step
            raise ValueError(f"{self.llm / 'config.json'} has vocab_size {vocab}: not an Orpheus checkpoint, "
                             f"whose audio tokens need {MIN_VOCAB_SIZE} ids at least ({VOCAB_SIZE} in Orpheus 3B)")
        check_checkpoint(self.llm)
        load_tokenizer(self.llm)
        check_snac(self.snac)


def llama_config(shape: dict, max_position_embeddings: int = 131_072) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": True,
        "bos_token_id": BEGIN_OF_TEXT,
        "eos_token_id": END_OF_TEXT,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
        **shape,
    }


def write_random_llama(path: Path, shape: dict = DEMO_LLM_SHAPE, seed: int = 0, dtype=torch.float32,
                       tie_word_embeddings: bool = True) -> None:
    """Write a random-weight Llama checkpoint (config.json + model.safetensors)."""
    config = llama_config(shape)
    config["tie_word_embeddings"] = tie_word_embeddings
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape_):
        return (torch.randn(*shape_, generator=gen) * 0.02).to(dtype)

    state = {"model.embed_tokens.weight": randn(VOCAB_SIZE, hidden),
             "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    if not tie_word_embeddings:
        state["lm_head.weight"] = randn(VOCAB_SIZE, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": randn(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": randn(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": randn(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": randn(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": randn(inter, hidden),
            p + "mlp.up_proj.weight": randn(inter, hidden),
            p + "mlp.down_proj.weight": randn(hidden, inter),
            p + "input_layernorm.weight": 1 + randn(hidden),
            p + "post_attention_layernorm.weight": 1 + randn(hidden),
        }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json with Llama-3's special ids and Orpheus's custom tokens.

    Text maps to 256 byte tokens (ids 0-255); ids up to 127,999 are unused
    placeholders so that every special and audio token has its Orpheus id.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for i in range(len(vocab), BEGIN_OF_TEXT):
        vocab[f"<|unused_{i}|>"] = i
    specials = {BEGIN_OF_TEXT: "<|begin_of_text|>", BEGIN_OF_TEXT + 1: "<|end_of_text|>", END_OF_TEXT: "<|eot_id|>"}
    for i in range(BEGIN_OF_TEXT, CUSTOM_TOKEN_BASE):
        vocab[specials.get(i, f"<|reserved_special_token_{i - BEGIN_OF_TEXT}|>")] = i
    for i in range(CUSTOM_TOKEN_BASE, VOCAB_SIZE):
        vocab[f"<custom_token_{i - CUSTOM_TOKEN_BASE}>"] = i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tok, special=True, normalized=False) for tok, i in vocab.items()
               if BEGIN_OF_TEXT <= i < CUSTOM_TOKEN_BASE]
    tokenizer.add_special_tokens(special)
    # Orpheus adds its audio and control tokens as ordinary added tokens (add_tokens), not special ones.
    tokenizer.add_tokens([AddedToken(tok, special=False) for tok, i in vocab.items() if i >= CUSTOM_TOKEN_BASE])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BEGIN_OF_TEXT)],
    )
    tokenizer.save(str(path / "tokenizer.json"))


def write_random_snac(path: Path, seed: int = 0) -> None:
    from snac import SNAC  # noqa: PLC0415

    torch.manual_seed(seed)
    model = SNAC(**SNAC_24KHZ_CONFIG)
    with torch.no_grad():
        # SNAC initialises every Snake's alpha to 1; trained ones spread out (and may change sign), which
        # the decoder's folded Snakes (snake.fold_snake_scales) must reproduce: draw them.
        for name, alpha in model.named_parameters():
            if name.endswith(".alpha"):
                sign = torch.where(torch.rand(alpha.shape) < 0.1, -1.0, 1.0)
                alpha.copy_(sign * torch.exp(torch.empty(alpha.shape).uniform_(-1.5, 1.5)))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SNAC_24KHZ_CONFIG, indent=2))
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def write_model_set(root: Path, llm_shape: dict = DEMO_LLM_SHAPE, seed: int = 0) -> ModelSet:
    """Write a complete random model set under ``root`` (overwrites)."""
    models = ModelSet(Path(root))
    write_random_llama(models.llm, llm_shape, seed=seed)
    write_tokenizer(models.llm)
    write_random_snac(models.snac, seed=seed)
    return models


CACHE_VARIABLE = "ORPHEUS_TRITON_CACHE"


def cache_dir() -> Path:
    """Where the demo model set, rendered repositories and the server's backends are kept."""
    return Path(os.environ.get(CACHE_VARIABLE, Path.home() / ".cache" / "orpheus-triton"))


def cache_folder(name: str = "") -> Path:
    """``cache_dir()`` (or its sub-folder ``name``), made if it is not there. Raises ValueError naming the
    cache folder and the variable that sets it where it cannot be made or written: mkdir's own error
    ("No such file or directory: '/proc/nonexistent'") said neither."""
    root = cache_dir()
    folder = root / name if name else root
    if CACHE_VARIABLE in os.environ:
        what, advice = f"the cache folder {root} (set by {CACHE_VARIABLE})", f"point {CACHE_VARIABLE} at"
    else:
        what, advice = f"the cache folder {root} (the default)", f"set {CACHE_VARIABLE} to"
    advice += " a folder this user can write"
    if root.exists() and not root.is_dir():
        raise ValueError(f"{what} is not a folder: {advice}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        made = "cannot be made" if folder == root else f"cannot be used: making {folder} failed"
        raise ValueError(f"{what} {made}: {error.strerror or error}; {advice}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} cannot be used: {folder} is not writable by this user; {advice}")
    return folder


def demo_model_set(log=print) -> ModelSet:
    """The cached demo model set, generated on first use (atomically, so a crash leaves no half set)."""
    target = cache_dir() / f"demo-models-{DEMO_VERSION}"
    if (target / ".complete").is_file():
        return ModelSet(target)
    cache_folder()
    log(f"generating the demo model set (random weights, audio will be noise) in {target} ...")
    staging = Path(tempfile.mkdtemp(prefix="demo-models-", dir=target.parent))
    try:
        write_model_set(staging)
        (staging / ".complete").write_text(DEMO_VERSION)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log("demo model set ready")
    return ModelSet(target)
