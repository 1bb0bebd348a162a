"""vLLM plugin (entry point ``vllm.general_plugins``): makes ``--attention-backend sparse`` work without patching vLLM.

vLLM runs :func:`register` once in every process (front end, engine core, workers). It

1. registers the enum member ``AttentionBackendEnum.SPARSE`` (the layer looks its backend up by ``get_name()``);
2. teaches pickle to send that member by name: spawned processes unpickle their config before any plugin runs, and
   the default enum pickle (by value) would fail there; unpickling by name imports this module, which registers it;
3. on CPU, wraps ``CpuPlatform.get_attn_backend_cls``, which otherwise always answers CPU_ATTN;
4. checks the backend's options (:mod:`.config`) when the config is built, so a bad option or a plan made for
   another model fails in the caller's process, before any engine starts, and installs the worker extension that
   answers ``collective_rpc("sparse_attn_stats")`` (unless the run already has a worker extension), and, where
   prompt rows can read sparse masks, the scheduler whose prefill chunks start on mask-block boundaries
   (:mod:`.scheduler`; unless the run chose a scheduler).
"""

from __future__ import annotations

import copyreg

BACKEND_NAME = "SPARSE"
BACKEND_PATH = "sparse_attn.vllm.backend.SparseAttentionBackend"
STATS_EXTENSION = "sparse_attn.vllm.backend.SparsityStatsExtension"
ALIGNED_SCHEDULER = "sparse_attn.vllm.scheduler.block_aligned_scheduler"


def register() -> None:
    """Idempotent: safe to call in every process and more than once."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)
    copyreg.pickle(AttentionBackendEnum, _reduce_backend)
    _patch_platform()


def lookup_backend(name: str):
    """Unpickling target for the member: registers it first in a fresh process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    return AttentionBackendEnum[name]


def _reduce_backend(member):
    if member.name == BACKEND_NAME:
        return lookup_backend, (BACKEND_NAME,)
    return type(member), (member._value_,)  # what Enum.__reduce_ex__ does


def sparse_backend_selected(vllm_config) -> bool:
    """Whether any attention layer of this run is meant to use the sparse backend."""
    attention = vllm_config.attention_config
    chosen = [attention.backend, *(attention.backend_per_kind or {}).values()]
    return any(getattr(b, "name", None) == BACKEND_NAME for b in chosen)


def _patch_platform() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_sparse_attn_patched", False):
        return
    original_check = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        if sparse_backend_selected(vllm_config):
            from .config import options_from_vllm_config

            options = options_from_vllm_config(vllm_config)  # raises SparseAttnConfigError naming the bad option
            _align_prefill_chunks(vllm_config, options)
            parallel = vllm_config.parallel_config
            if not parallel.worker_extension_cls:  # llm.collective_rpc("sparse_attn_stats") then works
                parallel.worker_extension_cls = STATS_EXTENSION

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        # The CPU platform ignores a selected backend (it logs "Cannot use ... on CPU" and picks CPU_ATTN).
        original_select = platform_cls.get_attn_backend_cls.__func__

        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if getattr(selected_backend, "name", None) == BACKEND_NAME:
                return _validated_path(selected_backend, attn_selector_config, cls.get_device_capability())
            return original_select(cls, selected_backend, attn_selector_config, num_heads)

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._sparse_attn_patched = True


def _align_prefill_chunks(vllm_config, options) -> None:
    """Where prompt rows can read sparse masks, schedule prefill chunks that start on mask-block boundaries
    (:mod:`.scheduler`), so a prompt's answer does not depend on how vLLM cut it into chunks; a scheduler the run
    chose itself is kept, with a warning."""
    model_config = getattr(vllm_config, "model_config", None)
    max_len = getattr(model_config, "max_model_len", None) or 1 << 62
    scheduler_config = vllm_config.scheduler_config
    if not options.sparse_prefill(max_len) or scheduler_config.scheduler_cls == ALIGNED_SCHEDULER:
        return
    from vllm.logger import init_logger

    logger = init_logger(__name__)
    from .scheduler import hook_available

    if scheduler_config.scheduler_cls is not None or not hook_available():
        logger.warning("sparse_attn: prefill chunks are not aligned to the %d-token mask blocks (%s): a prompt's "
                       "sparse prefill can then depend on where vLLM cuts its chunks", options.block_size,
                       f"scheduler {scheduler_config.scheduler_cls} chosen by the run"
                       if scheduler_config.scheduler_cls is not None else "this vLLM has no chunk-alignment hook")
        return
    scheduler_config.scheduler_cls = ALIGNED_SCHEDULER
    logger.info("sparse_attn: prefill chunks start on %d-token mask-block boundaries", options.block_size)


def _validated_path(selected_backend, attn_selector_config, device_capability) -> str:
    """What the CUDA platform does for a selected backend: validate it, then return its class path."""
    backend_cls = selected_backend.get_class()
    reasons = backend_cls.validate_configuration(device_capability=device_capability, **attn_selector_config._asdict())
    if reasons:
        raise ValueError(f"Selected backend {selected_backend} is not valid for this configuration. Reason: {reasons}")
    return selected_backend.get_path()
