"""One vLLM engine configuration under prefix caching and preemption (started by :mod:`bench.reliability`).

    python -c "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \\
        bench/reliability_worker.py CONFIG.json RESULT.json

Run by path from a folder outside the checkout, like :mod:`bench.vllm_worker` (the checkout's ``triton_kernels/``
folder must not be importable as a top-level module), so this file imports nothing from ``bench``. vLLM's CPU engine
spawns processes: everything runs under the ``__main__`` guard.

One engine (prefix caching on, a KV cache of ``num_gpu_blocks_override`` blocks, steps of at most one page of
tokens) runs both offline scenarios, greedily, prompts given as token ids:

- ``prefix``: for each pair (first, second) sharing a long prefix, ``second`` alone on a cold cache (the prefix cache
  reset before it), then, after another reset, ``first`` and then ``second`` (whose prefix pages are now cached:
  vLLM reports the cached tokens in ``RequestOutput.num_cached_tokens``). Steps of one page put every chunk boundary
  on a page boundary, cold and warm alike, so the two runs of ``second`` compute the same thing and their answers
  must be identical.
- ``preemption``: each prompt alone (cache reset before each), then all of them at once in a KV cache too small for
  all: vLLM preempts running requests and recomputes them later (``ignore_eos``: every request decodes all its
  tokens, so none leaves early and frees its pages). The preemptions are vLLM's own counter
  (``vllm:num_preemptions`` from ``LLM.get_metrics``); the answers must equal the lone answers.

RESULT is rewritten after each scenario.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path


def write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def counter(llm, name: str) -> float:
    """A counter or gauge of vLLM's metrics snapshot (summed over engines); 0 when absent."""
    total = 0.0
    for metric in llm.get_metrics():
        if metric.name == name and hasattr(metric, "value"):
            total += float(metric.value)
    return total


def generate(llm, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [dict(token_ids=list(o.outputs[0].token_ids), text=o.outputs[0].text,
                 cached_tokens=o.num_cached_tokens or 0, prompt_tokens=len(o.prompt_token_ids))
            for o in outputs]


def prefix_scenario(llm, spec: dict) -> dict:
    rows = []
    for pair in spec["pairs"]:
        llm.reset_prefix_cache()
        cold = generate(llm, [pair["second"]], spec["max_tokens"])[0]
        llm.reset_prefix_cache()
        first = generate(llm, [pair["first"]], spec["max_tokens"])[0]
        warm = generate(llm, [pair["second"]], spec["max_tokens"])[0]
        rows.append(dict(shared_tokens=pair["shared_tokens"], prompt_tokens=warm["prompt_tokens"],
                         first_cached_tokens=first["cached_tokens"], cold_cached_tokens=cold["cached_tokens"],
                         warm_cached_tokens=warm["cached_tokens"], cold_tokens=cold["token_ids"],
                         warm_tokens=warm["token_ids"], cold_text=cold["text"], warm_text=warm["text"],
                         same=cold["token_ids"] == warm["token_ids"]))
    hits = sum(r["warm_cached_tokens"] > 0 for r in rows)
    return dict(requests=2 * len(rows), pairs=len(rows), cache_hits=hits,
                cached_tokens=sum(r["warm_cached_tokens"] for r in rows),
                cold_cached_tokens=sum(r["cold_cached_tokens"] for r in rows),
                answers_changed=sum(not r["same"] for r in rows), rows=rows)


def preemption_scenario(llm, spec: dict) -> dict:
    alone = []
    for prompt in spec["prompts"]:
        llm.reset_prefix_cache()
        alone.append(generate(llm, [prompt], spec["max_tokens"], ignore_eos=True)[0])
    llm.reset_prefix_cache()
    before = counter(llm, "vllm:num_preemptions")
    start = time.perf_counter()
    together = generate(llm, spec["prompts"], spec["max_tokens"], ignore_eos=True)
    seconds = time.perf_counter() - start
    preemptions = counter(llm, "vllm:num_preemptions") - before
    rows = [dict(prompt_tokens=a["prompt_tokens"], alone_tokens=a["token_ids"], together_tokens=t["token_ids"],
                 alone_text=a["text"], together_text=t["text"], same=a["token_ids"] == t["token_ids"])
            for a, t in zip(alone, together)]
    return dict(requests=len(rows), concurrent_seconds=seconds, preemptions=int(preemptions),
                answers_changed=sum(not r["same"] for r in rows), rows=rows)


def _vllm_worker():
    """bench/vllm_worker.py, the file beside this one, loaded by path (this worker runs outside the checkout)."""
    path = Path(__file__).with_name("vllm_worker.py")
    spec = importlib.util.spec_from_file_location("bench_vllm_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(config_path: str, result_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    result_file = Path(result_path)
    result = {"status": "starting"}
    write(result_file, result)
    llm, seconds = _vllm_worker().start_engine(config)
    cache = llm.llm_engine.vllm_config.cache_config
    result.update(status="running", engine_start_s=seconds, block_size=cache.block_size,
                  num_gpu_blocks=cache.num_gpu_blocks, prefix_caching=cache.enable_prefix_caching)
    write(result_file, result)
    try:
        for name, scenario in (("prefix", prefix_scenario), ("preemption", preemption_scenario)):
            if config.get(name):
                t0 = time.perf_counter()
                try:
                    result[name] = dict(scenario(llm, config[name]), status="ok")
                except Exception as exc:  # an error is a result: recorded, and the other scenario still runs
                    result[name] = dict(status="error", reason=f"{type(exc).__name__}: {exc}",
                                        traceback=traceback.format_exc()[-3000:])
                result[name]["seconds"] = time.perf_counter() - t0
                write(result_file, result)
                print(f"[{config['name']}] {name}: " + json.dumps({k: v for k, v in result[name].items()
                                                                   if k not in ("rows", "traceback")}), flush=True)
        result["status"] = "ok"
    finally:
        write(result_file, result)
        # vLLM's orderly shutdown waits tens of seconds for its processes; the result is written, so the worker ends
        # its own process group (it is a session leader: the engine core and workers are in it) at once.
        sys.stdout.flush()
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), 9)
        llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
