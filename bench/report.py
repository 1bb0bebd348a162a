"""Markdown tables from stored benchmark results: tables in docs are generated from JSON, never typed.

    python -m bench.report bench/results/<dir>                 # print the tables of every result file in <dir>
    python -m bench.report bench/results/<dir> --write         # also write <dir>/<benchmark>.md
    python -m bench.report bench/results/<dir> --readme README.md
                                                               # replace each <!-- bench:NAME --> ... <!-- /bench:NAME -->

Each result file names its benchmark (``"benchmark": "prefill"``); RENDERERS maps that name to the function that
renders it, the same function the benchmark used for its own ``.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from . import (accuracy, accuracy_decode, accuracy_plan, common, decode, e2e_hf, e2e_hf_smollm2, e2e_vllm, estimation,
               gpu_suite, memory, prefill, reliability, retrieval)

RENDERERS = {prefill.NAME: prefill.markdown, decode.NAME: decode.markdown, gpu_suite.NAME: gpu_suite.markdown,
             estimation.NAME: estimation.markdown, memory.NAME: memory.markdown, e2e_hf.NAME: e2e_hf.markdown,
             e2e_vllm.NAME: e2e_vllm.markdown, accuracy.NAME: accuracy.markdown,
             accuracy_decode.NAME: accuracy_decode.render, accuracy_plan.NAME: accuracy_plan.markdown,
             e2e_hf_smollm2.NAME: e2e_hf_smollm2.markdown, retrieval.NAME: retrieval.markdown,
             reliability.NAME: reliability.markdown}


def render(payload: dict) -> str:
    name = payload.get("benchmark")
    if name not in RENDERERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(RENDERERS)}")
    return RENDERERS[name](payload)


def render_dir(results_dir: Path | str) -> dict[str, str]:
    """``{table name: markdown}`` for every result file in ``results_dir`` (files of other kinds are skipped); the
    table name is the payload's ``table``, else its benchmark name."""
    tables = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        payload = common.read_json(path)
        if payload.get("benchmark") in RENDERERS:  # a result may name its own table (e.g. one benchmark, two batches)
            tables[payload.get("table") or payload["benchmark"]] = render(payload)
    return tables


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def splice(text: str, name: str, table: str) -> str:
    """Replace what lies between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` with ``table``."""
    start, end = markers(name)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {start} ... {end} markers in the text")
    return pattern.sub(lambda _: f"{start}\n{table.strip()}\n{end}", text, count=1)


def update_readme(readme: Path | str, results_dir: Path | str) -> list[str]:
    """Splice every table of ``results_dir`` whose markers the README has; returns the names updated."""
    readme = Path(readme)
    text = readme.read_text()
    updated = []
    for name, table in render_dir(results_dir).items():
        if markers(name)[0] in text:
            text = splice(text, name, table)
            updated.append(name)
    readme.write_text(text)
    return updated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Markdown tables from benchmark JSON.")
    parser.add_argument("results_dir", type=Path, help="a folder of result files, e.g. bench/results/h100-2026-11-23")
    parser.add_argument("--write", action="store_true", help="write <results_dir>/<benchmark>.md")
    parser.add_argument("--readme", type=Path, help="splice the tables into this file between bench markers")
    args = parser.parse_args(argv)
    tables = render_dir(args.results_dir)
    if not tables:
        parser.error(f"no benchmark result files in {args.results_dir}")
    for name, table in tables.items():
        print(table + "\n")
        if args.write:
            (args.results_dir / f"{name}.md").write_text(table + "\n")
    if args.readme:
        updated = update_readme(args.readme, args.results_dir)
        print(f"updated {args.readme}: {', '.join(updated) or 'no bench markers found'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
