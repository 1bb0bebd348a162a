"""``python -m bench``: one command line over every benchmark and evaluation, writing JSON, markdown and PNG plots.

    python -m bench <part> --out DIR [options of that part]     # one part (options: python -m bench <part> -h)
    python -m bench kernels --out DIR [--quick]                  # prefill + decode + estimation
    python -m bench all --out DIR [--quick] [--skip a,b] [--only a,b] [--<part>-args "..."]
    python -m bench report DIR [--readme README.md]              # re-render tables and plots from DIR's JSON

Every command takes ``--threads N`` (torch CPU threads; on a CPU shared with other work, 1 thread avoids the
OpenMP slowdown of threads waiting on each other).
Parts: prefill, decode, estimation (kernel level); e2e-hf (transformers TTFT, GPU only: skipped with the reason
elsewhere), e2e-vllm (the vLLM engine on SmolLM2), memory (KV bytes), accuracy (SmolLM2 prefill methods; it also
runs accuracy-decode), accuracy-decode, retrieval (the retrieval suite: cases dense attention solves, per
configuration), reliability (prefix caching, preemption and the OpenAI server under load: answers that must not
change); suite (the GPU suite, bench.gpu_suite). Each part is its module's own
``main`` (``python -m bench.<module>`` runs the same code); this command adds the plots and, for ``kernels`` and
``all``, a summary (``DIR/run.json``, ``DIR/run.md``: what ran, how long, where the files are, every table).
Sizes default to the machine: tiny or moderate on a CPU, the METHODS.md sizes on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

import torch

from . import common

NAME = "run"

#: command name -> module of the part
PARTS = {
    "prefill": "prefill", "decode": "decode", "estimation": "estimation", "e2e-hf": "e2e_hf",
    "e2e-hf-smollm2": "e2e_hf_smollm2",
    "e2e-vllm": "e2e_vllm", "memory": "memory", "accuracy": "accuracy", "accuracy-decode": "accuracy_decode",
    "retrieval": "retrieval", "reliability": "reliability", "suite": "gpu_suite",
}
KERNELS = ("prefill", "decode", "estimation")
#: What ``all`` runs, in order (accuracy includes accuracy-decode).
ALL = ("prefill", "decode", "estimation", "memory", "e2e-hf", "e2e-hf-smollm2", "e2e-vllm", "accuracy", "retrieval",
       "reliability")
#: Options ``--quick`` adds per part: fewer timed calls, and the smallest sizes where a part has no such flag.
QUICK = {
    "prefill": ["--quick"], "decode": ["--quick"], "estimation": ["--quick"], "e2e-hf": ["--quick"],
    "e2e-hf-smollm2": ["--quick"],
    "memory": ["--contexts", "4096"],
    "e2e-vllm": ["--contexts", "1024", "--output-tokens", "16"],
    "accuracy": ["--lengths", "2048", "--ppl-len", "2048", "--recall-len", "2048", "--decode-ppl-len", "512",
                 "--decode-ppl-decode", "32"],
    "retrieval": ["--max-tokens", "2100", "--limit", "6", "--configs", "dense,default,no_plan"],
    "reliability": ["--quick"],
}


def module(part: str):
    return importlib.import_module(f"bench.{PARTS[part]}")


def run_part(part: str, out: Path, extra: list[str]) -> dict:
    """Run one part into ``out`` (its module's main), then plot what it wrote; the part's record."""
    from . import plots

    start = time.monotonic()
    mod = module(part)
    argv = ["--out", str(out), *extra]
    record = {"name": part, "command": common.command_line(f"bench.{PARTS[part]}", argv)}
    before = {p: p.stat().st_mtime for p in out.glob("*.json")}
    try:
        code = mod.main(argv)
        record["status"] = "ok" if code in (0, None) else "error"
        if record["status"] == "error":
            record["reason"] = f"exit status {code}"
    except SystemExit as exc:  # argparse errors
        record.update(status="error", reason=f"exit status {exc.code}")
    except Exception as exc:  # one failing part must not stop the others
        record.update(status="error", reason=common.error_reason(exc, 2000))
    written = sorted(p for p in out.glob("*.json") if p.name != f"{NAME}.json" and before.get(p) != p.stat().st_mtime)
    for path in written:
        payload = common.read_json(path)
        if payload.get("status") == "skipped" and record["status"] == "ok":
            record.update(status="skipped", reason=payload.get("reason"))
        try:
            png = plots.plot_file(path)
        except Exception as exc:
            record.setdefault("plot_errors", []).append(f"{path.name}: {common.error_reason(exc)}")
            png = None
        record.setdefault("files", []).extend([path.name] + ([png.name] if png else []))
    record["seconds"] = time.monotonic() - start
    return record


def markdown(payload: dict) -> str:
    """The run summary: one line per part, then every table of the folder, with its plot."""
    lines = ["## Benchmark run", "", common.environment_line(payload), "", f"`{payload['command']}`", "",
             common.markdown_table(["part", "status", "seconds", "files"],
                                   [[p["name"], p["status"] + (f": {p['reason'][:200]}" if p.get("reason") else ""),
                                     common.fmt(p["seconds"]), ", ".join(p.get("files", []))]
                                    for p in payload["parts"]])]
    tables = payload.get("tables", {})
    for name, table in tables.items():
        lines += ["", table]
        png = Path(payload["out"]) / f"{name}.png"
        if png.exists():
            lines += ["", f"![{name}]({png.name})"]
    return "\n".join(lines)


def run_parts(parts: list[str], out: Path, extra: dict[str, list[str]], command: str) -> dict:
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    records = []
    for part in common.progress(parts, desc="bench", unit="part"):
        print(f"\n=== {part} ===", flush=True)
        records.append(run_part(part, out, extra.get(part, [])))
    payload = {"benchmark": NAME, **common.environment(common.default_device(), command), "out": str(out),
               "parts": records, "seconds": time.monotonic() - start}
    tables = {}  # in the order the parts ran
    for record in records:
        for name in record.get("files", []):
            result = common.read_json(out / name) if name.endswith(".json") else {}
            if result.get("benchmark") in report.RENDERERS:
                tables[result["benchmark"]] = report.render(result)
    payload["ok"] = all(r["status"] in ("ok", "skipped") for r in records)
    common.write_json(out / f"{NAME}.json", payload)
    (out / f"{NAME}.md").write_text(markdown(dict(payload, tables=tables)) + "\n")
    return payload


def composite(command: str, argv: list[str], full_argv: list[str] | None = None) -> int:
    """``kernels`` / ``all``; ``full_argv`` (the whole command line, e.g. with --threads) is what the summary records."""
    parts = KERNELS if command == "kernels" else ALL
    parser = argparse.ArgumentParser(prog=f"python -m bench {command}",
                                     description=f"Run {', '.join(parts)} into one folder, with a summary.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer timed calls and the smallest sizes (smoke runs)")
    parser.add_argument("--only", help="comma-separated parts to run (default: all of them)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out")
    for part in parts:
        parser.add_argument(f"--{part}-args", default="", help=f'extra options of {part}, e.g. "--contexts 1024"')
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",")] if args.only else list(parts)
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    unknown = sorted((set(chosen) | skip) - set(parts))
    if unknown:
        parser.error(f"unknown parts {unknown}; {command} runs {list(parts)}")
    chosen = [p for p in chosen if p not in skip]
    extra = {p: (QUICK.get(p, []) if args.quick else []) + shlex.split(getattr(args, f"{p.replace('-', '_')}_args"))
             for p in chosen}
    payload = run_parts(chosen, args.out, extra, common.command_line("bench", full_argv or [command, *argv]))
    print("\n" + (args.out / f"{NAME}.md").read_text())
    print(f"{'done' if payload['ok'] else 'FAILED'} in {payload['seconds']:.0f} s; results in {args.out}")
    return 0 if payload["ok"] else 1


def report_command(argv: list[str]) -> int:
    from . import plots, report

    parser = argparse.ArgumentParser(prog="python -m bench report",
                                     description="Re-render the tables (DIR/<benchmark>.md) and plots of a folder.")
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--readme", type=Path, help="also splice the tables between <!-- bench:NAME --> markers")
    args = parser.parse_args(argv)
    code = report.main([str(args.results_dir), "--write"] + (["--readme", str(args.readme)] if args.readme else []))
    for path in plots.plot_dir(args.results_dir):
        print(f"wrote {path}")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = list(PARTS) + ["kernels", "all", "report"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(commands)}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    threads, rest = _pop_option(rest, "--threads")
    if threads is not None:  # recorded in every result file (device.torch_threads)
        torch.set_num_threads(int(threads))
    if command in ("kernels", "all"):
        return composite(command, rest, argv)
    if command == "report":
        return report_command(rest)
    if any(a in ("-h", "--help") for a in rest):
        return module(command).main(["-h"]) or 0
    out, rest = _pop_option(rest, "--out")
    if out is None:
        print(f"python -m bench {command}: --out DIR is required", file=sys.stderr)
        return 2
    Path(out).mkdir(parents=True, exist_ok=True)
    record = run_part(command, Path(out), rest)
    for name in record.get("files", []):
        if name.endswith(".png"):
            print(f"wrote {Path(out) / name}")
    if record["status"] == "error":
        print(f"{command} failed: {record.get('reason')}", file=sys.stderr)
        return 1
    return 0


def _pop_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """``(value of --name, argv without it)`` for ``--name VALUE`` or ``--name=VALUE``."""
    value, rest, skip = None, [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == name and i + 1 < len(argv):
            value, skip = argv[i + 1], True
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest
