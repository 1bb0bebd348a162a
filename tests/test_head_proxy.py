"""Head-proxy estimation (ProxyAttn) and elastic spans: pooled probabilities against a float64 definition, the
Triton kernel against it, the selection rules, and recall on real SmolLM2 attention at about 4k tokens."""


import math

import pytest
import torch

from sparse_attn import AShape, ElasticSpan, HeadProxy, SparseAttention, VerticalSlash
from sparse_attn.masks import causal_block_bounds
from sparse_attn.ops.attention import triton_interpreter_enabled, triton_kernels
from sparse_attn.ops.extension import estimate_products, extension_available, pooled_block_scores_cpu
from sparse_attn.patterns import SeqContext
from sparse_attn.patterns.head_proxy import blocks_for_mass, pooled_block_probs, strided_rows

needs_triton = pytest.mark.skipif(triton_kernels() is None or not triton_interpreter_enabled(),
                                  reason="needs triton with TRITON_INTERPRET=1")


#: The estimate's 2^x polynomial (degree 4, relative error 2.7e-6): pooled values agree with the definition to it.
EXP_RTOL = 4e-6


def pooled_definition(q, k, pos, bk, scale, causal, mean):
    """Row by row, in float64: softmax over the visible keys, then max or row-mean of block sums."""
    heads, nq, rows, _ = q.shape
    kv_len = k.shape[0]
    nk = -(-kv_len // bk)
    out = torch.zeros(heads, nq, nk, dtype=torch.float64)
    for h in range(heads):
        kh = k[:, h // (heads // k.shape[1])].double()
        for i in range(nq):
            probs = []
            for r in range(rows):
                p = int(pos[i, r])
                if p < 0:
                    continue
                s = (q[h, i, r].double() @ kh.T) * scale
                if causal:
                    s[p + 1:] = float("-inf")
                probs.append(torch.softmax(s, 0))
            for j in range(nk):
                if not probs:
                    continue
                blocks = [pr[j * bk:(j + 1) * bk] for pr in probs]
                out[h, i, j] = sum(b.sum() for b in blocks) / len(blocks) if mean else max(b.max() for b in blocks)
    return out


def random_case(heads, kv_heads, nq, rows, dim, kv_len, seed=0, empty=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, nq, rows, dim, generator=g)
    k = torch.randn(kv_len, kv_heads, dim, generator=g)
    pos = torch.randint(0 if not empty else -1, kv_len, (nq, rows), generator=g)
    return q, k, pos


@pytest.mark.parametrize("heads,kv_heads,kv_len,bk,causal,mean", [
    (3, 1, 50, 16, True, False), (3, 3, 33, 8, True, True), (8, 1, 16, 16, False, True), (2, 2, 1, 4, True, False),
])
def test_pooled_probs_match_definition(heads, kv_heads, kv_len, bk, causal, mean):
    q, k, pos = random_case(heads, kv_heads, 3, 5, 8, kv_len)
    got = pooled_block_probs(q.double(), k.double(), pos, bk, 0.4, causal, mean, backend="cpu")
    assert torch.allclose(got, pooled_definition(q, k, pos, bk, 0.4, causal, mean), atol=1e-12)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _rounded_inputs(products: str, q, k, mul):
    """q and k as the kernel's products see them (q pre-scaled by ``mul`` to log2 units, then rounded)."""
    if products == "bf16":
        return (q * mul).bfloat16().double() / mul.double(), k.bfloat16().double()
    limit = math.floor(min(32767.0, math.sqrt((2 ** 31 - 1) / q.shape[-1])))

    def quantized(x):  # per row: round(x * L / max|x|) * (max|x| / L), rounded to nearest even in fp32
        top = x.abs().amax(-1, keepdim=True)
        inv = torch.where(top > 0, torch.tensor(float(limit)) / top, torch.zeros_like(top))
        return torch.round(x * inv).double() * (top / limit).double()

    return quantized(q * mul) / mul.double(), quantized(k)


@pytest.mark.skipif(not extension_available("pooled_block_scores"), reason="sparse_attn._C is not built")
@pytest.mark.parametrize("dim", [32, 48, 64])
@pytest.mark.parametrize("mean", [True, False])
def test_cpu_pooled_scores_exact_and_rounded(dim, mean):
    """The C++ scoring against the float64 definition: exactly on the fp32 inputs (products="fp32"), and on the
    inputs as the bf16 and int16 products round them, on CPUs that have those (head dims that are multiples of 32,
    AVX512-BF16 / AVX512-VNNI); "auto" is the one estimate_products names. Tiles of 243 and 81 rows (register tiles
    of 12 rows and remainders) against 700 keys (two full key tiles and a partial one), empty rows, causal."""
    q, k, pos = random_case(3, 1, 12, 9, dim, 700, seed=dim)
    pos[:, -1] = torch.randint(600, 700, (12,))  # rows that see most of the keys
    k[:, :, 3] += 6.0  # an outlier channel, as real keys have: per-row int16 scales must still resolve the rest
    exact = pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, mean, products="fp32")
    assert torch.allclose(exact.double(), pooled_definition(q, k, pos, 32, 0.3, True, mean), atol=2e-6, rtol=EXP_RTOL)
    mul = torch.tensor(0.3 * 1.4426950408889634, dtype=torch.float32)  # the kernel rounds q pre-scaled to log2 units
    flags = _cpu_flags()
    ran = {"fp32": exact}
    for products, flag in (("bf16", " avx512_bf16"), ("int16", " avx512_vnni")):
        if dim % 32 or flag not in flags:
            with pytest.raises(RuntimeError, match=products):
                pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, mean, products=products)
            continue
        got = pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, mean, products=products)
        want = pooled_definition(*_rounded_inputs(products, q, k, mul), pos, 32, 0.3, True, mean)
        assert torch.allclose(got.double(), want, atol=2e-6, rtol=EXP_RTOL)
        assert not torch.allclose(got, exact, atol=1e-7, rtol=0)  # the rounding is visible
        assert torch.allclose(got, exact, atol=2e-3)  # and small
        ran[products] = got
    auto = pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, mean)
    assert torch.equal(auto, ran[estimate_products(dim)])
    with pytest.raises(RuntimeError, match="products must be"):
        pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, mean, products="fp16")


@pytest.mark.skipif(not extension_available("pooled_block_scores"), reason="sparse_attn._C is not built")
@pytest.mark.parametrize("bk", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_pooled_scores_whole_key_tiles(bk, causal):
    """Whole key tiles of 256 keys take the statistics held in registers (mean pooling, every block size that
    divides the tile), partial ones the per-block loop: both against the float64 definition, fp32 products."""
    q, k, pos = random_case(4, 2, 6, 5, 64, 777, seed=bk)
    pos[:, 0] = torch.randint(520, 777, (6,))  # rows that read two whole tiles and part of a third
    got = pooled_block_scores_cpu(q, k, pos, bk, 0.2, causal, True, products="fp32")
    want = pooled_definition(q, k, pos, bk, 0.2, causal, True)
    assert torch.allclose(got.double(), want, atol=2e-6, rtol=EXP_RTOL)


@pytest.mark.skipif(not extension_available("pooled_block_scores"), reason="sparse_attn._C is not built")
def test_cpu_int16_products_fall_back_on_non_finite_rows():
    """A query row holding inf is not quantized: its tile of rows (here all of them: 4 query blocks of 9 rows for 3
    proxies make one tile) takes the fp32 products, so the result is the exact one, NaN where it has NaN."""
    if "avx512_vnni" not in _cpu_flags():
        pytest.skip("this CPU has no AVX512-VNNI")
    q, k, pos = random_case(3, 1, 4, 9, 64, 300, seed=5)
    q[1, 2, 3, 4] = float("inf")
    pos[2, 3] = 250  # a row that is not empty
    got = pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, True, products="int16")
    exact = pooled_block_scores_cpu(q, k, pos, 32, 0.3, True, True, products="fp32")
    assert got.isnan().any()
    assert torch.equal(got.isnan(), exact.isnan())
    assert torch.equal(got.nan_to_num(), exact.nan_to_num())


@needs_triton
@pytest.mark.parametrize("heads,kv_heads,kv_len,bk,causal,mean,rows", [
    (3, 1, 70, 16, True, False, 5), (2, 2, 40, 32, True, True, 16), (8, 1, 17, 16, False, True, 3),
])
def test_triton_pooled_probs_match_definition(heads, kv_heads, kv_len, bk, causal, mean, rows):
    q, k, pos = random_case(heads, kv_heads, 2, rows, 16, kv_len, seed=1)
    got = triton_kernels().pooled_block_probs_fwd(q, k, pos.to(torch.int32), bk, 0.3, causal, mean)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), pooled_definition(q, k, pos, bk, 0.3, causal, mean), atol=2e-6)


def seq_of(q, k, bq=16, bk=16, causal=True):
    return SeqContext(q.shape[0], k.shape[0], q.shape[1], bq, bk, causal, q.device, q, k, None)


@pytest.mark.parametrize("q_len,bq,stride", [(64, 16, 4), (37, 16, 4), (5, 16, 3), (1, 1, 4), (40, 8, 1)])
def test_strided_rows_keep_every_block_last_row(q_len, bq, stride):
    q = torch.zeros(q_len, 1, 4)
    k = torch.zeros(q_len + 10, 1, 4)
    rows, pos = strided_rows(seq_of(q, k, bq), stride)
    for i in range(rows.shape[0]):
        block = list(range(i * bq, min((i + 1) * bq, q_len)))
        kept = [int(r) for r in rows[i] if r >= 0]
        assert kept[0] == block[-1] and kept == block[::-1][::stride]
        assert all(int(p) == r + 10 for p, r in zip(pos[i], rows[i]) if r >= 0)


def test_blocks_for_mass():
    mass = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert blocks_for_mass(mass, torch.tensor([0.6, 0.6])).tolist() == [1, 3]
    assert blocks_for_mass(mass, torch.tensor([0.95, 1.0])).tolist() == [3, 4]


def test_head_proxy_rules_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(200, 6, 16, generator=g), torch.randn(200, 2, 16, generator=g)
    pattern = HeadProxy(gamma=(0.3, 0.5, 0.7, 0.9, 0.99, 1.0), min_budget=16)
    keep = pattern.build_mask(q_lens=200, kv_lens=200, num_heads=6, q_block_size=16, kv_block_size=16,
                              q=q, k=k).to_block_bool()[0]
    visible = torch.arange(13)[None, :] < causal_block_bounds(200, 200, 16, 16)[:, None]
    assert not bool((keep & ~visible).any())
    assert bool(keep[:, torch.arange(13), torch.arange(13)].all())  # the diagonal block
    budget = torch.tensor(pattern.stats["budget_tokens"]) // 16
    assert bool(keep[:, :, 0].all())  # the sink block
    count, limit = keep.sum(-1), visible.sum(-1)[None]
    assert bool((count >= torch.minimum(budget[:, None], limit)).all())  # the top b_h blocks ...
    assert bool((count <= torch.minimum(budget[:, None] + 2, limit)).all())  # ... the sink and the diagonal
    assert budget.tolist() == sorted(budget.tolist())  # larger gamma, larger budget
    assert pattern.stats["calls"] == 1 and pattern.stats["seconds"] > 0
    # Heads of one group rank blocks alike: the smaller budget's blocks are a subset of the larger one's.
    assert bool((keep[0] <= keep[1]).all()) and bool((keep[3] <= keep[4]).all())


def test_head_proxy_finds_a_planted_block_and_min_budget_makes_it_dense():
    g = torch.Generator().manual_seed(0)
    q, k = 0.1 * torch.randn(256, 4, 32, generator=g), 0.1 * torch.randn(256, 2, 32, generator=g)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    q[:, :2] += 6 * u  # heads 0-1 (KV group 0) all look for direction u ...
    k[70:74, 0] += 6 * u  # ... which four keys of KV block 4 hold
    sizes = dict(q_lens=256, kv_lens=256, num_heads=4, q_block_size=16, kv_block_size=16, q=q, k=k)
    keep = HeadProxy(gamma=0.9, min_budget=0).build_mask(**sizes).to_block_bool()[0]
    assert bool(keep[:2, 5:, 4].all())  # every later query block of heads 0-1 reads block 4
    assert int(keep[:2, 5:].sum(-1).max()) <= 3  # ... and, beside its sink and diagonal blocks, nothing else
    assert int(keep[2:, 8:].sum(-1).min()) > 4  # group 1 attends evenly: a large budget
    dense = HeadProxy(min_budget=256).build_mask(**sizes)
    assert dense.density() == pytest.approx(1.0)


def test_head_proxy_varlen_batch_and_chunked_queries():
    torch.manual_seed(1)
    q, k = torch.randn(40 + 9, 3, 16), torch.randn(100 + 60, 1, 16)
    pattern = HeadProxy(gamma=0.8, min_budget=0)
    common = dict(num_heads=3, q_block_size=16, kv_block_size=16)
    batch = pattern.build_mask(q_lens=[40, 9], kv_lens=[100, 60], q=q, k=k, **common).to_block_bool()
    first = pattern.build_mask(q_lens=40, kv_lens=100, q=q[:40], k=k[:100], **common).to_block_bool()[0]
    second = pattern.build_mask(q_lens=9, kv_lens=60, q=q[40:], k=k[100:], **common).to_block_bool()[0]
    assert torch.equal(batch[0], first)
    assert torch.equal(batch[1, :, :1, :4], second) and not bool(batch[1, :, 1:].any())


@needs_triton
def test_head_proxy_triton_and_cpu_select_the_same_blocks():
    torch.manual_seed(2)
    q, k = torch.randn(64, 6, 16), torch.randn(64, 2, 16)
    sizes = dict(q_lens=64, kv_lens=64, num_heads=6, q_block_size=16, kv_block_size=16, q=q, k=k)
    masks = [HeadProxy(gamma=0.9, min_budget=0, backend=b).build_mask(**sizes).to_block_bool() for b in ("cpu", "triton")]
    assert torch.equal(masks[0], masks[1])


def test_head_proxy_grouping_and_argument_errors():
    q, k = torch.randn(32, 4, 8), torch.randn(32, 4, 8)
    sizes = dict(q_lens=32, kv_lens=32, num_heads=4, q_block_size=16, kv_block_size=16, q=q, k=k)
    assert HeadProxy(kv_heads_per_group=2).build_mask(**sizes).kv_num_blocks.shape == (1, 4, 2)
    with pytest.raises(ValueError, match="kv_heads_per_group"):
        HeadProxy(kv_heads_per_group=3).build_mask(**sizes)
    with pytest.raises(ValueError, match="gamma has 2 values"):
        HeadProxy(gamma=(0.9, 0.9)).build_mask(**sizes)
    for bad in (dict(gamma=0.0), dict(gamma=1.5), dict(q_stride=0), dict(min_budget=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            HeadProxy(**bad)
    with pytest.raises(ValueError, match="content-aware"):
        HeadProxy().build_mask(q_lens=32, kv_lens=32, num_heads=4)


@pytest.mark.parametrize("kv_len", [64, 300, 1000])
def test_elastic_span_is_a_shape_with_a_growing_window(kv_len):
    pattern = ElasticSpan(alpha=32, beta=0.25, sink_tokens=8)
    span = round(32 + 0.25 * (kv_len - 32))
    assert pattern.span(kv_len) == span
    sizes = dict(q_lens=kv_len, kv_lens=kv_len, num_heads=1, q_block_size=16, kv_block_size=16)
    assert torch.equal(pattern.build_mask(**sizes).to_block_bool(), AShape(8, span).build_mask(**sizes).to_block_bool())
    with pytest.raises(ValueError, match="beta"):
        ElasticSpan(beta=1.5)


# ---------------------------------------------------------------------------------------------------- real attention
REAL_LAYERS = (2, 6, 10)


@pytest.fixture(scope="module")
def smollm2_qk():
    """Post-RoPE q/k of a few SmolLM2 layers on a ~4k-token licence text (the forward stops after the last one)."""
    from sparse_attn.models import load_smollm2, smollm2_gguf_path
    from sparse_attn.planner.calibrate import calibration_prompts, default_calibration_texts, recording_qk

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model, tokenizer = load_smollm2()
    ids = calibration_prompts(tokenizer, default_calibration_texts()[:1], 4096, 1)[0]
    captured = {}

    class Done(Exception):
        pass

    def on_layer(layer, q, k, v, scale):
        if layer in REAL_LAYERS:
            captured[layer] = (q[0].transpose(0, 1).clone(), k[0].transpose(0, 1).clone(), scale)
        if layer == max(REAL_LAYERS):
            raise Done

    with torch.no_grad(), recording_qk(model, on_layer):
        try:
            model(ids[None], use_cache=False)
        except Done:
            pass
    return captured


def recall_and_oracle(q, k, scale, keep, bq=64, n_blocks=6):
    """Attention mass the mask keeps and the most any mask with the same block counts could keep (exact block
    masses of sampled query blocks, the last one included)."""
    nq = keep.shape[1]
    blocks = torch.linspace(nq // 4, nq - 1, n_blocks).round().long().unique()
    rows = torch.cat([torch.arange(i * bq, min((i + 1) * bq, q.shape[0])) for i in blocks.tolist()])
    mass = pooled_block_probs(q[rows].transpose(0, 1)[:, :, None], k, rows[:, None], 64, scale, True, True,
                              backend="cpu")  # [H, rows, nk]
    row_block = rows // bq
    kept = (mass * keep[:, row_block]).sum(-1)
    count = keep[:, row_block].sum(-1, keepdim=True)
    ranked = mass.sort(-1, descending=True).values
    oracle = (ranked * (torch.arange(mass.shape[-1]) < count)).sum(-1)
    return kept.mean().item(), oracle.mean().item()


def test_estimators_recall_on_real_smollm2_attention(smollm2_qk):
    results = {}
    for layer, (q, k, scale) in smollm2_qk.items():
        seq = SeqContext(q.shape[0], k.shape[0], q.shape[1], 64, 64, True, q.device, q, k, scale)
        visible = seq.causal_keep()
        for name, pattern in (("proxy", HeadProxy(gamma=0.95, min_budget=256)),
                              ("vslash", VerticalSlash(vertical=128, slash=512, last_q=64))):
            keep = pattern.keep_blocks(seq) & visible
            keep = keep.expand(q.shape[1], -1, -1)
            recall, oracle = recall_and_oracle(q, k, scale, keep)
            density = (keep.sum() / (visible.sum() * q.shape[1])).item()
            results[(layer, name)] = (recall, oracle, density)
    for (layer, name), (recall, oracle, density) in results.items():
        assert recall <= oracle + 1e-6
        assert recall >= 0.97 * oracle, (layer, name, recall, oracle)  # near the best selection of that size
        assert density < 0.95, (layer, name, density)
    proxy = [results[(layer, "proxy")] for layer in REAL_LAYERS]
    assert sum(r for r, _, _ in proxy) / len(proxy) >= 0.93  # gamma 0.95 keeps about that much mass
    assert sum(d for _, _, d in proxy) / len(proxy) < 0.75


def test_head_proxy_budget_caps_fractions_and_options():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(320, 6, 16, generator=g), torch.randn(320, 2, 16, generator=g)
    sizes = dict(q_lens=320, kv_lens=320, num_heads=6, q_block_size=16, kv_block_size=16, q=q, k=k)
    visible = causal_block_bounds(320, 320, 16, 16)
    # gamma 1.0 wants every block; a cap of 48 tokens (3 blocks) holds each row to 3 + the sink and the diagonal.
    capped = HeadProxy(gamma=1.0, min_budget=16, max_budget=48).build_mask(**sizes).to_block_bool()[0]
    assert int(capped.sum(-1).max()) <= 5 and bool((capped.sum(-1) >= torch.clamp(visible, max=3)).all())
    # A float budget is a fraction of the context: 0.5 of 320 keys = 10 blocks at least.
    half = HeadProxy(gamma=0.01, min_budget=0.5).build_mask(**sizes).to_block_bool()[0]
    assert bool((half.sum(-1)[:, -1] >= 10).all())
    # Per-head proxies and other poolings keep the selection rules (sink, diagonal, causality).
    for options in ({"head_scores": True}, {"pooling": "mean"}, {"head_scores": True, "pooling": "mean"}):
        keep = HeadProxy(gamma=0.8, min_budget=16, **options).build_mask(**sizes).to_block_bool()[0]
        assert bool(keep[:, :, 0].all()) and bool(keep[:, torch.arange(20), torch.arange(20)].all()), options
        assert not bool((keep & ~(torch.arange(20)[None, :] < visible[:, None])).any()), options
    for bad, message in (({"pooling": "sum"}, "pooling"), ({"head_scores": 1}, "head_scores"),
                         ({"max_budget": 0}, "max_budget"), ({"min_budget": 64, "max_budget": 32}, "max_budget"),
                         ({"min_budget": 1.5}, "min_budget")):
        with pytest.raises(ValueError, match=message):
            HeadProxy(**bad)


def test_fixed_budgets_are_exact_per_head_and_skip_the_budget_pass():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(320, 6, 16, generator=g), torch.randn(320, 2, 16, generator=g)
    sizes = dict(q_lens=320, kv_lens=320, num_heads=6, q_block_size=16, kv_block_size=16, q=q, k=k)
    visible = causal_block_bounds(320, 320, 16, 16)
    # Per head: 1, 2, 3, 4 blocks as tokens, 1/4 of the context (5 blocks), 6 blocks: the minimum equals the cap.
    low = (16, 32, 48, 64, 0.25, 96)
    pattern = HeadProxy(gamma=0.5, min_budget=low, max_budget=low, head_scores=True, pooling="mean")
    seq = seq_of(q, k)
    scores, mass = pattern.estimate(seq)
    assert mass is None and scores.shape == (6, 20, 20)  # one proxy per query head, no gamma pass
    keep, budget = pattern.select(seq, scores, mass)
    assert budget.tolist() == [1, 2, 3, 4, 5, 6]
    top = torch.minimum(budget[:, None], visible[None])  # [H, nq]: the budget, or every visible block
    assert bool((keep.sum(-1) >= top).all()) and bool((keep.sum(-1) <= top + 2).all())
    assert torch.equal(pattern.build_mask(**sizes).to_block_bool()[0], keep)
    # The same density on any content: fixed budgets do not read the text.
    other = HeadProxy(gamma=0.5, min_budget=low, max_budget=low, head_scores=True, pooling="mean")
    q2, k2 = torch.randn(320, 6, 16, generator=g), torch.randn(320, 2, 16, generator=g)
    same_sizes_other_content = dict(sizes, q=q2, k=k2)
    assert other.build_mask(**same_sizes_other_content).density() == pytest.approx(
        pattern.build_mask(**sizes).density(), abs=0.01)
    with pytest.raises(ValueError, match="needs the masses"):
        HeadProxy(gamma=0.5, min_budget=16).select(seq, scores, None)
    with pytest.raises(ValueError, match="min_budget has 2 values"):
        HeadProxy(min_budget=(16, 32)).build_mask(**sizes)


def test_head_scores_equal_group_scores_when_groups_have_one_head():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(200, 3, 16, generator=g), torch.randn(200, 3, 16, generator=g)
    sizes = dict(q_lens=200, kv_lens=200, num_heads=3, q_block_size=16, kv_block_size=16, q=q, k=k)
    for pooling in ("max", "mean"):
        group = HeadProxy(gamma=0.8, min_budget=32, pooling=pooling).build_mask(**sizes).to_block_bool()
        per_head = HeadProxy(gamma=0.8, min_budget=32, pooling=pooling, head_scores=True)
        head = per_head.build_mask(**sizes).to_block_bool()
        assert torch.equal(group, head)
    # With 3 query heads per KV head the per-head proxies rank blocks differently from the group mean.
    q6 = torch.randn(200, 6, 16, generator=g)
    sizes6 = dict(sizes, num_heads=6, q=q6, k=k[:, :2])
    fixed = dict(gamma=1.0, min_budget=48, max_budget=48)
    assert not torch.equal(HeadProxy(**fixed).build_mask(**sizes6).to_block_bool(),
                           HeadProxy(**fixed, head_scores=True).build_mask(**sizes6).to_block_bool())


def test_dense_tail_reads_every_visible_block_for_the_last_rows(rng):
    """The query blocks holding the last ``dense_tail`` rows keep every causally visible block; the others keep their
    budget; the density grows by those block rows only."""
    gen, seed = rng
    q, k = torch.randn(1, 6, 1000, 32, generator=gen), torch.randn(1, 2, 1000, 32, generator=gen)
    base = SparseAttention(HeadProxy(min_budget=128, max_budget=128), dense_below=0).build_mask(q, k)
    tail = SparseAttention(HeadProxy(min_budget=128, max_budget=128, dense_tail=64), dense_below=0).build_mask(q, k)
    # 1000 rows in blocks of 64: the last 64 rows (936..999) lie in blocks 14 and 15, which see 15 and 16 blocks.
    assert tail.kv_num_blocks[0, :, 14:].tolist() == [[15, 16]] * 6, f"seed {seed}"
    assert torch.equal(tail.kv_num_blocks[0, :, :14], base.kv_num_blocks[0, :, :14]), f"seed {seed}"
    assert torch.equal(tail.to_block_bool()[0, :, :14], base.to_block_bool()[0, :, :14])
    with pytest.raises(ValueError, match="dense_tail"):
        HeadProxy(dense_tail=-1)


def test_gamma_budget_fitted_on_blocks_spread_over_the_prompt():
    """fit_blocks > 1 fits each head's budget on query blocks spread over the prompt, not only the last: a prompt
    whose last rows attend to one place while earlier rows spread their attention gets the budget the earlier rows
    need. fit_blocks=1 is the last block's rule, with its masses computed from all of that block's rows."""
    g = torch.Generator().manual_seed(11)
    length, dim, block = 320, 16, 16
    k = torch.randn(length, 1, dim, generator=g)
    k[3] *= 3
    q = torch.zeros(length, 2, dim)  # zero queries: uniform attention over every visible key
    q[-block:] = 10 * k[3]  # the last block's rows attend to key 3 (block 0) only
    seq = seq_of(q, k, block, block)
    assert HeadProxy().fit_block_ids(seq).tolist() == [19]
    assert HeadProxy(fit_blocks=4).fit_block_ids(seq).tolist() == [4, 9, 14, 19]
    assert HeadProxy(fit_blocks=50).fit_block_ids(seq).tolist() == list(range(20))
    budgets = {}
    for fit in (1, 4):
        pattern = HeadProxy(gamma=0.9, min_budget=16, fit_blocks=fit)
        scores, mass = pattern.estimate(seq)
        assert mass.shape == (2, min(fit, 20), 20)
        keep, budgets[fit] = pattern.select(seq, scores, mass)
        if fit == 1:  # the last block's masses, every row of it, against the float64 definition
            rows = torch.arange(length - block, length)
            want = pooled_definition(q[rows].transpose(0, 1)[:, None].double(), k.double(), rows[None], block,
                                     dim ** -0.5, True, True)[:, 0]
            torch.testing.assert_close(mass[:, 0].double(), want, atol=1e-5, rtol=1e-4)
    assert budgets[1].tolist() == [2, 2]  # the sink block holds all of the last rows' mass, plus the diagonal
    # Block 14 sees 15 blocks of equal mass: 90% of it takes 14 of them.
    assert budgets[4].tolist() == [14, 14]
    with pytest.raises(ValueError, match="fit_blocks"):
        HeadProxy(fit_blocks=0)
    with pytest.raises(ValueError, match="fitted query blocks"):
        HeadProxy(gamma=0.9, min_budget=16, fit_blocks=4).select(seq, scores, mass[:, :2])


needs_select_op = pytest.mark.skipif(not extension_available("select_blocks"), reason="needs the C++ extension")


def _random_selection_pattern(seed, g, heads, bk):
    """A HeadProxy for the selection tests: fixed per-head budgets (3 seeds in 4) or per-head gamma budgets, group or
    per-head proxies, mean or max pooling, dense tails of 0, 40 or 130 tokens."""
    options = dict(head_scores=seed % 2 == 0, pooling=("mean", "max")[seed % 2], dense_tail=(0, 40, 130)[seed % 3])
    if seed % 4:
        blocks = torch.randint(1, 12, (heads,), generator=g).tolist()
        return HeadProxy(gamma=1.0, min_budget=tuple(b * bk for b in blocks), max_budget=tuple(b * bk for b in blocks),
                         **options)
    return HeadProxy(gamma=tuple((0.5, 0.9)[h % 2] for h in range(heads)), min_budget=bk, fit_blocks=3, **options)


@needs_select_op
@pytest.mark.parametrize("seed", range(12))
def test_cpu_selection_equals_the_pytorch_selection(seed):
    """The C++ selection (CPU tensors, "cpu" backend) keeps exactly the blocks the PyTorch rule keeps, for fixed
    per-head budgets and gamma budgets, group and per-head proxies, causal and not, chunked queries, dense tails and
    query blocks of another size than the KV blocks."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = [(9, 3), (4, 4), (8, 2), (6, 1)][seed % 4]
    bq, bk = [(32, 32), (16, 16), (32, 16), (16, 32), (8, 24), (16, 16)][seed % 6]
    q_len = int(torch.randint(1, 400, (), generator=g))
    kv_len = q_len + (int(torch.randint(0, 200, (), generator=g)) if seed % 3 else 0)
    causal = seed % 5 != 4
    q, k = torch.randn(q_len, heads, 16, generator=g), torch.randn(kv_len, kv_heads, 16, generator=g)
    pattern = _random_selection_pattern(seed, g, heads, bk)
    seq = SeqContext(q_len, kv_len, heads, bq, bk, causal, torch.device("cpu"), q, k, None)
    scores, mass = pattern.estimate(seq)
    keep, budget = pattern.select(seq, scores, mass)
    object.__setattr__(pattern, "backend", "reference")  # the PyTorch rule
    expected, expected_budget = pattern.select(seq, scores, mass)
    assert torch.equal(budget, expected_budget)
    assert torch.equal(keep, expected)


@needs_select_op
def test_cpu_selection_breaks_ties_toward_the_lower_block_and_checks_its_inputs():
    from sparse_attn.ops.extension import select_blocks_cpu

    scores = torch.zeros(1, 2, 6)
    scores[0, 1, 4] = 1.0  # query block 1: block 4 first, then the equal blocks in order
    keep = select_blocks_cpu(scores, torch.tensor([3, 4]), torch.tensor([0, 0]), torch.tensor([3, 6]),
                             torch.tensor([2, 5]), tail_from=2)
    assert keep[0].tolist() == [[True, True, True, False, False, False], [True, False, False, False, True, True]]
    assert keep[1, 1].tolist() == [True, True, False, False, True, True]
    assert keep.sum().item() == 13
    everything = select_blocks_cpu(scores, torch.tensor([1]), torch.tensor([0]), torch.tensor([3, 6]),
                                   torch.tensor([2, 5]), tail_from=1)
    assert everything[0, 1].all() and everything[0, 0].tolist() == [True, False, True, False, False, False]
    with pytest.raises(RuntimeError, match="proxy_of_head"):
        select_blocks_cpu(scores, torch.tensor([1]), torch.tensor([1]), torch.tensor([3, 6]), torch.tensor([2, 5]), 2)
    with pytest.raises(RuntimeError, match="budgets"):
        select_blocks_cpu(scores, torch.tensor([0]), torch.tensor([0]), torch.tensor([3, 6]), torch.tensor([2, 5]), 2)
    with pytest.raises(RuntimeError, match="bounds"):
        select_blocks_cpu(scores, torch.tensor([1]), torch.tensor([0]), torch.tensor([3, 7]), torch.tensor([2, 5]), 2)
    with pytest.raises(RuntimeError, match="diag"):
        select_blocks_cpu(scores, torch.tensor([1]), torch.tensor([0]), torch.tensor([3, 6]), torch.tensor([2, 6]), 2)


@needs_select_op
@pytest.mark.parametrize("seed", range(12))
def test_block_rows_equal_the_compressed_boolean_selection(seed, monkeypatch):
    """build_mask's direct path (the C++ selection written as block rows) gives the mask the boolean path gives
    (keep_blocks, clipped causally, compressed): the same counts and ascending ids, padding zero, for ragged batches
    of chunked queries, a sequence wholly inside the dense tail (which takes the boolean path) among them."""
    from sparse_attn.masks import BlockSparseMask

    g = torch.Generator().manual_seed(1000 + seed)
    heads, kv_heads = [(9, 3), (4, 4), (8, 2), (6, 1)][seed % 4]
    bq, bk = [(32, 32), (16, 16), (32, 16), (16, 32), (8, 24), (16, 16)][seed % 6]
    causal = seed % 5 != 4
    q_lens = [int(torch.randint(1, 300, (), generator=g)) for _ in range(1 + seed % 3)]
    kv_lens = [n + (int(torch.randint(0, 150, (), generator=g)) if causal and seed % 2 else 0) for n in q_lens]
    if seed % 3 == 2:
        q_lens.append(3)  # three query rows, all in the dense tail
        kv_lens.append(90)
    q = torch.randn(sum(q_lens), heads, 16, generator=g)
    k = torch.randn(sum(kv_lens), kv_heads, 16, generator=g)
    pattern = _random_selection_pattern(seed, g, heads, bk)
    args = dict(q_lens=q_lens, kv_lens=kv_lens, num_heads=heads, q_block_size=bq, kv_block_size=bk, causal=causal,
                q=q, k=k)
    from sparse_attn.patterns import head_proxy

    direct = []
    op = head_proxy.select_block_rows_cpu
    monkeypatch.setattr(head_proxy, "select_block_rows_cpu", lambda *a: direct.append(1) or op(*a))
    mask = pattern.build_mask(**args)
    monkeypatch.undo()

    class BooleanOnly(HeadProxy):
        def block_rows(self, seq):
            return None

    expected = BooleanOnly(**{f: getattr(pattern, f) for f in ("gamma", "min_budget", "max_budget", "head_scores",
                                                                "pooling", "dense_tail", "fit_blocks")}).build_mask(**args)
    assert isinstance(expected, BlockSparseMask)
    width = max(mask.kv_indices.shape[-1], expected.kv_indices.shape[-1])
    pad = lambda m: torch.nn.functional.pad(m.kv_indices, (0, width - m.kv_indices.shape[-1]))  # noqa: E731
    counts = mask.kv_num_blocks.expand_as(expected.kv_num_blocks) if mask.kv_num_blocks.shape[1] == 1 else mask.kv_num_blocks
    assert torch.equal(counts, expected.kv_num_blocks.expand_as(counts))
    assert torch.equal(pad(mask).expand(*counts.shape, width), pad(expected).expand(*counts.shape, width))
    mask.validate(check_values=True)
    tail = pattern.dense_tail
    assert len(direct) == sum(1 for n, m in zip(q_lens, kv_lens) if not tail or m - n + min(n, bq) - 1 < m - tail)


@needs_select_op
@pytest.mark.parametrize("causal", [True, False])
def test_per_head_block_rows_equal_the_boolean_path(causal):
    """A plan's mixed layer (PerHead: head proxies with their own rows, Dense and A-shape heads compressed from their
    keep_blocks) builds the mask the boolean path builds."""
    from sparse_attn import Dense, PerHead

    class BooleanPerHead(PerHead):
        def block_rows(self, seq):
            return None

    g = torch.Generator().manual_seed(7)
    proxy = HeadProxy(gamma=1.0, min_budget=0.25, max_budget=0.25, head_scores=True, pooling="mean", dense_tail=40)
    group = HeadProxy(gamma=1.0, min_budget=64, max_budget=64)
    heads = (proxy, Dense(), proxy, AShape(16, 32), group, proxy)
    q_lens, kv_lens = [200, 77], [260, 77 if causal else 120]
    q, k = torch.randn(sum(q_lens), 6, 16, generator=g), torch.randn(sum(kv_lens), 2, 16, generator=g)
    args = dict(q_lens=q_lens, kv_lens=kv_lens, num_heads=6, q_block_size=16, kv_block_size=16, causal=causal, q=q, k=k)
    mask, expected = PerHead(heads).build_mask(**args), BooleanPerHead(heads).build_mask(**args)
    assert torch.equal(mask.to_block_bool(), expected.to_block_bool())
    assert torch.equal(mask.kv_num_blocks, expected.kv_num_blocks)
    mask.validate(check_values=True)
