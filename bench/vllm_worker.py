"""One vLLM engine configuration, measured in a process of its own (started by :mod:`bench.e2e_vllm`).

    python -c "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \\
        bench/vllm_worker.py CONFIG.json RESULT.json

Run by path from a folder outside the checkout: vLLM imports any top-level module named ``triton_kernels``, and the
checkout has a folder of that name, so the repository root must not be on ``sys.path`` (this file therefore imports
nothing from ``bench``). vLLM's CPU engine spawns processes: everything runs under the ``__main__`` guard.

CONFIG holds the model folder, the attention backend and its ``additional_config``, the engine arguments, the
prompts and the number of output tokens. For each prompt, one greedy generate of ``output_tokens`` tokens
(``ignore_eos``) gives the output and, from vLLM's per-request metrics (``disable_log_stats=False``; engine-core
timestamps), the time to first token (first token - scheduled) and the time per output token
((last token - first token) / (tokens - 1)). Where the metrics are not populated, TTFT is the wall time of a
generate with ``max_tokens=1`` and TPOT the rest of the long generate's wall time per token. With ``repeats`` > 1
each prompt runs that many times and each time is the median (on a shared CPU single runs vary by tens of
percent). RESULT is rewritten after every prompt, so a run stopped by its timeout keeps what it measured.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def measure(llm, prompt: str, output_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    wall = time.perf_counter() - start
    completion = out.outputs[0]
    n = len(completion.token_ids)
    row = dict(prompt_tokens=len(out.prompt_token_ids), output_tokens=n, generate_s=wall, text=completion.text,
               token_ids=list(completion.token_ids))
    metrics = out.metrics
    first, last = getattr(metrics, "first_token_ts", 0.0) or 0.0, getattr(metrics, "last_token_ts", 0.0) or 0.0
    scheduled = getattr(metrics, "scheduled_ts", 0.0) or getattr(metrics, "queued_ts", 0.0) or 0.0
    if first > 0 and scheduled > 0 and last >= first:
        row.update(timing_source="vllm request metrics (engine-core timestamps)", ttft_s=first - scheduled,
                   tpot_s=(last - first) / (n - 1) if n > 1 else None,
                   frontend_first_token_latency_s=getattr(metrics, "first_token_latency", None))
    else:
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        ttft = time.perf_counter() - start
        row.update(timing_source="wall time: generate(max_tokens=1), rest of generate(max_tokens=N)", ttft_s=ttft,
                   tpot_s=(wall - ttft) / (n - 1) if n > 1 else None)
    # Output tokens per second of the request: tokens over its latency (first token plus the rest).
    latency = row["ttft_s"] + (row["tpot_s"] or 0.0) * (n - 1)
    row["output_tokens_per_s"] = n / latency if latency > 0 else None
    row["decode_tokens_per_s"] = 1.0 / row["tpot_s"] if row["tpot_s"] else None
    return row


def measure_batch(llm, prompts: list[str], output_tokens: int) -> dict:
    """One generate of every prompt together: per-request TTFT and TPOT (their medians), and the batch's output tokens
    over the wall time."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft, tpot = [], []
    for out in outs:
        m, n = out.metrics, len(out.outputs[0].token_ids)
        first, last = getattr(m, "first_token_ts", 0.0) or 0.0, getattr(m, "last_token_ts", 0.0) or 0.0
        scheduled = getattr(m, "scheduled_ts", 0.0) or getattr(m, "queued_ts", 0.0) or 0.0
        if first > 0 and scheduled > 0 and last >= first:
            ttft.append(first - scheduled)
            if n > 1:
                tpot.append((last - first) / (n - 1))
    total = sum(len(out.outputs[0].token_ids) for out in outs)
    return dict(prompt_tokens=max(len(out.prompt_token_ids) for out in outs), output_tokens=total, generate_s=wall,
                text=[out.outputs[0].text for out in outs], token_ids=[list(out.outputs[0].token_ids) for out in outs],
                timing_source="vllm request metrics (engine-core timestamps); tok/s: batch wall time",
                ttft_s=statistics.median(ttft) if ttft else None, tpot_s=statistics.median(tpot) if tpot else None,
                output_tokens_per_s=total / wall if wall > 0 else None,
                decode_tokens_per_s=len(outs) / statistics.median(tpot) if tpot else None)


def median_row(samples: list[dict]) -> dict:
    """The first run's outputs with the median of each time over the runs (greedy outputs do not change), and
    every run's times."""
    row = dict(samples[0])
    for key in ("ttft_s", "tpot_s", "output_tokens_per_s", "decode_tokens_per_s", "generate_s"):
        values = sorted(s[key] for s in samples if s.get(key) is not None)
        row[key] = statistics.median(values) if values else None
        if len(samples) > 1:
            row[f"{key}_samples"] = [s.get(key) for s in samples]
    row["repeats"] = len(samples)
    row["same_tokens_every_repeat"] = all(s["token_ids"] == row["token_ids"] for s in samples)
    return row


def start_engine(config: dict):
    """The ``LLM`` of a worker CONFIG (``model``, ``engine_args``, ``attention_backend``, ``additional_config``) with
    per-request metrics on, and its start-up time in seconds."""
    from vllm import LLM

    kwargs = dict(config["engine_args"])
    if config.get("attention_backend"):
        kwargs["attention_backend"] = config["attention_backend"]
    if config.get("additional_config"):
        kwargs["additional_config"] = config["additional_config"]
    start = time.perf_counter()
    llm = LLM(config["model"], disable_log_stats=False, **kwargs)
    return llm, time.perf_counter() - start


def main(config_path: str, result_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    result_file = Path(result_path)
    result = {"status": "starting", "rows": []}
    write(result_file, result)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config["kvcache_space_gib"]))
    llm, seconds = start_engine(config)
    result.update(status="running", engine_start_s=seconds)
    write(result_file, result)
    try:
        measure(llm, config["warmup_prompt"], 4)  # first-call costs stay out of the first measurement
        for prompt in config["prompts"]:
            batch = prompt.get("prompts") or [prompt["prompt"]]
            if len(batch) > 1:
                samples = [measure_batch(llm, batch, config["output_tokens"]) for _ in range(config.get("repeats", 1))]
            else:
                samples = [measure(llm, prompt["prompt"], config["output_tokens"]) for _ in range(config.get("repeats", 1))]
            row = median_row(samples)
            if len(batch) > 1:
                row.update(context=prompt["context"], retrieved=[str(key) in text for key, text in
                                                                 zip(prompt["keys"], row["text"])])
            else:
                row.update(context=prompt["context"], retrieved=str(prompt["key"]) in row["text"])
            result["rows"].append(row)
            write(result_file, result)
            print(f"[{config['name']}] context {prompt['context']}: {row['prompt_tokens']} prompt tokens, "
                  f"TTFT {row['ttft_s']:.3f} s, TPOT {row['tpot_s'] or float('nan'):.4f} s", flush=True)
        result["status"] = "ok"
    finally:
        write(result_file, result)
        llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
