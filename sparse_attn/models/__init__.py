"""Real models for demos and accuracy tests."""

from .smollm2 import load_smollm2, make_passkey_prompt, passkey_retrieved, smollm2_gguf_path

__all__ = ["load_smollm2", "make_passkey_prompt", "passkey_retrieved", "smollm2_gguf_path"]
