"""Property-based tests (hypothesis) of the attention ops, the decode ops and the mask builders, each against a
float64 PyTorch oracle, on random shapes: GQA ratios, block sizes on and off the length grid, ragged batches,
length-1 sequences, empty mask rows, fp32/fp16/bf16, and inputs holding NaN or inf.

Hypothesis draws the shapes and options plus one integer seed from which torch draws the tensor values, so a failure
shrinks to a small shape and hypothesis prints the falsifying example (seed included) to replay it.

Examples per test: the profile ``sparse-attn-fuzz`` registered below runs a base of 12 (few enough for the file to
take well under a minute on one core in CI), scaled per test by its cost: Triton tests under the interpreter a third
of it, the cheap mask and format tests twice it. Set ``SPARSE_ATTN_FUZZ_EXAMPLES=N`` to make the base N for a longer
fuzzing session, e.g. ``SPARSE_ATTN_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/test_fuzz.py``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does the same)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from backends import DEVICE, TRITON_RUNS, pruned_reference  # noqa: E402
from sparse_attn import AShape, BlockSparseMask, Dense, PerHead, Strided, TopKBlocks, VerticalSlash  # noqa: E402
from sparse_attn import block_sparse_attention  # noqa: E402
from sparse_attn.decode import (  # noqa: E402
    DoubleSparsityConfig,
    LabelCache,
    decode_attention_reference,
    label_scores,
    select_tokens,
    sparse_decode_attention,
    token_slots,
    topk_token_indices,
    write_tokens,
)
from sparse_attn.decode.attention import _decode_cpu  # noqa: E402
from sparse_attn.decode.compressed import (  # noqa: E402
    compress_kv,
    compress_tokens,
    compressed_decode_attention_torch,
    decompress_tokens,
    keep_count,
)
from sparse_attn.decode.kv_pruning import compressed_kv_attention, prune_magnitude  # noqa: E402
from sparse_attn.decode.pruned_pages import PrunedSlotFormat  # noqa: E402
from sparse_attn.masks import causal_block_bounds, num_blocks  # noqa: E402
from sparse_attn.ops.cpu import block_sparse_attention_cpu as torch_op  # noqa: E402
from sparse_attn.ops.extension import extension_available  # noqa: E402
from sparse_attn.ops.reference import attention_reference_varlen  # noqa: E402

# ---------------------------------------------------------------------------------------------------- settings
PROFILE = "sparse-attn-fuzz"
EXAMPLES = int(os.environ.get("SPARSE_ATTN_FUZZ_EXAMPLES", "0") or 0)
settings.register_profile(
    PROFILE,
    max_examples=EXAMPLES or 12,
    deadline=None,  # the first Triton example compiles nothing but still warms the interpreter
    print_blob=True,
    database=None,  # nothing written into the repository; a failure prints its example and @reproduce_failure blob
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile(PROFILE)


def examples(ci: int) -> settings:
    """The profile with ``ci`` examples (its share of the base 12), or that share of $SPARSE_ATTN_FUZZ_EXAMPLES."""
    return settings(FUZZ, max_examples=max(1, EXAMPLES * ci // 12) if EXAMPLES else ci)


CPP = extension_available("block_sparse_attention_cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="sparse_attn._C is not built")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")

# Max abs error against the float64 oracle: fp32 accumulation, and for fp16/bf16 the rounding of inputs and output.
TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
seeds = st.integers(0, 2**31 - 1)


def offsets(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


# ---------------------------------------------------------------------------------------------------- strategies
@st.composite
def attention_cases(draw, backend):
    """A ragged batch, a random legal block mask (rows emptied on purpose) and the call's options."""
    triton = backend == "triton"
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    dim = draw(st.sampled_from([16, 32] if triton else [8, 16, 24, 32, 64]))
    causal = draw(st.booleans())
    sizes = [16, 32, 64] if triton else [1, 16, 24, 32, 64]
    bq, bk = draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes))
    kv_lens = draw(st.lists(st.one_of(st.just(1), st.integers(1, 130)), min_size=batch, max_size=batch))
    if causal:
        q_lens = [draw(st.one_of(st.just(1), st.just(n), st.integers(1, n))) for n in kv_lens]
    else:
        q_lens = [draw(st.integers(1, 90)) for _ in kv_lens]
    padded = len(set(q_lens)) == 1 and len(set(kv_lens)) == 1 and draw(st.booleans())
    dtypes = [torch.float32, torch.float16] if triton else [torch.float32, torch.float16, torch.bfloat16]
    return dict(
        hkv=hkv, hq=hkv * group, dim=dim, causal=causal, bq=bq, bk=bk, q_lens=q_lens, kv_lens=kv_lens,
        padded=padded, dtype=draw(st.sampled_from(dtypes)), density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        mask_batch=draw(st.sampled_from([1, batch])), per_head=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.1, 1.0])), seed=draw(seeds),
    )


def random_mask(gen, case, batch):
    """Kept blocks at ``density`` (causal future and blocks past a sequence's end included: kernels mask those),
    one forced-empty row, broadcast over batch and/or heads when the case says so."""
    nq, nk = num_blocks(max(case["q_lens"]), case["bq"]), num_blocks(max(case["kv_lens"]), case["bk"])
    heads = case["hq"] if case["per_head"] else 1
    keep = torch.rand(case["mask_batch"], heads, nq, nk, generator=gen) < case["density"]
    keep[0, 0, int(torch.randint(nq, (1,), generator=gen))] = False  # an empty mask row
    return BlockSparseMask.from_block_bool(keep, q_block_size=case["bq"], kv_block_size=case["bk"],
                                           q_len=max(case["q_lens"]), kv_len=max(case["kv_lens"]))


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    q_lens, kv_lens = case["q_lens"], case["kv_lens"]
    q = torch.randn(sum(q_lens), case["hq"], case["dim"], generator=gen)
    k = torch.randn(sum(kv_lens), case["hkv"], case["dim"], generator=gen)
    v = torch.randn(sum(kv_lens), case["hkv"], case["dim"], generator=gen)
    return gen, q, k, v


def run_op(backend, q, k, v, mask, case):
    """Varlen q/k/v through the backend (the padded layout when the case says so); returns varlen (out, lse)."""
    q_lens, kv_lens, causal, scale = case["q_lens"], case["kv_lens"], case["causal"], case["scale"]
    if backend == "torch":  # the PyTorch op, called directly (the "cpu" backend prefers the C++ kernel)
        batch = len(q_lens)
        return torch_op(q, k, v, offsets(q_lens), offsets(kv_lens), mask.expand(batch, q.shape[1]), causal,
                        q.shape[-1] ** -0.5 if scale is None else scale)
    if case["padded"]:
        batch, sq, skv = len(q_lens), q_lens[0], kv_lens[0]
        pad = lambda t, s: t.view(batch, s, t.shape[1], t.shape[2]).transpose(1, 2)  # noqa: E731
        out, lse = block_sparse_attention(pad(q, sq).to(DEVICE), pad(k, skv).to(DEVICE), pad(v, skv).to(DEVICE),
                                          mask.to(DEVICE), causal=causal, scale=scale, return_lse=True,
                                          backend=backend)
        return out.transpose(1, 2).reshape(q.shape).cpu(), lse.transpose(0, 1).reshape(q.shape[1], -1).cpu()
    cu = lambda lens: torch.tensor(offsets(lens), dtype=torch.int32, device=DEVICE)  # noqa: E731
    out, lse = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), causal=causal,
                                      scale=scale, cu_seqlens_q=cu(q_lens), cu_seqlens_k=cu(kv_lens),
                                      return_lse=True, backend=backend)
    return out.cpu(), lse.cpu()


def read_mask(case, mask):
    """Bool ``[Hq, Tq, Tk]``: the keys each query row reads (its blocks, causality, its own sequence only)."""
    q_lens, kv_lens, hq = case["q_lens"], case["kv_lens"], case["hq"]
    out = torch.zeros(hq, sum(q_lens), sum(kv_lens), dtype=torch.bool)
    tokens = mask.expand(len(q_lens), hq).to_token_mask()
    cq, ck = offsets(q_lens), offsets(kv_lens)
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        allowed = tokens[b, :, :ql, :kl].clone()
        if case["causal"]:
            allowed &= torch.arange(kl)[None, :] <= (torch.arange(ql) + kl - ql)[:, None]
        out[:, cq[b] : cq[b + 1], ck[b] : ck[b + 1]] = allowed
    return out


def check_close(out, lse, ref_out, ref_lse, tol, context):
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, context
    empty = torch.isneginf(ref_lse)  # [Hq, Tq]
    assert torch.equal(torch.isneginf(lse), empty), f"rows without keys differ; {context}"
    assert bool((out.transpose(0, 1)[empty] == 0).all()), f"rows without keys must be 0; {context}"
    assert torch.isfinite(out).all(), f"non-finite output; {context}"
    err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err < tol, f"max abs error {err} >= {tol}; {context}"
    if (~empty).any():
        lse_err = (lse.double() - ref_lse.double())[~empty].abs().max().item()
        assert lse_err < 1e-3, f"lse error {lse_err}; {context}"


# ---------------------------------------------------------------------------------------------------- prefill op
BLOCK_SPARSE_BACKENDS = [
    pytest.param("cpu", marks=needs_cpp),
    "torch",
    pytest.param("triton", marks=needs_triton),
]


def _block_sparse_matches_reference(backend, case):
    gen, q, k, v = make_inputs(case)
    mask = random_mask(gen, case, len(case["q_lens"]))
    dtype = case["dtype"]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = run_op(backend, q, k, v, mask, case)
    assert out.dtype == dtype and lse.dtype == torch.float32
    scale = case["dim"] ** -0.5 if case["scale"] is None else case["scale"]
    ref_out, ref_lse = attention_reference_varlen(
        q.double(), k.double(), v.double(), offsets(case["q_lens"]), offsets(case["kv_lens"]),
        mask.expand(len(case["q_lens"]), case["hq"]), case["causal"], scale, compute_dtype=torch.float64)
    check_close(out, lse, ref_out, ref_lse, TOL[dtype], f"backend={backend} case={case}")


@pytest.mark.parametrize("backend", BLOCK_SPARSE_BACKENDS)
def test_block_sparse_attention_matches_reference(backend):
    """Random ragged batches and masks through each implementation, against the float64 reference."""
    budget = 4 if backend == "triton" else 12

    @examples(budget)
    @given(case=attention_cases(backend))
    def check(case):
        _block_sparse_matches_reference(backend, case)

    check()


# ---------------------------------------------------------------------------------------------------- NaN / inf
def expected_with_nonfinite(q, k, v, case, reads, scale):
    """Float64 attention of every row over exactly the keys it reads, as torch's softmax attention computes it
    (SDPA over those keys): NaN or +inf scores make the row NaN; -inf scores weigh 0, and a row whose every read
    score is -inf, or that reads nothing, gives 0 (lse -inf). Returns out ``[Tq, Hq, D]``."""
    group = case["hq"] // case["hkv"]
    kk = k.double().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, Tk, D]
    vv = v.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = torch.einsum("qhd,hkd->hqk", q.double(), kk) * scale
    scores = torch.where(reads, scores, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    nan_row = scores.isnan().any(-1, keepdim=True) | torch.isposinf(top)
    dead = torch.isneginf(top) & ~nan_row
    probs = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-300)
    out = torch.einsum("hqk,hkd->hqd", torch.where(reads, probs, 0.0), torch.where(torch.isfinite(vv), vv, 0.0))
    # Values enter only through the keys a row reads with weight > 0 (0 * inf would be NaN in SDPA too).
    weighted = (reads & (probs > 0)).double()
    poisoned = torch.einsum("hqk,hkd->hqd", weighted, (~torch.isfinite(vv)).double()) > 0
    out = torch.where(poisoned, float("nan"), out)
    out = torch.where(nan_row, float("nan"), out)
    out = torch.where(dead, 0.0, out)
    return out.transpose(0, 1), nan_row.squeeze(-1).transpose(0, 1), dead.squeeze(-1).transpose(0, 1)


@st.composite
def nonfinite_cases(draw, backend):
    case = draw(attention_cases(backend))
    case["dtype"] = torch.float32
    case["where"] = draw(st.sampled_from(["q", "k", "k", "v"]))
    case["value"] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    case["count"] = draw(st.integers(1, 4))
    return case


@pytest.mark.parametrize("backend", BLOCK_SPARSE_BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy on NaN/inf
def test_nan_and_inf_inputs_behave_as_softmax_attention(backend):
    """NaN/inf in q or k: a row is NaN exactly when torch's softmax attention over the keys it reads is (a NaN or
    +inf score), and otherwise matches it (-inf scores weigh 0); keys a row does not read never reach it through K.
    NaN/inf in v: rows reading that value (with weight > 0) are NaN in that channel; rows of sequences whose kept
    blocks hold no bad value stay finite and exact. (Masked keys inside a kept block may still leak a bad V into
    other rows through 0 * NaN, as in torch's SDPA: documented, not tested.)"""
    budget = 4 if backend == "triton" else 12

    @examples(budget)
    @given(case=nonfinite_cases(backend))
    @example(case=dict(  # NaN in keys that rows read (the C++ kernel's max and exp once skipped NaN scores)
        hkv=1, hq=2, dim=16, causal=True, bq=16, bk=16, q_lens=[5], kv_lens=[20], padded=False, dtype=torch.float32,
        density=1.0, mask_batch=1, per_head=False, scale=None, seed=0, where="k", value=float("nan"), count=3))
    @example(case=dict(  # +inf in a query: +inf and NaN scores
        hkv=1, hq=1, dim=16, causal=False, bq=16, bk=16, q_lens=[2], kv_lens=[3], padded=False, dtype=torch.float32,
        density=1.0, mask_batch=1, per_head=False, scale=None, seed=1, where="q", value=float("inf"), count=2))
    def check(case):
        gen, q, k, v = make_inputs(case)
        mask = random_mask(gen, case, len(case["q_lens"]))
        target = {"q": q, "k": k, "v": v}[case["where"]]
        flat = target.view(-1)
        spots = torch.randint(flat.numel(), (case["count"],), generator=gen)
        flat[spots] = case["value"]
        scale = case["dim"] ** -0.5 if case["scale"] is None else case["scale"]
        reads = read_mask(case, mask)
        out, lse = run_op(backend, q, k, v, mask, case)
        want, nan_row, dead = expected_with_nonfinite(q, k, v, case, reads, scale)
        context = f"backend={backend} case={case}"
        if case["where"] in ("q", "k"):
            assert torch.equal(out.isnan().any(-1), nan_row), f"NaN rows differ; {context}"
            assert bool(out[nan_row].isnan().all()), f"a NaN row with numbers in it; {context}"
            # lse of a NaN row: NaN, or +inf (torch.logsumexp of +inf scores) where an op tracks that case.
            row_lse = lse.transpose(0, 1)
            assert bool((row_lse[nan_row].isnan() | torch.isposinf(row_lse[nan_row])).all()), context
            assert torch.isfinite(row_lse[~nan_row & ~dead]).all(), f"lse of a finite row; {context}"
            ok = ~nan_row
            assert torch.isfinite(out[ok]).all(), context
            err = (out[ok].double() - want[ok]).abs().max().item() if ok.any() else 0.0
            assert err < 1e-4, f"max abs error {err}; {context}"
            assert bool((out[dead] == 0).all()) and torch.isneginf(lse.transpose(0, 1)[dead]).all(), context
            return
        # Bad values: rows reading one (weight > 0) are NaN/inf there; untouched sequences are exact.
        poisoned = want.isnan()
        assert bool((~torch.isfinite(out[poisoned])).all()), f"a bad value read was lost; {context}"
        bad_key = ~torch.isfinite(v).flatten(1).all(-1)  # [Tk]
        cq, ck = offsets(case["q_lens"]), offsets(case["kv_lens"])
        for b in range(len(case["q_lens"])):
            if bad_key[ck[b] : ck[b + 1]].any():
                continue
            rows = slice(cq[b], cq[b + 1])
            assert torch.isfinite(out[rows]).all(), f"sequence {b} holds no bad value; {context}"
            err = (out[rows].double() - want[rows]).abs().max().item() if out[rows].numel() else 0.0
            assert err < 1e-4, f"max abs error {err} in sequence {b}; {context}"

    check()


# ---------------------------------------------------------------------------------------------------- mask builders
@st.composite
def pattern_cases(draw):
    batch = draw(st.integers(1, 3))
    causal = draw(st.booleans())
    kv_lens = [draw(st.integers(1, 150)) for _ in range(batch)]
    q_lens = [draw(st.integers(1, n)) if causal else draw(st.integers(1, 100)) for n in kv_lens]
    heads = draw(st.integers(1, 4))
    bq, bk = draw(st.sampled_from([1, 16, 24, 32, 64])), draw(st.sampled_from([1, 16, 24, 32, 64]))
    patterns = st.one_of(
        st.just(Dense()),
        st.builds(AShape, st.integers(0, 40), st.integers(1, 80)),
        st.builds(Strided, st.integers(1, 4), st.integers(0, 2)),
        st.builds(TopKBlocks, st.integers(1, 4)),
        st.builds(VerticalSlash, st.integers(1, 30), st.integers(1, 30), st.integers(1, 16)),
    )
    pattern = draw(patterns)
    if draw(st.booleans()):
        pattern = PerHead(tuple(draw(patterns) for _ in range(heads)))
    return dict(q_lens=q_lens, kv_lens=kv_lens, heads=heads, hkv=draw(st.sampled_from([h for h in (1, 2, 4)
                if heads % h == 0])), bq=bq, bk=bk, causal=causal, pattern=pattern, seed=draw(seeds))


@examples(20)
@given(case=pattern_cases())
@example(case=dict(q_lens=[3], kv_lens=[1], heads=1, hkv=1, bq=1, bk=1, causal=False,  # more queries than keys
                   pattern=VerticalSlash(1, 1, 3), seed=0))
def test_pattern_masks_are_valid_and_causally_clipped(case):
    """Every builder, on ragged batches and block sizes on or off the length grid: a valid mask (ascending ids,
    padding past the counts), no block causality empties, the exact dense set for Dense, and the blocks holding a
    row's own key kept by the patterns that promise it."""
    gen = torch.Generator().manual_seed(case["seed"])
    q_lens, kv_lens, heads, causal = case["q_lens"], case["kv_lens"], case["heads"], case["causal"]
    q = torch.randn(sum(q_lens), heads, 8, generator=gen)
    k = torch.randn(sum(kv_lens), case["hkv"], 8, generator=gen)
    mask = case["pattern"].build_mask(q_lens=q_lens, kv_lens=kv_lens, num_heads=heads, q_block_size=case["bq"],
                                      kv_block_size=case["bk"], causal=causal, q=q, k=k,
                                      cu_seqlens_q=offsets(q_lens), cu_seqlens_k=offsets(kv_lens))
    context = f"case={case}"
    assert mask.batch == len(q_lens) and mask.heads in (1, heads), context
    assert mask.q_len == max(q_lens) and mask.kv_len == max(kv_lens), context
    BlockSparseMask(mask.kv_num_blocks, mask.kv_indices, mask.q_block_size, mask.kv_block_size, mask.q_len,
                    mask.kv_len).validate()
    keep = mask.to_block_bool()
    again = BlockSparseMask.from_block_bool(keep, q_block_size=case["bq"], kv_block_size=case["bk"],
                                            q_len=mask.q_len, kv_len=mask.kv_len)
    assert torch.equal(again.to_block_bool(), keep), context
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        nq, nk = num_blocks(ql, case["bq"]), num_blocks(kl, case["bk"])
        assert not keep[b, :, nq:].any() and not keep[b, :, :, nk:].any(), f"blocks past sequence {b}; {context}"
        visible = torch.ones(nq, nk, dtype=torch.bool)
        if causal:
            visible = torch.arange(nk)[None, :] < causal_block_bounds(ql, kl, case["bq"], case["bk"])[:, None]
        assert not (keep[b, :, :nq, :nk] & ~visible).any(), f"a causally empty block kept; {context}"
        if isinstance(case["pattern"], Dense):
            assert torch.equal(keep[b, :, :nq, :nk], visible.expand_as(keep[b, :, :nq, :nk])), context
        own = isinstance(case["pattern"], TopKBlocks) or (
            isinstance(case["pattern"], Strided) and case["pattern"].local_blocks >= 1) or isinstance(
            case["pattern"], AShape)
        if causal and own:
            tokens = mask.to_token_mask()[b, :, :ql, :kl]
            rows = torch.arange(ql) + kl - ql
            assert bool(tokens[:, torch.arange(ql), rows].all()), f"a row lost its own key; {context}"


@st.composite
def block_bool_cases(draw):
    bq, bk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    q_len, kv_len = draw(st.integers(0, 120)), draw(st.integers(1, 120))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), num_blocks(q_len, bq), num_blocks(kv_len, bk))
    return dict(bq=bq, bk=bk, q_len=q_len, kv_len=kv_len, shape=shape,
                density=draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])), seed=draw(seeds))


@examples(25)
@given(case=block_bool_cases())
def test_block_mask_round_trips_and_token_expansion(case):
    """from_block_bool / to_block_bool are inverse, rows are ascending with zero padding, the token mask repeats
    the blocks (clipped to the lengths), broadcasting keeps every row, and the causal bounds follow the token rule."""
    gen = torch.Generator().manual_seed(case["seed"])
    keep = torch.rand(case["shape"], generator=gen) < case["density"]
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=case["bq"], kv_block_size=case["bk"],
                                           q_len=case["q_len"], kv_len=case["kv_len"])
    context = f"case={case}"
    mask.validate()
    assert torch.equal(mask.to_block_bool(), keep), context
    assert torch.equal(mask.kv_num_blocks, keep.sum(-1, dtype=torch.int32)), context
    width = mask.kv_indices.shape[-1]
    past = torch.arange(width) >= mask.kv_num_blocks.unsqueeze(-1)
    assert bool((mask.kv_indices[past] == 0).all()), context
    tokens = mask.to_token_mask()
    assert tokens.shape == (*case["shape"][:2], case["q_len"], case["kv_len"]), context
    i, j = torch.arange(case["q_len"]) // case["bq"], torch.arange(case["kv_len"]) // case["bk"]
    assert torch.equal(tokens, keep[:, :, i][..., j]), context
    b, h = case["shape"][:2]
    if b == 1 and h == 1:
        wide = mask.expand(3, 2)
        assert torch.equal(wide.to_block_bool(), keep.expand(3, 2, -1, -1)), context
    if case["q_len"] <= case["kv_len"] and case["q_len"] > 0:
        bounds = causal_block_bounds(case["q_len"], case["kv_len"], case["bq"], case["bk"])
        last_row = torch.clamp((torch.arange(len(bounds)) + 1) * case["bq"], max=case["q_len"]) - 1
        last_key = case["kv_len"] - case["q_len"] + last_row
        assert torch.equal(bounds, last_key // case["bk"] + 1), context
        full = BlockSparseMask.full(q_len=case["q_len"], kv_len=case["kv_len"], q_block_size=case["bq"],
                                    kv_block_size=case["bk"])
        assert torch.equal(full.to_block_bool()[0, 0],
                           torch.arange(num_blocks(case["kv_len"], case["bk"]))[None, :] < bounds[:, None]), context


# ---------------------------------------------------------------------------------------------------- decode
@st.composite
def decode_cases(draw, backend):
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    lens = [draw(st.one_of(st.just(0), st.just(1), st.integers(1, 80))) for _ in range(batch)]
    page_size = draw(st.sampled_from([1, 3, 8, 16]))
    sel = draw(st.sampled_from(["dense", "one", "kv", "q", "pages"]))
    dtypes = [torch.float32, torch.float16] if backend == "triton" else [torch.float32, torch.float16, torch.bfloat16]
    return dict(lens=lens, hkv=hkv, hq=hkv * group, dim=draw(st.sampled_from([16, 32] if backend == "triton"
                else [8, 16, 24, 64])), page_size=page_size, sel=sel, dtype=draw(st.sampled_from(dtypes)),
                num_splits=draw(st.sampled_from([None, 1, 2, 5])), seed=draw(seeds))


def paged_inputs(case):
    """K/V of each sequence in shuffled pages; every slot a sequence does not own holds NaN (reading one fails)."""
    gen = torch.Generator().manual_seed(case["seed"])
    lens, hkv, dim, page_size = case["lens"], case["hkv"], case["dim"], case["page_size"]
    max_pages = max(1, max(num_blocks(n, page_size) for n in lens))
    num_pages = len(lens) * max_pages + 2
    k_cache = torch.full((num_pages, page_size, hkv, dim), float("nan"))
    v_cache = torch.full((num_pages, page_size, hkv, dim), float("nan"))
    table = torch.randperm(num_pages, generator=gen)[: len(lens) * max_pages].view(len(lens), max_pages).int()
    for b, n in enumerate(lens):
        slots = token_slots(table, b, torch.arange(n), page_size)
        write_tokens(k_cache, slots, torch.randn(n, hkv, dim, generator=gen))
        write_tokens(v_cache, slots, torch.randn(n, hkv, dim, generator=gen))
    q = torch.randn(len(lens), case["hq"], dim, generator=gen)
    dtype = case["dtype"]
    return gen, q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), table, torch.tensor(lens, dtype=torch.int32)


def decode_selection(gen, case):
    """A random ascending token (or page) subset per row, sizes 0 to everything, entries past the length included."""
    kind, lens = case["sel"], case["lens"]
    if kind == "dense":
        return None
    heads = {"one": 1, "kv": case["hkv"], "q": case["hq"], "pages": case["hkv"]}[kind]
    unit = case["page_size"] if kind == "pages" else 1
    kv_len = max(max(lens), 1)
    items = num_blocks(kv_len, unit)
    batch = len(lens) if heads > 1 or len(lens) == 1 else int(torch.randint(2, (1,), generator=gen)) * (len(lens) - 1) + 1
    indices = torch.zeros(batch, heads, items, dtype=torch.int32)
    counts = torch.zeros(batch, heads, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            c = int(torch.randint(items + 1, (1,), generator=gen))
            picked = torch.randperm(items, generator=gen)[:c].sort().values
            indices[b, h, :c], counts[b, h] = picked.int(), c
    mask = BlockSparseMask.from_token_indices(indices, counts, kv_len=kv_len)
    if unit > 1:
        mask = BlockSparseMask(mask.kv_num_blocks, mask.kv_indices, 1, unit, 1, kv_len)
    return mask


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpp), "torch",
                                     pytest.param("triton", marks=needs_triton)])
def test_sparse_decode_attention_matches_reference(backend):
    """Dense and selected-token decode over shuffled pages (NaN in every slot not owned), GQA, empty sequences,
    selections of 0..all tokens shared by all heads, per KV group or per query head, page-level selections,
    split-K, against the float64 oracle."""
    budget = 4 if backend == "triton" else 12

    @examples(budget)
    @given(case=decode_cases(backend))
    def check(case):
        gen, q, k_cache, v_cache, table, seq_lens = paged_inputs(case)
        selection = decode_selection(gen, case)
        if backend == "torch":
            scale = case["dim"] ** -0.5
            out, lse = _decode_cpu(q, k_cache, v_cache, table, seq_lens, selection, scale, case["num_splits"] or 1)
        else:
            dev = lambda t: t.to(DEVICE)  # noqa: E731
            out, lse = sparse_decode_attention(dev(q), dev(k_cache), dev(v_cache), dev(table), dev(seq_lens),
                                               None if selection is None else selection.to(DEVICE),
                                               num_splits=case["num_splits"], backend=backend)
            out, lse = out.cpu(), lse.cpu()
        ref_out, ref_lse = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), table,
                                                      seq_lens, selection)
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        # check_close works on varlen [T, H, D] / [H, T]: one decode row per sequence.
        check_close(out, lse.transpose(0, 1), ref_out, ref_lse.transpose(0, 1), TOL[case["dtype"]],
                    f"backend={backend} case={case}")

    check()


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpp), "torch",
                                     pytest.param("triton", marks=needs_triton)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy on NaN/inf
def test_sparse_decode_nan_and_inf_inputs(backend):
    """NaN/inf in q or in the keys of owned tokens: rows whose read scores hold NaN or +inf are NaN (lse NaN or
    +inf), split-K merges included; every other row matches the float64 oracle (unread NaN slots never leak)."""
    budget = 3 if backend == "triton" else 10

    @examples(budget)
    @given(case=decode_cases(backend), where=st.sampled_from(["q", "k"]),
           value=st.sampled_from([float("nan"), float("inf"), float("-inf")]), count=st.integers(1, 3))
    @example(case=dict(lens=[1], hkv=1, hq=1, dim=16, page_size=1, sel="dense", dtype=torch.float32,  # split-K merge
                       num_splits=2, seed=0), where="q", value=float("nan"), count=1)
    def check(case, where, value, count):
        case = dict(case, dtype=torch.float32)
        gen, q, k_cache, v_cache, table, seq_lens = paged_inputs(case)
        selection = decode_selection(gen, case)
        if where == "q":
            q.view(-1)[torch.randint(q.numel(), (count,), generator=gen)] = value
        else:
            owned = torch.isfinite(k_cache).nonzero()
            assume(len(owned) > 0)
            for i in torch.randint(len(owned), (count,), generator=gen).tolist():
                k_cache[tuple(owned[i])] = value
        if backend == "torch":
            out, lse = _decode_cpu(q, k_cache, v_cache, table, seq_lens, selection, case["dim"] ** -0.5,
                                   case["num_splits"] or 1)
        else:
            dev = lambda t: t.to(DEVICE)  # noqa: E731
            out, lse = sparse_decode_attention(dev(q), dev(k_cache), dev(v_cache), dev(table), dev(seq_lens),
                                               None if selection is None else selection.to(DEVICE),
                                               num_splits=case["num_splits"], backend=backend)
            out, lse = out.cpu(), lse.cpu()
        ref_out, ref_lse = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), table,
                                                      seq_lens, selection)
        context = f"backend={backend} where={where} value={value} case={case}"
        nan_row = ref_out.isnan().any(-1)  # [B, Hq]
        assert torch.equal(out.isnan().any(-1), nan_row), f"NaN rows differ; {context}"
        assert bool(out[nan_row].isnan().all()), context
        assert bool((lse[nan_row].isnan() | torch.isposinf(lse[nan_row])).all()), context
        ok = ~nan_row
        assert torch.isfinite(out[ok]).all(), context
        err = (out[ok].double() - ref_out[ok]).abs().max().item() if ok.any() else 0.0
        assert err < 1e-4, f"max abs error {err}; {context}"
        assert torch.equal(torch.isneginf(lse[ok]), torch.isneginf(ref_lse[ok])), context

    check()


# ---------------------------------------------------------------------------------------------------- selection
@st.composite
def selection_cases(draw):
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    sink, recent = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    budget = draw(st.integers(max(1, sink + recent), 40))
    return dict(lens=[draw(st.one_of(st.just(1), st.integers(1, 120))) for _ in range(batch)], hkv=hkv,
                hq=hkv * draw(st.sampled_from([1, 2, 4])), dim=draw(st.sampled_from([16, 32])),
                r=draw(st.sampled_from([2, 4, 8])), page_size=draw(st.sampled_from([1, 4, 16])), sink=sink,
                recent=recent, budget=budget, share=draw(st.booleans()), reduce=draw(st.sampled_from(["max", "sum"])),
                backend=draw(st.sampled_from((["cpu"] if CPP else []) + ["reference"])), seed=draw(seeds))


def selection_setup(case):
    gen = torch.Generator().manual_seed(case["seed"])
    lens, hkv, dim, page_size = case["lens"], case["hkv"], case["dim"], case["page_size"]
    channels = torch.stack([torch.randperm(dim, generator=gen)[: case["r"]] for _ in range(hkv)])
    max_pages = max(num_blocks(n, page_size) for n in lens)
    num_pages = len(lens) * max_pages + 1
    table = torch.randperm(num_pages, generator=gen)[: len(lens) * max_pages].view(len(lens), max_pages).int()
    labels = LabelCache(channels, num_pages, page_size, bits=16, dtype=torch.float32)
    for b, n in enumerate(lens):
        labels.write(torch.randn(n, hkv, dim, generator=gen), token_slots(table, b, torch.arange(n), page_size))
    q = torch.randn(len(lens), case["hq"], dim, generator=gen)
    return q, labels, channels, table, torch.tensor(lens, dtype=torch.int32)


@examples(20)
@given(case=selection_cases())
def test_select_tokens_keeps_protected_and_best_tokens(case):
    """Double Sparsity's selection (C++ pass or PyTorch scores + top-k): each row lists exactly its budget of
    distinct in-range tokens, ascending, zero-padded; sink and recent tokens always; the rest the best float64
    label scores (continuous random scores: no ties)."""
    q, labels, channels, table, seq_lens = selection_setup(case)
    cfg = DoubleSparsityConfig(r=case["r"], budget=case["budget"], min_budget=max(1, case["sink"] + case["recent"]),
                               sink_tokens=case["sink"], recent_tokens=case["recent"], dense_below=0,
                               share_kv_group=case["share"], group_reduce=case["reduce"])
    sel = select_tokens(q, labels, channels, table, seq_lens, cfg, backend=case["backend"])
    context = f"case={case}"
    heads = case["hkv"] if case["share"] else case["hq"]
    assert sel.kv_num_blocks.shape == (len(case["lens"]), heads, 1) and sel.kv_block_size == 1, context
    sel.validate()
    # Float64 label scores, reduced over a group's query heads as configured.
    q_label = q.double().gather(2, channels.repeat_interleave(case["hq"] // case["hkv"], 0).expand(len(case["lens"]),
                                -1, -1))
    for b, n in enumerate(case["lens"]):
        pos = torch.arange(n)
        lab = labels.read(table[b, pos // case["page_size"]].long(), pos % case["page_size"]).double()  # [n, Hkv, r]
        s = torch.einsum("hr,nhr->hn", q_label[b], lab.repeat_interleave(case["hq"] // case["hkv"], 1))
        if case["share"]:
            s = s.view(case["hkv"], -1, n)
            s = s.amax(1) if case["reduce"] == "max" else s.sum(1)
        want_count = min(n, case["budget"])
        protected = (pos < case["sink"]) | (pos >= n - case["recent"])
        for h in range(heads):
            count = int(sel.kv_num_blocks[b, h, 0])
            got = sel.kv_indices[b, h, 0, :count].tolist()
            assert count == want_count, f"row {b},{h}: {count} tokens for budget {want_count}; {context}"
            assert got == sorted(set(got)) and all(0 <= t < n for t in got), f"row {b},{h}: {got}; {context}"
            assert bool((sel.kv_indices[b, h, 0, count:] == 0).all()), context
            assert set(pos[protected].tolist()) <= set(got) or count < int(protected.sum()), context
            rest = s[h].masked_fill(protected, float("-inf"))
            free = want_count - int(protected.sum())
            if free > 0:
                best = set(rest.topk(free).indices.tolist())
                assert best <= set(got), f"row {b},{h}: best {sorted(best)} not in {got}; {context}"


@examples(20)
@given(b=st.integers(1, 3), h=st.integers(1, 3), length=st.integers(1, 60), seed=seeds, data=st.data())
def test_topk_token_indices_against_sorting(b, h, length, seed, data):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, length, generator=gen)
    scores[..., torch.rand(length, generator=gen) < 0.1] = float("inf")
    budgets = torch.tensor(data.draw(st.lists(st.integers(0, length), min_size=b, max_size=b)))
    width = data.draw(st.integers(max(int(budgets.max()), 1), length))
    assume(int(budgets.max()) <= width)
    indices, counts = topk_token_indices(scores, budgets, width)
    assert indices.shape == (b, h, width) and torch.equal(counts, budgets.int()[:, None].expand(b, h))
    for i in range(b):
        for j in range(h):
            k = int(budgets[i])
            got = indices[i, j, :k]
            assert got.tolist() == sorted(set(got.tolist())), f"seed {seed}"
            # The kept scores are the k largest (ties among +inf may pick any of them).
            assert torch.equal(scores[i, j, got.long()].sort().values, scores[i, j].sort().values[length - k:])
            assert bool((indices[i, j, k:] == 0).all())


@needs_triton
@examples(3)
@given(case=selection_cases())
def test_triton_label_scores_match_torch(case):
    q, labels, channels, table, seq_lens = selection_setup(case)
    cfg = DoubleSparsityConfig(r=case["r"], budget=case["budget"], min_budget=max(1, case["sink"] + case["recent"]),
                               sink_tokens=case["sink"], recent_tokens=case["recent"], dense_below=0,
                               share_kv_group=case["share"], group_reduce=case["reduce"])
    width = max(case["lens"])
    want = label_scores(q, labels, table, seq_lens, width, cfg, backend="reference")
    got = label_scores(q.to(DEVICE), labels, table.to(DEVICE), seq_lens.to(DEVICE), width, cfg, backend="triton").cpu()
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got),
                                                                                   torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-5, msg=lambda m: f"{m}\ncase={case}")


# ---------------------------------------------------------------------------------------------------- KV pruning
@st.composite
def pruning_cases(draw):
    """K and V with ties (small integers), zeros and signed zeros mixed in, over odd and tile-sized head dims."""
    dim = draw(st.sampled_from([1, 7, 8, 40, 64, 65, 96, 128, 200, 256]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(seeds))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), dim)
    pair = []
    for _ in range(2):
        if draw(st.booleans()):
            x = torch.randint(-2, 3, shape, generator=gen).float()  # ties and zeros
            zeros = x == 0
            x[zeros] = torch.where(torch.rand(int(zeros.sum()), generator=gen) < 0.5, 0.0, -0.0)
        else:
            x = torch.randn(shape, generator=gen)
        pair.append(x.to(dtype))
    return pair[0], pair[1], draw(st.floats(0.0, 0.99))


@examples(30)
@given(case=pruning_cases())
def test_pruned_slot_pack_unpack_round_trip(case):
    """Pack / unpack of pruned page slots returns exactly the magnitude-pruned K and V (ties to the lower channel),
    bit for bit (signed zeros included), for any head_dim up to 256 and every cache dtype; so does the compressed
    cache's tile format."""
    k, v, sparsity = case
    fmt = PrunedSlotFormat.for_sparsity(k.shape[-1], sparsity, k.dtype)
    slots = fmt.pack(k, v)
    assert slots.shape == (*k.shape[:-1], fmt.width) and slots.dtype == k.dtype
    k2, v2 = fmt.unpack(slots)
    for got, x in ((k2, k), (v2, v)):
        want = prune_magnitude(x, sparsity)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
        assert bool(((got != 0).sum(-1) <= fmt.keep).all())
        bitmaps, values = compress_tokens(x, fmt.keep)
        dense = decompress_tokens(bitmaps, values, x.shape[-1])
        assert torch.equal(dense, want) and torch.equal(dense.signbit(), want.signbit())


@st.composite
def compressed_cases(draw):
    batch = draw(st.integers(1, 3))
    return dict(comp=[draw(st.one_of(st.just(0), st.integers(0, 70))) for _ in range(batch)],
                rec=[draw(st.integers(0, 6)) for _ in range(batch)], hkv=draw(st.integers(1, 3)),
                group=draw(st.sampled_from([1, 2, 4])), dim=draw(st.sampled_from([8, 40, 64, 96, 128])),
                sparsity=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95])),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                backend=draw(st.sampled_from(["torch", "reference"] + (["cpu"] if extension_available(
                    "compressed_decode_attention") else []))), seed=draw(seeds))


@examples(20)
@given(case=compressed_cases())
def test_compressed_decode_matches_reference(case):
    """Decode over bitmap-compressed tokens followed by a dense recent window (ragged, empty contexts included),
    by the C++ operator, the PyTorch path and the reference backend, against the float64 oracle on the pruned K/V."""
    gen = torch.Generator().manual_seed(case["seed"])
    comp, rec, hkv, dim, dtype = case["comp"], case["rec"], case["hkv"], case["dim"], case["dtype"]
    batch, window, keep = len(comp), max(max(rec), 1), keep_count(dim, case["sparsity"])
    k = torch.randn(batch, hkv, max(max(comp), 1), dim, generator=gen).to(dtype)
    v = torch.randn(batch, hkv, max(max(comp), 1), dim, generator=gen).to(dtype)
    compressed = compress_kv(k, v, torch.tensor(comp), k_keep=keep, v_keep=keep)
    k_rec = torch.randn(batch, hkv, window, dim, generator=gen).to(dtype)
    v_rec = torch.randn(batch, hkv, window, dim, generator=gen).to(dtype)
    rec_t = torch.tensor(rec, dtype=torch.int32)
    q = torch.randn(batch, hkv * case["group"], dim, generator=gen).to(dtype)
    keys = [torch.cat([prune_magnitude(k[b, :, :c], case["sparsity"]), k_rec[b, :, :r]], 1)
            for b, (c, r) in enumerate(zip(comp, rec))]
    values = [torch.cat([prune_magnitude(v[b, :, :c], case["sparsity"]), v_rec[b, :, :r]], 1)
              for b, (c, r) in enumerate(zip(comp, rec))]
    scale = dim ** -0.5
    if case["backend"] == "torch":
        out, lse = compressed_decode_attention_torch(q, compressed, k_rec, v_rec, rec_t, scale)
    else:
        out, lse = compressed_kv_attention(q, compressed, k_rec, v_rec, rec_t, backend=case["backend"],
                                           return_lse=True)
    ref_out, ref_lse = pruned_reference(q, keys, values, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_close(out, lse.transpose(0, 1), ref_out, ref_lse.transpose(0, 1), TOL[dtype], f"case={case}")
