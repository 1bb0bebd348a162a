"""Retrieval prompts for SmolLM2-135M: facts (needles) hidden at chosen depths of long texts (haystacks) of several
kinds, asked for at the end, every prompt rebuilt exactly from a few parameters.

A case is a :class:`CaseSpec`: haystack kind, needle kind, length in tokens, needle depth(s) and a seed.
:func:`build_prompt` turns it into the prompt text, the question and the expected answer strings; the same spec gives
the same prompt on every machine with the same haystack sources (:func:`source_fingerprints` names them by hash).

Haystack kinds (:data:`HAYSTACK_KINDS`):

- ``filler``: the passkey filler of :func:`sparse_attn.models.make_passkey_prompt` repeated;
- ``licence``: licence prose, the GPL-3, LGPL-2.1 and MPL-1.1 texts of ``/usr/share/common-licenses``
  (:data:`LICENCE_FILES`), the texts the accuracy benchmarks hold out from plan calibration
  (``bench.accuracy_plan.PPL_TEXTS``); consecutive lines from a seeded start, cycling over the three;
- ``python``: Python source and docstrings of the installed standard library (:data:`STDLIB_FILES` under
  ``sysconfig.get_paths()["stdlib"]``); consecutive lines from a seeded start;
- ``mixed``: several documents interleaved: chunks of 150-400 tokens of the three kinds above in seeded order.

Needle kinds (:data:`NEEDLE_KINDS`), each one plain sentence placed between lines (between filler sentences in
filler):

- ``number``: "The secret number is 4827316." (5-7 digits);
- ``word``: "The magic word is velmora." (a made-up word of three syllables);
- ``kv``: "The access code for room Orion is 48213." among 4 + tokens/600 distractor records of the same form
  (other rooms, other codes) at seeded depths, asked for by room.

A spec with two depths hides two needles of its kind (two numbers or two words told apart by "first" and
"second", two rooms) and asks for both; the case is found only when both answers are in the continuation.

The prompt is plain text without a chat template, ending with the start of the answer (SmolLM2-135M-Instruct
continues a primed answer; asked through its chat template it does not retrieve, see
:func:`~sparse_attn.models.make_passkey_prompt`).
"""

from __future__ import annotations

import hashlib
import random
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from .smollm2 import FILLER

__all__ = ["HAYSTACK_KINDS", "NEEDLE_KINDS", "LICENCE_FILES", "STDLIB_FILES", "CaseSpec", "Prompt", "Sources",
           "build_prompt", "answered", "source_fingerprints"]

HAYSTACK_KINDS = ("filler", "licence", "python", "mixed")
NEEDLE_KINDS = ("number", "word", "kv")

LICENCE_DIR = Path("/usr/share/common-licenses")
#: Licence prose held out from plan calibration (bench.accuracy_plan.PPL_TEXTS), read in this order.
LICENCE_FILES = ("GPL-3", "LGPL-2.1", "MPL-1.1")
#: Standard-library modules read as the ``python`` haystack, in this order.
STDLIB_FILES = ("textwrap.py", "shlex.py", "fractions.py", "calendar.py", "heapq.py", "bisect.py", "sched.py",
                "queue.py", "glob.py", "fnmatch.py", "string.py", "numbers.py", "colorsys.py", "graphlib.py",
                "reprlib.py", "statistics.py")

HEADER = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
MIXED_CHUNK = (150, 400)  # tokens per chunk of the mixed haystack

ROOMS = ("Orion", "Lyra", "Vega", "Draco", "Cygnus", "Perseus", "Andromeda", "Pegasus", "Hydra", "Phoenix", "Aquila",
         "Carina", "Corvus", "Dorado", "Fornax", "Lupus", "Musca", "Norma", "Pavo", "Pictor", "Puppis", "Sagitta",
         "Scutum", "Taurus", "Tucana", "Vela", "Volans", "Altair", "Rigel", "Sirius", "Deneb", "Polaris", "Capella",
         "Antares", "Arcturus", "Castor", "Pollux", "Mira", "Spica", "Electra", "Atlas", "Maia", "Merope", "Nashira",
         "Alcor", "Mizar", "Izar", "Markab", "Hamal", "Menkar")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "tr", "pl", "st")
_VOWELS = ("a", "e", "i", "o", "u")
ORDINALS = ("first", "second")
KV_RECORD = "The access code for room {key} is {value}."
KV_QUESTION = "What is the access code for room {key}?"
KV_QUESTION2 = "What are the access codes for rooms {key} and {key2}?"
KV_PREFIX = "The access code for room {key} is"
KV_DISTRACTORS = (4, 600)  # distractor records: 4 + tokens / 600


@dataclass(frozen=True)
class CaseSpec:
    """What determines a prompt: haystack kind, needle kind, target length in tokens, needle depth(s) in [0, 1]
    (one or two, ascending) and the seed of everything drawn (haystack start, values, distractors)."""

    id: str
    haystack: str
    needle: str
    tokens: int
    depths: tuple[float, ...]
    seed: int

    def __post_init__(self):
        if self.haystack not in HAYSTACK_KINDS:
            raise ValueError(f"haystack must be one of {HAYSTACK_KINDS}, got {self.haystack!r}")
        if self.needle not in NEEDLE_KINDS:
            raise ValueError(f"needle must be one of {NEEDLE_KINDS}, got {self.needle!r}")
        depths = tuple(float(d) for d in self.depths)
        if not 1 <= len(depths) <= 2 or any(not 0.0 <= d <= 1.0 for d in depths) or list(depths) != sorted(depths):
            raise ValueError(f"depths: one or two ascending values in [0, 1], got {self.depths!r}")
        if self.tokens < 128:
            raise ValueError(f"tokens must be >= 128, got {self.tokens}")
        object.__setattr__(self, "depths", depths)

    def as_dict(self) -> dict:
        return dict(asdict(self), depths=list(self.depths))

    @classmethod
    def from_dict(cls, data: dict) -> "CaseSpec":
        return cls(data["id"], data["haystack"], data["needle"], int(data["tokens"]), tuple(data["depths"]),
                   int(data["seed"]))


@dataclass
class Prompt:
    """A built case: the prompt text, the question it ends with, the strings the answer must contain, the prompt's
    length in tokens and where each needle starts (first needle token / tokens before the question)."""

    spec: CaseSpec
    text: str
    question: str
    answers: tuple[str, ...]
    tokens: int
    depths: tuple[float, ...]
    needles: tuple[str, ...]
    distractors: int = 0
    sources: tuple[str, ...] = field(default_factory=tuple)


def answered(answers, continuation: str) -> bool:
    """Whether every expected string is in the continuation, case-insensitive (a word may be capitalised) and not
    run into other letters or digits (48213 is not found in 148213)."""
    text = continuation.lower()
    return all(re.search(rf"(?<![0-9a-z]){re.escape(str(a).lower())}(?![0-9a-z])", text) for a in answers)


# ---------------------------------------------------------------------------------------------------- sources
def _read_sources() -> dict[str, list[tuple[str, str]]]:
    """kind -> [(name, text)] of the line-based haystacks."""
    licences = [LICENCE_DIR / name for name in LICENCE_FILES]
    missing = [str(p) for p in licences if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"licence haystack: {', '.join(missing)} not found (Debian's common-licenses)")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = [stdlib / name for name in STDLIB_FILES]
    missing = [str(p) for p in modules if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"python haystack: {', '.join(missing)} not found in the standard library")
    return {"licence": [(p.name, p.read_text()) for p in licences],
            "python": [(f"stdlib/{p.name}", p.read_text()) for p in modules]}


def source_fingerprints() -> dict[str, str]:
    """name -> sha256 (first 16 hex digits) of every haystack source text: a case list built elsewhere rebuilds the
    same prompts only where these agree."""
    out = {"filler": hashlib.sha256(FILLER.encode()).hexdigest()[:16]}
    for kind, texts in _read_sources().items():
        for name, text in texts:
            out[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


class Sources:
    """The haystack sources cut into units (lines; filler sentences) with their token counts for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        sentences = [s + ". " for s in FILLER.strip().rstrip(".").split(". ")]
        assert "".join(sentences) == FILLER
        self.units: dict[str, list[str]] = {"filler": sentences}
        self.names: dict[str, list[str]] = {"filler": ["filler"] * len(sentences)}
        for kind, texts in _read_sources().items():
            lines, names = [], []
            for name, text in texts:
                body = text if text.endswith("\n") else text + "\n"
                for line in body.splitlines(keepends=True):
                    lines.append(line)
                    names.append(name)
            self.units[kind], self.names[kind] = lines, names
        self.counts = {kind: self._count(units) for kind, units in self.units.items()}

    def _count(self, pieces: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(pieces, add_special_tokens=False)["input_ids"]]

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def take(self, kind: str, start: int, budget: int) -> tuple[list[str], list[int], set[str]]:
        """Consecutive units of ``kind`` from unit ``start`` (cycling) until ``budget`` tokens: units, their
        counts and the source names read."""
        units, counts, names = [], [], set()
        n = len(self.units[kind])
        i, total = start % n, 0
        while total < budget:
            units.append(self.units[kind][i])
            counts.append(self.counts[kind][i])
            names.add(self.names[kind][i])
            total += counts[-1]
            i = (i + 1) % n
        return units, counts, names


@lru_cache(maxsize=4)
def _sources_for(tokenizer) -> Sources:
    return Sources(tokenizer)


# ---------------------------------------------------------------------------------------------------- needles
def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(3))


def _number(rng: random.Random) -> str:
    digits = rng.choice((5, 6, 7))
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _needles(spec: CaseSpec, rng: random.Random):
    """(needle sentences, their answers, the question, the answer prefix, distractor sentences)."""
    two = len(spec.depths) == 2
    if spec.needle == "kv":
        rooms = rng.sample(ROOMS, len(spec.depths) + KV_DISTRACTORS[0] + spec.tokens // KV_DISTRACTORS[1])
        codes = rng.sample(range(10000, 100000), len(rooms))
        records = [KV_RECORD.format(key=r, value=c) for r, c in zip(rooms, codes)]
        k = len(spec.depths)
        answers = tuple(str(c) for c in codes[:k])
        question = (KV_QUESTION2.format(key=rooms[0], key2=rooms[1]) if two else KV_QUESTION.format(key=rooms[0]))
        return records[:k], answers, question, KV_PREFIX.format(key=rooms[0]), records[k:]
    noun, draw = ("secret number", _number) if spec.needle == "number" else ("magic word", _word)
    values = []
    while len(values) < len(spec.depths):
        v = draw(rng)
        if v not in values:
            values.append(v)
    if two:
        sentences = [f"The {o} {noun} is {v}." for o, v in zip(ORDINALS, values)]
        return (sentences, tuple(values), f"What are the first and the second {noun}s?",
                f"The first {noun} is", [])
    return [f"The {noun} is {values[0]}."], tuple(values), f"What is the {noun}?", f"The {noun} is", []


# ---------------------------------------------------------------------------------------------------- haystacks
def _haystack(spec: CaseSpec, sources: Sources, budget: int, rng: random.Random):
    """Units (texts) and their token counts summing to about ``budget`` tokens, and the source names read."""
    if spec.haystack != "mixed":
        start = rng.randrange(len(sources.units[spec.haystack]))
        units, counts, names = sources.take(spec.haystack, start, budget)
        return units, counts, names
    kinds = ["filler", "licence", "python"]
    rng.shuffle(kinds)
    units, counts, names, total, i = [], [], set(), 0, 0
    sep = sources.count("\n\n")
    while total < budget:
        kind = kinds[i % len(kinds)]
        size = min(rng.randint(*MIXED_CHUNK), budget - total)
        part, part_counts, part_names = sources.take(kind, rng.randrange(len(sources.units[kind])), size)
        if part and not part[-1].endswith("\n"):
            part[-1] = part[-1].rstrip(" ") + "\n"
        part[-1] += "\n"  # documents are separated by an empty line
        part_counts[-1] += sep - 1
        units += part
        counts += part_counts
        names |= part_names
        total += sum(part_counts)
        i += 1
    return units, counts, names


def _insertion_points(counts: list[int], depths, offset: int = 0) -> list[int]:
    """Unit index before which each fraction ``depth`` of the tokens (``offset`` tokens before the units, then the
    units) has passed."""
    total = sum(counts) + offset
    points, acc, i = [], 0, 0
    for depth in depths:
        target = depth * total - offset
        while i < len(counts) and acc + counts[i] / 2 <= target:
            acc += counts[i]
            i += 1
        points.append(i)
    return points


def build_prompt(tokenizer, spec: CaseSpec, sources: Sources | None = None) -> Prompt:
    """The prompt of ``spec``: about ``spec.tokens`` tokens (header, haystack with the needles, question and the
    start of the answer), the needles at ``spec.depths`` of the text before the question."""
    sources = sources if sources is not None else _sources_for(tokenizer)
    budget, targets = None, spec.depths
    # Units counted alone tokenize a little differently in context, and inserted sentences move what follows them:
    # correct the haystack's budget and the needles' target depths from what the built prompt measures.
    for _ in range(5):
        prompt, budget = _build(tokenizer, spec, sources, budget, targets)
        errors = [want - got for want, got in zip(spec.depths, prompt.depths)]
        if abs(prompt.tokens - spec.tokens) <= max(8, spec.tokens // 200) and max(map(abs, errors)) <= 0.01:
            break
        budget += spec.tokens - prompt.tokens
        targets = tuple(min(1.0, max(0.0, t + e)) for t, e in zip(targets, errors))
    return prompt


def _build(tokenizer, spec: CaseSpec, sources: Sources, budget: int | None, targets) -> tuple[Prompt, int]:
    rng = random.Random(spec.seed)
    needles, answers, question, prefix, distractors = _needles(spec, rng)
    tail = "\n\n" + question + " " + prefix
    if budget is None:
        fixed = sources.count(HEADER) + sources.count(tail) + sum(sources.count(n + " ") for n in needles + distractors)
        budget = max(0, spec.tokens - fixed)
    units, counts, names = _haystack(spec, sources, budget, rng)
    # Distractors at seeded depths (spread away from the needles), then the needles at theirs.
    pieces: list[tuple[int, int, str]] = []  # (insertion unit, order, text)
    head = sources.count(HEADER)
    for j, text in enumerate(distractors):
        depth = rng.uniform(0.02, 0.98)
        while any(abs(depth - d) < 0.02 for d in spec.depths):
            depth = rng.uniform(0.02, 0.98)
        pieces.append((_insertion_points(counts, [depth], head)[0], 1, text))
    for point, text in zip(_insertion_points(counts, targets, head), needles):
        pieces.append((point, 0, text))
    pieces.sort(key=lambda p: (p[0], p[1]))
    out, needle_chars, k = [HEADER], {}, 0
    length = len(HEADER)
    for i in range(len(units) + 1):
        while k < len(pieces) and pieces[k][0] == i:
            before = out[-1]
            text = pieces[k][2] + ("\n" if before.endswith("\n") else " ")
            if pieces[k][1] == 0:
                needle_chars[pieces[k][2]] = length
            out.append(text)
            length += len(text)
            k += 1
        if i < len(units):
            out.append(units[i])
            length += len(units[i])
    body = "".join(out).rstrip()
    text = body + tail
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in encoded["offset_mapping"]]
    question_at = _token_at(starts, len(body))
    depths = tuple(_token_at(starts, needle_chars[n]) / question_at for n in needles)
    return Prompt(spec, text, question, answers, len(encoded["input_ids"]), depths, tuple(needles),
                  len(distractors), tuple(sorted(names))), budget


def _token_at(starts: list[int], char: int) -> int:
    """Index of the first token starting at or after character ``char``."""
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] < char:
            lo = mid + 1
        else:
            hi = mid
    return lo
