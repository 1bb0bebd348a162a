"""Plans shipped with the package, and which one fits a model.

A shipped plan records, beside the head counts every plan records, a fingerprint of the model it was calibrated
for: its architecture and a hash of the configuration fields that fix the attention layers' inputs (sizes, layer
and head counts, vocabulary, positions, rotary base, normalisation). A model whose head counts and fingerprint match
gets the plan when nothing else is configured (``sparse_attn.configure(model)``, ``attn_implementation="sparse"``
without configure, the vLLM backend without options); the choice is logged once, and ``auto_plan=False`` (vLLM:
``"auto_plan": false``; for layers never configured, ``SPARSE_ATTN_AUTO_PLAN=0``) turns it off. The file's path plays no part: a copy of the model in any folder matches, a
different model with the same shapes does not unless its configuration agrees field for field.

``sparse-attn-plan list`` prints the shipped plans and their fingerprints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

from .plan import ModelShape, Plan, PlanError, load_plan

__all__ = ["PLANS_DIR", "AUTO_PLAN_ENV", "model_fingerprint", "shipped_plans", "find_shipped_plan", "announce"]

PLANS_DIR = Path(__file__).parent / "plans"
#: Set to 0 to keep the content-aware default for layers never configured (``attn_implementation="sparse"``).
AUTO_PLAN_ENV = "SPARSE_ATTN_AUTO_PLAN"
logger = logging.getLogger("sparse_attn")

#: Configuration fields hashed into the fingerprint (absent fields hash as None).
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                      "rms_norm_eps", "tie_word_embeddings")


def _config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_fingerprint(model_or_config) -> dict:
    """``{"architecture": ..., "config": sha256 hex}`` of a transformers model or configuration (vLLM's
    ``hf_config`` is one)."""
    config = _config(model_or_config)
    values = {}
    for name in FINGERPRINT_FIELDS:
        value = getattr(config, name, None)
        if name == "rope_theta" and value is None:  # transformers 5 keeps it in rope_parameters
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        if isinstance(value, float):
            value = float(f"{value:.6g}")  # the same value read from JSON or from a float32 weight file
        values[name] = value
    architectures = getattr(config, "architectures", None) or [type(model_or_config).__name__]
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return {"architecture": architectures[0], "config": digest}


@functools.cache
def shipped_plans() -> tuple[tuple[Path, Plan], ...]:
    """Every plan file of the package's ``plans/`` folder, parsed (a file that fails to parse is logged and left
    out)."""
    plans = []
    for path in sorted(PLANS_DIR.glob("*.json")):
        try:
            plans.append((path, load_plan(path)))
        except PlanError as error:
            logger.warning("sparse_attn: skipping the shipped plan %s: %s", path.name, error)
    return tuple(plans)


def find_shipped_plan(model_or_config) -> tuple[Path, Plan] | None:
    """The shipped plan whose head counts and fingerprint match the model, or None."""
    try:
        shape = ModelShape.from_model(model_or_config)
    except PlanError:
        return None
    fingerprint = model_fingerprint(model_or_config)
    for path, plan in shipped_plans():
        if plan.shape == shape and plan.fingerprint == fingerprint:
            return path, plan
    return None


_announced: set[str] = set()


def announce(path: Path, where: str) -> None:
    """Log once per plan and integration that a shipped plan was chosen automatically."""
    key = f"{where}:{path.name}"
    if key not in _announced:
        _announced.add(key)
        logger.warning("sparse_attn: %s uses the shipped plan %s, which matches this model (turn the automatic "
                       "choice off with auto_plan=False)", where, path.name)
