"""One vLLM engine configuration in a process of its own, serving the measurements :mod:`bench.e2e_vllm` asks for.

    python -c "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \\
        bench/vllm_worker.py CONFIG.json COMMAND_FD REPLY_FD

Run by path from a folder outside the checkout: vLLM imports any top-level module named ``triton_kernels``, and the
checkout has a folder of that name, so the repository root must not be on ``sys.path`` (this file therefore imports
nothing from ``bench``). vLLM's CPU engine spawns processes: everything runs under the ``__main__`` guard.

CONFIG holds the model folder, the attention backend and its ``additional_config``, the engine arguments, the
prompts and the number of output tokens. The worker starts the engine, runs a short warm-up generate (first-call
costs stay out of the measurements) and replies ``{"event": "ready", "engine_start_s": ...}`` on REPLY_FD; then, for
each command ``{"prompt": i}`` read from COMMAND_FD (one JSON object per line), it runs prompt i once and replies
``{"event": "row", "row": ...}``, until ``{"cmd": "stop"}`` or the pipe closes. A failure replies ``{"event":
"error", "reason": ...}`` (the traceback goes to the log). So the driver decides the order of the measurements: with
several workers up at once it can interleave them, one request per engine per round.

One measurement is one greedy generate of ``output_tokens`` tokens (``ignore_eos``); vLLM's per-request metrics
(``disable_log_stats=False``; engine-core timestamps) give the time to first token (first token - scheduled) and the
time per output token ((last token - first token) / (tokens - 1)). Where the metrics are not populated, TTFT is the
wall time of a generate with ``max_tokens=1`` and TPOT the rest of the long generate's wall time per token. A
prompt with a batch of prompts is served as one generate (:func:`measure_batch`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


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


def reply(fd: int, message: dict) -> None:
    """One JSON line to the driver (a single write: the driver reads whole lines)."""
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def requests(fd: int):
    """The driver's commands, one JSON object per line, until the pipe closes."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        buffer = b""
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield json.loads(line)


def main(config_path: str, command_fd: str, reply_fd: str) -> int:
    config = json.loads(Path(config_path).read_text())
    out = int(reply_fd)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config["kvcache_space_gib"]))
    try:
        llm, seconds = start_engine(config)
    except BaseException as error:  # the driver records why; the log holds the traceback
        reply(out, {"event": "error", "reason": f"engine start failed: {type(error).__name__}: {error}"})
        raise
    try:
        measure(llm, config["warmup_prompt"], 4)  # first-call costs stay out of the first measurement
        reply(out, {"event": "ready", "engine_start_s": seconds})
        for command in requests(int(command_fd)):
            if command.get("cmd") == "stop":
                break
            prompt = config["prompts"][command["prompt"]]
            batch = prompt.get("prompts") or [prompt["prompt"]]
            if len(batch) > 1:
                row = measure_batch(llm, batch, config["output_tokens"])
                row["retrieved"] = [str(key) in text for key, text in zip(prompt["keys"], row["text"])]
            else:
                row = measure(llm, prompt["prompt"], config["output_tokens"])
                row["retrieved"] = str(prompt["key"]) in row["text"]
            row["context"] = prompt["context"]
            print(f"[{config['name']}] context {prompt['context']}: {row['prompt_tokens']} prompt tokens, "
                  f"TTFT {row['ttft_s']:.3f} s, TPOT {row['tpot_s'] or float('nan'):.4f} s", flush=True)
            reply(out, {"event": "row", "row": row})
    except BaseException as error:
        reply(out, {"event": "error", "reason": f"{type(error).__name__}: {error}"})
        raise
    finally:
        llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
