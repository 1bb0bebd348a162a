"""Retrieval suite on SmolLM2-135M (real weights): cases dense attention solves, run under every documented
configuration, with the density each one ran at.

    python -m bench.retrieval --out DIR [--configs dense,default,plan,...] [--cases bench/retrieval_cases.json]
                              [--limit N] [--max-tokens N] [--ids ID,ID] [--rebuild-pool] [--threads N]

writes ``DIR/retrieval.json`` and ``DIR/retrieval.md``.

**Cases.** A case is a needle (a secret number, a made-up magic word, or one access-code record among several
records of the same form) hidden at a depth of a haystack (repeated filler, licence prose held out from plan
calibration, Python standard-library source, or interleaved chunks of the three), 1k-7.5k tokens long, asked for at
the end; some cases hide two needles and ask for both (:mod:`sparse_attn.models.retrieval` builds the prompts). The
suite is the candidates of a seeded pool (:func:`candidate_pool`) that dense attention (transformers SDPA, greedy)
answers. ``--rebuild-pool`` runs dense over the whole pool and writes the cases it found, with their parameters,
question and answers (not the prompts), to ``--cases`` (the committed ``bench/retrieval_cases.json``), with the
pool's counts per kind; prompts are rebuilt from the parameters, and a run refuses cases whose rebuilt question or
answers differ from the file's (different haystack sources: the file records their hashes).

**Answers.** Greedy, 12 new tokens for one needle and 24 for two; a case is found when every expected string is in
the continuation, not run into other letters or digits (case-insensitive).

**Configurations** (``--configs``, default every transformers one):

- ``dense``: transformers' SDPA;
- ``default``: ``attn_implementation="sparse"`` as ``sparse_attn.configure(model)`` leaves it (the plan shipped for
  the model where one matches it, SmolLM2's included; ``dense_below`` 1024);
- ``no_plan``: ``sparse_attn.configure(model, auto_plan=False)``, the content-aware default pattern
  (:func:`sparse_attn.patterns.default_pattern`) on every layer;
- ``plan``: ``sparse_attn.configure(model, plan=PLAN)``, PLAN the shipped SmolLM2 plan or ``--plan FILE``;
- ``head_proxy``, ``vertical_slash``, ``a_shape``: the prefill patterns at their settings in :mod:`bench.methods`,
  64-token blocks, ``dense_below`` 0 (as :mod:`bench.accuracy` runs them);
- ``ds``: dense prefill, Double Sparsity decode (r=16, 1/8 of the context, channels from
  ``sparse_attn.calibrate_double_sparsity(model, tokenizer)``); ``ds_r32i8``: the same with r=32 channels
  whose labels are stored as int8 (the label bytes of r=16 in fp16); ``kvp50``, ``kvp70``: dense prefill, KV pruning at
  50% / 70% (the settings of :mod:`bench.accuracy_decode`);
- ``vllm_dense``, ``vllm_default``, ``vllm_no_plan``, ``vllm_plan``, ``vllm_kvp50``, ``vllm_kvp50_cached`` (only
  when named): the vLLM engine (one process per configuration, :mod:`bench.vllm_worker`): vLLM's own backend; our
  ``sparse`` backend without options, with ``{"auto_plan": false}``, with ``{"plan": SMOLLM2_PLAN}``, with dense
  attention over pages pruned to 50% (``kv_pruning.new_tokens`` "exact", then "cached"). The answer is judged on the
  same number of new tokens.

**Densities.** Prefill density: the mean over layers of ``SparseAttention.last_density`` after the prompt's
forward (the fraction of the causal block area read; 1.0 for a layer that ran dense). Decode read: the mean over
layers and decode steps of the same attribute after each one-token step (the fraction of the context a Double
Sparsity step read; 1.0 for a dense step; KV pruning reads every token, pruned). The vLLM rows take them from the
sparse backend's own counters after each request (``llm.collective_rpc("sparse_attn_stats")``: blocks / tokens read
over dense attention's, all layers and rows of the request, including the rows below ``dense_below``); vLLM's own
backend has none.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from sparse_attn.models import retrieval as R

from . import common, methods

NAME = "retrieval"
CASES_FILE = Path(__file__).with_name("retrieval_cases.json")
CASES_FORMAT = "sparse-attn-retrieval-cases"
MODEL = "SmolLM2-135M-Instruct"

#: The candidate pool: every (haystack, needle) kind pair gets PER_CELL candidates, lengths cycling over LENGTHS,
#: two needles in the TWO_NEEDLE_SLOTS-th candidates, depths drawn in 5% steps from 5% to 95%.
POOL_SEED = 20261203
LENGTHS = (1024, 1536, 2048, 3072, 4096, 5120, 6144, 7500)
PER_CELL = 13
TWO_NEEDLE_SLOTS = (2, 6, 10)
MAX_NEW_TOKENS = {1: 12, 2: 24}
#: Configurations that lose more dense answers than this are counted in the table, their cases left to the JSON.
MAX_LISTED_LOSSES = 12

HF_CONFIGS = ("dense", "default", "no_plan", "plan", "head_proxy", "vertical_slash", "a_shape", "ds", "ds_r32i8",
              "kvp50", "kvp70")
VLLM_CONFIGS = ("vllm_dense", "vllm_default", "vllm_no_plan", "vllm_plan", "vllm_kvp50", "vllm_kvp50_cached")
#: KV pruning in vLLM at 50%, dense attention (the e2e benchmark's ``kvp50``).
VLLM_KVP50 = {"prefill": "dense", "decode": "dense", "dense_below": 0, "kv_pruning": {"sparsity": 0.5}}
#: Prefill patterns run at their bench.methods setting, 64-token blocks, dense_below 0 (as bench.accuracy runs them).
PATTERN_CONFIGS = ("head_proxy", "vertical_slash", "a_shape")
#: Decode configurations -> bench.accuracy_decode method names (dense prefill).
DECODE_CONFIGS = {"ds": "ds_r16_1/8", "ds_r32i8": "ds_r32i8_1/8", "kvp50": "prune_50", "kvp70": "prune_70"}


# ---------------------------------------------------------------------------------------------------- the pool
def candidate_pool(seed: int = POOL_SEED) -> list[R.CaseSpec]:
    """The seeded candidate pool (:data:`PER_CELL` per haystack/needle pair, 156 in all)."""
    rng = random.Random(seed)
    steps = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95
    specs = []
    cells = [(h, n) for h in R.HAYSTACK_KINDS for n in R.NEEDLE_KINDS]
    for c, (haystack, needle) in enumerate(cells):
        for j in range(PER_CELL):
            tokens = LENGTHS[(j + c) % len(LENGTHS)]
            if j in TWO_NEEDLE_SLOTS:
                first = rng.choice([d for d in steps if d <= 0.6])
                depths = (first, rng.choice([d for d in steps if d >= first + 0.2]))
            else:
                depths = (rng.choice(steps),)
            index = len(specs)
            case_id = f"{index:03d}-{haystack}-{needle}-{tokens}-" + "-".join(f"d{round(100 * d):02d}" for d in depths)
            specs.append(R.CaseSpec(case_id, haystack, needle, tokens, depths, seed * 1000 + index))
    return specs


def case_record(prompt: R.Prompt) -> dict:
    """What the case file keeps of a built case: its parameters, the prompt's length, where the needles landed,
    the question and the expected answers."""
    return dict(prompt.spec.as_dict(), prompt_tokens=prompt.tokens,
                needle_depths=[round(d, 4) for d in prompt.depths], question=prompt.question,
                answers=list(prompt.answers), distractors=prompt.distractors, sources=list(prompt.sources))


def load_cases(path: Path | str = CASES_FILE) -> dict:
    data = common.read_json(path)
    if data.get("format") != CASES_FORMAT:
        raise ValueError(f"{path}: not a retrieval case list (format {data.get('format')!r})")
    return data


def select(cases: list[dict], *, ids: list[str] | None = None, max_tokens: int | None = None,
           limit: int | None = None) -> list[dict]:
    """The cases named by ``ids`` (all when None), at most ``max_tokens`` prompt tokens, the first ``limit``."""
    if ids:
        known = {c["id"] for c in cases}
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(f"unknown case ids {unknown}")
        cases = [c for c in cases if c["id"] in set(ids)]
    if max_tokens is not None:
        cases = [c for c in cases if c["prompt_tokens"] <= max_tokens]
    return cases[:limit] if limit is not None else cases


def fast_slice(cases: list[dict], count: int = 3, min_tokens: int = 1100, max_tokens: int = 1600) -> list[dict]:
    """A few short cases of different kinds: greedily, the shortest case adding a haystack kind and a needle kind
    not yet covered (then one adding either), among cases of ``min_tokens`` to ``max_tokens`` prompt tokens (above
    ``configure``'s ``dense_below`` of 1024, so the plan's prefill runs sparse)."""
    short = sorted((c for c in cases if min_tokens <= c["prompt_tokens"] <= max_tokens),
                   key=lambda c: (c["prompt_tokens"], c["id"]))
    chosen: list[dict] = []
    for need_both in (True, False):
        for case in short:
            if len(chosen) == count:
                return chosen
            hay = {c["haystack"] for c in chosen}
            needle = {c["needle"] for c in chosen}
            new_hay, new_needle = case["haystack"] not in hay, case["needle"] not in needle
            if case not in chosen and ((new_hay and new_needle) if need_both else (new_hay or new_needle)):
                chosen.append(case)
    return chosen


found = R.answered  # every answer in the continuation, case-insensitive, not run into other letters or digits


# ---------------------------------------------------------------------------------------------------- running
@torch.inference_mode()
def greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Reads:
    """Records, per layer, ``SparseAttention.last_density`` after the prompt's (multi-row) call and after every
    one-row decode call, while the context is entered."""

    def __init__(self, model):
        from sparse_attn.integrations.transformers import attention_modules

        self.modules = {i: m.sparse_attention for i, m in attention_modules(model).items()
                        if getattr(m, "sparse_attention", None) is not None}
        self.prefill: dict[int, float] = {}
        self.decode: list[float] = []
        self.hooks = []

    def __enter__(self):
        for i, attention in self.modules.items():
            def record(module, args, output, i=i):
                if args[0].shape[2] > 1:
                    self.prefill[i] = module.last_density
                else:
                    self.decode.append(module.last_density)
            self.hooks.append(attention.register_forward_hook(record))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    @property
    def prefill_density(self) -> float | None:
        return sum(self.prefill.values()) / len(self.prefill) if self.prefill else None

    @property
    def decode_read(self) -> float | None:
        return sum(self.decode) / len(self.decode) if self.decode else None


class Runner:
    """SmolLM2 with each transformers configuration in turn."""

    def __init__(self, model=None, tokenizer=None, plan: str | None = None):
        from sparse_attn.models import load_smollm2
        from sparse_attn.planner import SMOLLM2_PLAN

        self.plan = Path(plan) if plan else SMOLLM2_PLAN

        if model is None:
            model, tokenizer = load_smollm2()
        self.model, self.tokenizer = model, tokenizer
        self.sources = R.Sources(tokenizer)
        self._decode_methods = None
        self.calibration_s = None

    def describe(self, name: str) -> str:
        if name == "dense":
            return "transformers sdpa"
        if name == "default":
            return "sparse_attn.configure(model) (the shipped plan where one matches the model), dense_below 1024"
        if name == "no_plan":
            return "sparse_attn.configure(model, auto_plan=False): default_pattern(), dense_below 1024"
        if name == "plan":
            return f"sparse_attn.configure(model, plan={self.plan.name})"
        if name in PATTERN_CONFIGS:
            return f"{methods.PREFILL_METHODS[name].label}, 64-token blocks, dense_below 0"
        if name in DECODE_CONFIGS:
            return f"dense prefill, decode {DECODE_CONFIGS[name]} (bench.accuracy_decode)"
        raise ValueError(f"unknown configuration {name!r}")

    def decode_methods(self) -> dict:
        if self._decode_methods is None:
            import sparse_attn
            from . import accuracy_decode

            self.model.set_attn_implementation("sdpa")
            start = time.perf_counter()
            channels = sparse_attn.calibrate_double_sparsity(self.model, self.tokenizer, r=16, tokens=2048)
            channels32 = sparse_attn.calibrate_double_sparsity(self.model, self.tokenizer, r=32, tokens=2048)
            self.calibration_s = time.perf_counter() - start
            self._decode_methods = accuracy_decode.methods(channels, channels32)
        return self._decode_methods

    def use(self, name: str) -> None:
        import sparse_attn

        model = self.model
        if name == "dense":
            model.set_attn_implementation("sdpa")
        elif name == "default":
            sparse_attn.configure(model)
        elif name == "no_plan":
            sparse_attn.configure(model, auto_plan=False)
        elif name == "plan":
            sparse_attn.configure(model, plan=self.plan)
        elif name in PATTERN_CONFIGS:
            sparse_attn.configure(model, methods.PREFILL_METHODS[name].build(), q_block_size=64, kv_block_size=64,
                                  dense_below=0)
        elif name in DECODE_CONFIGS:
            from . import accuracy_decode

            accuracy_decode.use(model, self.decode_methods()[DECODE_CONFIGS[name]])
        else:
            raise ValueError(f"unknown configuration {name!r}")

    def prompt(self, case: dict) -> R.Prompt:
        prompt = R.build_prompt(self.tokenizer, R.CaseSpec.from_dict(case), self.sources)
        if "answers" in case and (list(prompt.answers) != case["answers"] or prompt.question != case["question"]):
            raise ValueError(f"case {case['id']}: the rebuilt prompt asks {prompt.question!r} for {prompt.answers}, "
                             f"the case list says {case['question']!r} for {case['answers']}: the haystack sources "
                             "differ from the ones the list was built with")
        return prompt

    def run_case(self, name: str, case: dict, prompt: R.Prompt | None = None) -> dict:
        import sparse_attn

        prompt = prompt or self.prompt(case)
        max_new = MAX_NEW_TOKENS[len(prompt.answers)]
        start = time.perf_counter()
        if name == "dense":
            text, prefill, decode = greedy(self.model, self.tokenizer, prompt.text, max_new), 1.0, 1.0
        else:
            with Reads(self.model) as reads:
                text = greedy(self.model, self.tokenizer, prompt.text, max_new)
            prefill, decode = reads.prefill_density, reads.decode_read
            sparse_attn.reset_decode_state(self.model)
        return dict(config=name, id=case["id"], haystack=prompt.spec.haystack, needle=prompt.spec.needle,
                    needles=len(prompt.answers), tokens=prompt.tokens, depths=list(prompt.spec.depths),
                    answers=list(prompt.answers), continuation=text, found=found(prompt.answers, text),
                    prefill_density=prefill, decode_read=decode, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- pool build
def pool_counts(rows: list[dict], key) -> dict:
    total, solved = Counter(), Counter()
    for row in rows:
        total[key(row)] += 1
        solved[key(row)] += row["found"]
    return {str(k): {"candidates": total[k], "dense_solved": solved[k]} for k in sorted(total, key=str)}


def build_pool(runner: Runner, path: Path, seed: int = POOL_SEED, log=print,
               specs: list[R.CaseSpec] | None = None) -> tuple[dict, list[dict]]:
    """Run dense over the whole candidate pool (or ``specs``) and write the solved cases to ``path``: (case list,
    dense rows)."""
    specs = candidate_pool(seed) if specs is None else specs
    built = common.environment(torch.device("cpu"))  # the commit the build starts from
    runner.use("dense")
    records, rows, rejected = [], [], []
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        prompt = R.build_prompt(runner.tokenizer, spec, runner.sources)
        record = case_record(prompt)
        row = runner.run_case("dense", record, prompt)
        rows.append(row)
        if row["found"]:
            records.append(dict(record, dense_continuation=row["continuation"]))
        else:
            rejected.append(dict(id=spec.id, prompt_tokens=prompt.tokens, answers=list(prompt.answers),
                                 dense_continuation=row["continuation"]))
        log(f"[pool {i + 1}/{len(specs)}] {spec.id}: {prompt.tokens} tokens, "
            f"{'solved' if row['found'] else 'missed'} ({row['seconds']:.1f} s) {row['continuation']!r}")
    seconds = time.perf_counter() - start
    data = {
        "format": CASES_FORMAT, "version": 1, "model": MODEL,
        "description": "Retrieval cases SmolLM2-135M-Instruct answers with dense attention (transformers SDPA, "
                       "fp32, greedy); prompts are rebuilt from each case's parameters by "
                       "sparse_attn.models.retrieval.build_prompt. Generated by python -m bench.retrieval "
                       "--rebuild-pool.",
        "generator": {"seed": seed, "lengths": list(LENGTHS), "per_cell": PER_CELL,
                      "two_needle_slots": list(TWO_NEEDLE_SLOTS), "max_new_tokens": MAX_NEW_TOKENS,
                      "kv_distractors": list(R.KV_DISTRACTORS), "licence_files": list(R.LICENCE_FILES),
                      "stdlib_files": list(R.STDLIB_FILES)},
        "sources": R.source_fingerprints(),
        "built": {**built, "seconds": round(seconds, 1)},
        "pool": {"candidates": len(rows), "dense_solved": len(records),
                 "by_haystack": pool_counts(rows, lambda r: r["haystack"]),
                 "by_needle": pool_counts(rows, lambda r: r["needle"]),
                 "by_kind": pool_counts(rows, lambda r: f"{r['haystack']}/{r['needle']}"),
                 "by_needles": pool_counts(rows, lambda r: r["needles"]),
                 "by_length": pool_counts(rows, lambda r: int(r["id"].split("-")[3])),
                 "missed": rejected},
        "cases": records,
    }
    common.write_json(path, data)
    return data, rows


# ---------------------------------------------------------------------------------------------------- vLLM
def vllm_configs(names: list[str], plan: str | None = None) -> list[dict]:
    from sparse_attn.planner import SMOLLM2_PLAN

    plan = Path(plan) if plan else SMOLLM2_PLAN
    native = "FLASH_ATTN" if torch.cuda.is_available() else "CPU_ATTN"
    table = {
        "vllm_dense": dict(attention_backend=native, additional_config=None, pattern=f"vLLM {native}"),
        "vllm_default": dict(attention_backend="sparse", additional_config=None, pattern="sparse backend, no options"),
        "vllm_no_plan": dict(attention_backend="sparse", additional_config={"sparse_attn": {"auto_plan": False}},
                             pattern="sparse backend, auto_plan false"),
        "vllm_plan": dict(attention_backend="sparse", additional_config={"sparse_attn": {"plan": str(plan)}},
                          pattern=f"sparse backend, plan {plan.name}"),
        "vllm_kvp50": dict(attention_backend="sparse", additional_config={"sparse_attn": VLLM_KVP50},
                           pattern="sparse backend, dense attention, KV pruning 50% (new tokens exact)"),
        "vllm_kvp50_cached": dict(attention_backend="sparse", additional_config={"sparse_attn": {
            **VLLM_KVP50, "kv_pruning": {"sparsity": 0.5, "new_tokens": "cached"}}},
            pattern="sparse backend, dense attention, KV pruning 50% (new tokens as cached)"),
    }
    return [dict(name=n, **table[n]) for n in names]


#: Run by path in the engine's process (outside the checkout, like bench/vllm_worker.py, which it loads by path):
#: bench.vllm_worker with each measured generate followed by the sparse backend's per-phase densities since the
#: previous one (``collective_rpc("sparse_attn_stats", reset=True)``; vLLM's own backend has none).
STATS_WORKER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("vllm_worker", {worker!r})
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
measure = worker.measure

def measure_with_stats(llm, prompt, output_tokens):
    row = measure(llm, prompt, output_tokens)
    try:
        ranks = llm.collective_rpc("sparse_attn_stats", kwargs={{"reset": True}})
        row["sparse_attn_stats"] = [{{phase: rank[phase] for phase in ("prefill", "decode")}} for rank in ranks]
    except Exception as error:  # vLLM's own backend: no such method
        row["sparse_attn_stats"] = repr(error)
    return row

worker.measure = measure_with_stats
if __name__ == "__main__":
    raise SystemExit(worker.main(*sys.argv[1:4]))
"""


def _vllm_density(row: dict, phase: str) -> float | None:
    stats = row.get("sparse_attn_stats")
    if not isinstance(stats, list) or not stats:
        return None
    values = [rank[phase]["density"] for rank in stats if rank[phase]["density"] is not None]
    return sum(values) / len(values) if values else None


def run_vllm(names: list[str], cases: list[dict], prompts: dict[str, R.Prompt], tokenizer, out_dir: Path,
             timeout_s: float, log=print, plan: str | None = None) -> tuple[list[dict], dict]:
    """Each vLLM configuration over the cases in one engine process (bench.vllm_worker): rows, and per
    configuration its status."""
    import tempfile
    from unittest import mock

    from . import e2e_vllm

    reason = e2e_vllm.vllm_missing()
    status, rows = {}, []
    if reason:
        return rows, {name: {"status": "skipped", "reason": reason} for name in names}
    model_dir = e2e_vllm.model_folder()
    output_tokens = max(MAX_NEW_TOKENS.values())
    made = [dict(context=c["id"], key=c["answers"][0], keys=[c["answers"][0]], prompt=prompts[c["id"]].text,
                 prompts=[prompts[c["id"]].text], tokens=prompts[c["id"]].tokens) for c in cases]
    settings = SimpleNamespace(output_tokens=output_tokens, kvcache_space_gib=1, repeats=1, batch=1,
                               schedule="sequential", timeout_s=timeout_s)
    for config in vllm_configs(names, plan):
        log(f"[{config['name']}] starting the engine over {len(made)} prompts")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
            worker = Path(tmp) / "retrieval_vllm_worker.py"
            worker.write_text(STATS_WORKER.format(worker=str(e2e_vllm.WORKER)))
            with mock.patch.object(e2e_vllm, "WORKER", worker):
                samples = e2e_vllm.measure_all([config], model_dir, made, "Hello, the pass key is 11111.", settings,
                                               out_dir / f"{NAME}_logs", None)
        status[config["name"]] = dict({k: config.get(k) for k in ("status", "reason", "engine_start_s", "log")},
                                      seconds=time.monotonic() - start)
        measured = {made[i]["context"]: taken[0] for i, taken in samples.get(config["name"], {}).items() if taken}
        for case in cases:
            prompt, got = prompts[case["id"]], measured.get(case["id"])
            if got is None:
                continue
            max_new = MAX_NEW_TOKENS[len(prompt.answers)]
            text = tokenizer.decode(got["token_ids"][:max_new], skip_special_tokens=True)
            rows.append(dict(config=config["name"], id=case["id"], haystack=prompt.spec.haystack,
                             needle=prompt.spec.needle, needles=len(prompt.answers), tokens=prompt.tokens,
                             depths=list(prompt.spec.depths), answers=list(prompt.answers), continuation=text,
                             found=found(prompt.answers, text), prefill_density=_vllm_density(got, "prefill"),
                             decode_read=_vllm_density(got, "decode"), seconds=got.get("generate_s")))
    return rows, status


# ---------------------------------------------------------------------------------------------------- results
def summarize(rows: list[dict], configs: list[str], cases: list[dict]) -> dict:
    """Per configuration: found, the dense-found count it is compared with, the dense cases it loses, its mean
    prefill density and decode read, and found / dense-found per haystack kind, needle kind and length."""
    dense_rows = {r["id"]: r for r in rows if r["config"] == "dense"}
    if dense_rows:
        dense_found, basis = {i for i, r in dense_rows.items() if r["found"]}, "this run"
    else:
        dense_found, basis = {c["id"] for c in cases}, "the case list"
    vllm_dense = {r["id"] for r in rows if r["config"] == "vllm_dense" and r["found"]}
    by_case = {c["id"]: c for c in cases}
    out = {}
    for name in configs:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        reference = vllm_dense if name.startswith("vllm_") and name != "vllm_dense" and vllm_dense else dense_found
        ids = {r["id"] for r in mine}
        hits = {r["id"] for r in mine if r["found"]}

        def split(key):
            groups: dict = {}
            for r in mine:
                g = groups.setdefault(str(key(r)), {"found": 0, "dense_found": 0, "cases": 0})
                g["cases"] += 1
                g["found"] += r["found"]
                g["dense_found"] += r["id"] in reference
            return groups

        prefill = [r["prefill_density"] for r in mine if r["prefill_density"] is not None]
        decode = [r["decode_read"] for r in mine if r["decode_read"] is not None]
        out[name] = dict(
            cases=len(mine), found=len(hits), dense_found=len(reference & ids),
            reference="vllm_dense" if reference is vllm_dense and reference is not dense_found else f"dense ({basis})",
            lost=sorted((reference & ids) - hits), gained=sorted(hits - reference),
            kept_every_dense=not ((reference & ids) - hits),
            prefill_density=sum(prefill) / len(prefill) if prefill else None,
            decode_read=sum(decode) / len(decode) if decode else None,
            by_haystack=split(lambda r: r["haystack"]), by_needle=split(lambda r: r["needle"]),
            by_length=split(lambda r: _bucket(by_case.get(r["id"], {}).get("tokens", r["tokens"]))),
            by_needles=split(lambda r: r["needles"]),
            seconds=sum(r["seconds"] or 0 for r in mine))
    return out


def density_by_length(rows: list[dict], config: str) -> dict[str, float]:
    """Mean prefill density of ``config``'s rows per target length (the case id's fourth field), shortest first,
    keyed "1k", "1.5k", ..., "7.5k": the density a setting reads changes with the context, so the mean over the
    suite hides the long cases'."""
    groups: dict[int, list[float]] = {}
    for r in rows:
        if r["config"] == config and r["prefill_density"] is not None:
            groups.setdefault(int(r["id"].split("-")[3]), []).append(r["prefill_density"])
    return {f"{t / 1024:g}k" if t % 512 == 0 else f"{t / 1000:g}k": sum(v) / len(v) for t, v in sorted(groups.items())}


def _bucket(tokens: int) -> str:
    """Length group of a case's target length."""
    return "1-2k" if tokens <= 2048 else "3-4k" if tokens <= 4096 else "5-7.5k"


def composition(cases: list[dict]) -> dict:
    def count(key):
        return dict(sorted(Counter(str(key(c)) for c in cases).items()))
    depths = [d for c in cases for d in c["depths"]]
    return {"cases": len(cases), "by_haystack": count(lambda c: c["haystack"]),
            "by_needle": count(lambda c: c["needle"]), "by_needles": count(lambda c: len(c["depths"])),
            "by_length": count(lambda c: _bucket(c["tokens"])),
            "prompt_tokens": [min((c["prompt_tokens"] for c in cases), default=None),
                              max((c["prompt_tokens"] for c in cases), default=None)],
            "depths": [min(depths, default=None), max(depths, default=None)]}


@dataclass
class Settings:
    configs: list[str] = field(default_factory=lambda: list(HF_CONFIGS))
    cases: str = str(CASES_FILE)
    limit: int | None = None
    max_tokens: int | None = None
    ids: list[str] | None = None
    rebuild_pool: bool = False
    seed: int = POOL_SEED
    vllm_timeout_s: float = 7200.0  # per engine start and per request
    plan: str | None = None  # the plan file of ``plan`` and ``vllm_plan`` (None: the shipped SmolLM2 plan)

    def __post_init__(self):
        if self.plan is not None:
            from sparse_attn.planner import load_plan

            self.plan = str(Path(self.plan).resolve())
            load_plan(self.plan)  # a bad file fails here, before any case runs
        unknown = sorted(set(self.configs) - set(HF_CONFIGS) - set(VLLM_CONFIGS))
        if unknown or not self.configs:
            raise ValueError(f"configs: unknown {unknown or 'empty list'}; known: {list(HF_CONFIGS + VLLM_CONFIGS)}")


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None, model=None, tokenizer=None,
        log=print) -> dict:
    out_dir = Path(out_dir) if out_dir is not None else None
    runner = Runner(model, tokenizer, settings.plan)
    rows: list[dict] = []
    pool_rows: dict[str, dict] = {}
    if settings.rebuild_pool:
        data, dense_rows = build_pool(runner, Path(settings.cases), settings.seed, log)
        pool_rows = {r["id"]: r for r in dense_rows}
    else:
        data = load_cases(settings.cases)
    fingerprints = R.source_fingerprints()
    mismatch = sorted(k for k in set(fingerprints) | set(data["sources"])
                      if fingerprints.get(k) != data["sources"].get(k))
    cases = select(data["cases"], ids=settings.ids, max_tokens=settings.max_tokens, limit=settings.limit)
    prompts = {c["id"]: runner.prompt(c) for c in cases}
    hf = [c for c in settings.configs if c in HF_CONFIGS]
    vllm = [c for c in settings.configs if c in VLLM_CONFIGS]
    payload = {"benchmark": NAME, **common.environment(torch.device("cpu"), command), "model": MODEL,
               "settings": dict(asdict(settings), max_new_tokens=MAX_NEW_TOKENS),
               "configs": {}, "suite": {"file": settings.cases, "all_cases": len(data["cases"]),
                                        "composition": composition(cases), "pool": data["pool"],
                                        "sources_differ": mismatch}}

    def write():
        payload["results"] = rows
        payload["summary"] = summarize(rows, settings.configs, cases)
        if out_dir is not None:
            common.write_outputs(out_dir, NAME, payload, markdown(payload))

    for name in hf:
        payload["configs"][name] = {"setting": runner.describe(name)}
        if name == "dense" and pool_rows:  # the pool build's dense runs are this configuration's rows
            rows += [dict(pool_rows[c["id"]], id=c["id"]) for c in cases]
            write()
            continue
        runner.use(name)
        if name in DECODE_CONFIGS and runner.calibration_s is not None:
            payload["settings"]["ds_calibration_s"] = runner.calibration_s
        for i, case in enumerate(cases):
            row = runner.run_case(name, case, prompts[case["id"]])
            rows.append(row)
            log(f"[{name} {i + 1}/{len(cases)}] {case['id']}: {'found' if row['found'] else 'MISSED'} "
                f"(prefill density {common.fmt(row['prefill_density'])}, decode read {common.fmt(row['decode_read'])},"
                f" {row['seconds']:.1f} s) {row['continuation']!r}")
        write()
    if vllm:
        vrows, status = run_vllm(vllm, cases, prompts, runner.tokenizer, out_dir or Path("."),
                                 settings.vllm_timeout_s, log, settings.plan)
        rows += vrows
        for config in vllm_configs(vllm, settings.plan):
            payload["configs"][config["name"]] = dict(setting=config["pattern"], **status[config["name"]])
    write()
    return payload


def markdown(payload: dict) -> str:
    suite, summary = payload["suite"], payload.get("summary", {})
    comp, pool = suite["composition"], suite["pool"]
    lines = [f"### Retrieval suite on {payload['model']}: cases dense attention solves, per configuration", "",
             common.environment_line(payload), "",
             f"{comp['cases']} of the {suite['all_cases']} cases of `{Path(suite['file']).name}` (pool: "
             f"{pool['dense_solved']} of {pool['candidates']} candidates solved by dense). Haystacks: "
             + ", ".join(f"{k} {v}" for k, v in comp["by_haystack"].items()) + "; needles: "
             + ", ".join(f"{k} {v}" for k, v in comp["by_needle"].items()) + "; "
             + ", ".join(f"{v} with {k} needle{'s' if k != '1' else ''}" for k, v in comp["by_needles"].items())
             + f"; {comp['prompt_tokens'][0]}-{comp['prompt_tokens'][1]} tokens.", "",
             "Found: every expected string in the greedy continuation. Prefill density: mean over layers (and cases) of the "
             "fraction of the causal block area read; decode read: mean fraction of the context read per decode "
             "step (1.0 dense).", ""]
    if suite.get("sources_differ"):
        lines += [f"Haystack sources differ from the case list's: {', '.join(suite['sources_differ'])}.", ""]
    if payload.get("merged_from"):  # joined runs: the machine and commit of each configuration's run
        runs = [f"{', '.join(run['settings'].get('configs', []))} on {run['device']['name']} (commit "
                f"`{((run.get('commit') or {}).get('sha') or 'unknown')[:10]}`)" for run in payload["merged_from"]]
        lines += ["Runs joined: " + "; ".join(runs) + ".", ""]
    table = []
    for name, s in summary.items():
        by_length = density_by_length(payload["results"], name)
        table.append([name, payload["configs"].get(name, {}).get("setting", ""),
                      f"{s['found']} / {s['dense_found']}",
                      "yes" if s["kept_every_dense"] else f"no ({len(s['lost'])} lost)",
                      common.pct(s["prefill_density"]),
                      "100% at every length" if by_length and all(v == 1.0 for v in by_length.values())
                      else " ".join(f"{k} {common.pct(v, 0)}" for k, v in by_length.items()),
                      common.pct(s["decode_read"]),
                      " ".join(f"{k} {v['found']}/{v['dense_found']}" for k, v in s["by_haystack"].items()),
                      " ".join(f"{k} {v['found']}/{v['dense_found']}" for k, v in s["by_needle"].items()),
                      " ".join(f"{k} {v['found']}/{v['dense_found']}" for k, v in s["by_length"].items())])
    lines.append(common.markdown_table(["config", "setting", "found / dense-found", "keeps every dense answer",
                                        "prefill density", "prefill density by length", "decode read",
                                        "by haystack", "by needle", "by length"],
                                       table))
    lost = [(name, s["lost"]) for name, s in summary.items() if 0 < len(s["lost"]) <= MAX_LISTED_LOSSES]
    many = [f"{name} ({len(s['lost'])})" for name, s in summary.items() if len(s["lost"]) > MAX_LISTED_LOSSES]
    if lost:
        rows = {(r["config"], r["id"]): r for r in payload["results"]}
        lines += ["", "Dense answers lost" + (f" (not listed, see the JSON: {', '.join(many)})" if many else "")
                  + ":", ""]
        table = []
        for name, ids in lost:
            for case_id in ids:
                r = rows[(name, case_id)]
                table.append([name, case_id, r["tokens"], "/".join(f"{d:.0%}" for d in r["depths"]),
                              ", ".join(r["answers"]), f"`{' '.join(r['continuation'].split())[:40]}`",
                              common.pct(r["prefill_density"], 0)])
        lines.append(common.markdown_table(["config", "case", "tokens", "depth", "expected", "answer",
                                            "prefill density"], table))
    return "\n".join(lines)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--configs", default=",".join(HF_CONFIGS),
                        help=f"comma-separated, of {', '.join(HF_CONFIGS + VLLM_CONFIGS)}")
    parser.add_argument("--cases", default=str(CASES_FILE), help="case list (written by --rebuild-pool)")
    parser.add_argument("--limit", type=int, help="the first N cases (after --ids and --max-tokens)")
    parser.add_argument("--max-tokens", type=int, help="only cases of at most this many prompt tokens")
    parser.add_argument("--ids", help="comma-separated case ids")
    parser.add_argument("--rebuild-pool", action="store_true",
                        help="run dense over the whole candidate pool first and write the solved cases to --cases")
    parser.add_argument("--seed", type=int, default=POOL_SEED, help="pool seed (with --rebuild-pool)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--plan", help="plan file for the plan and vllm_plan configurations (default: the shipped "
                                       "SmolLM2 plan)")
    parser.add_argument("--vllm-timeout", type=float, default=7200.0,
                        help="seconds per vLLM engine start and per request")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(configs=[c for c in args.configs.split(",") if c], cases=args.cases, limit=args.limit,
                        max_tokens=args.max_tokens, ids=[i for i in (args.ids or "").split(",") if i] or None,
                        rebuild_pool=args.rebuild_pool, seed=args.seed, vllm_timeout_s=args.vllm_timeout,
                        plan=args.plan)
    return settings, args.out


def merge(paths: list[Path | str], out_dir: Path | str, command: str | None = None,
          only: list[str] | None = None) -> dict:
    """One result from runs of the suite split over processes or machines (each a ``retrieval.json`` of other
    configurations on the same case list): rows and configurations joined (``only``: just these configurations),
    the summary computed again, and every source run's command, commit and settings kept under ``merged_from``."""
    sources = [common.read_json(Path(p)) for p in paths]
    if not sources:
        raise ValueError("merge needs at least one retrieval.json")
    for path, source in zip(paths, sources):
        if source.get("benchmark") != NAME:
            raise ValueError(f"{path}: not a {NAME} result (benchmark {source.get('benchmark')!r})")
        if source["suite"]["pool"] != sources[0]["suite"]["pool"]:
            raise ValueError(f"{path}: another case list than {paths[0]}")
    configs: dict = {}
    rows: list[dict] = []
    for path, source in zip(paths, sources):
        names = [n for n in source["configs"] if only is None or n in only]
        clash = sorted(set(configs) & set(names))
        if clash:
            raise ValueError(f"{path}: configurations {clash} also in an earlier file")
        configs.update({n: source["configs"][n] for n in names})
        rows += [r for r in source["results"] if r["config"] in names]
    if not rows:
        raise ValueError(f"no rows of {only} in {[str(p) for p in paths]}")
    ids = {r["id"] for r in rows}
    # The run recorded the case list of the checkout it ran from; where that checkout is gone, this one's list.
    recorded = Path(sources[0]["settings"]["cases"])
    cases = [c for c in load_cases(recorded if recorded.exists() else CASES_FILE)["cases"] if c["id"] in ids]
    missing = sorted(ids - {c["id"] for c in cases})
    if missing:
        raise ValueError(f"cases {missing[:5]} of the results are not in the case list {recorded}")
    runs = [run for s in sources  # each source run (an earlier merge: its runs) holding a kept configuration
            for run in (s.get("merged_from") or [{k: s.get(k) for k in ("command", "commit", "timestamp", "device",
                                                                         "settings")}])
            if set(run["settings"].get("configs", [])) & set(configs)]
    payload = {"benchmark": NAME, **common.environment(torch.device("cpu"), command), "model": sources[0]["model"],
               "settings": dict(sources[0]["settings"], configs=list(configs)), "configs": configs,
               "suite": dict(sources[0]["suite"], composition=composition(cases)),
               "merged_from": runs,
               "results": rows, "summary": summarize(rows, list(configs), cases)}
    common.write_outputs(Path(out_dir), NAME, payload, markdown(payload))
    return payload


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # python -m bench.retrieval merge --out DIR A/retrieval.json B/retrieval.json ...
        parser = argparse.ArgumentParser(prog="python -m bench.retrieval merge", description=merge.__doc__)
        parser.add_argument("--out", required=True, type=Path)
        parser.add_argument("--configs", help="comma-separated configurations to keep (default: all)")
        parser.add_argument("results", nargs="+", type=Path)
        args = parser.parse_args(argv[1:])
        only = [c for c in args.configs.split(",") if c] if args.configs else None
        payload = merge(args.results, args.out, common.command_line(f"bench.{NAME}", argv), only)
        print(markdown(payload))
        return 0
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
