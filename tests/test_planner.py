"""The planner: budgeted choice, the JSON plan (round trip, schema errors, model checks), calibration on a tiny
transformers model, the command line and rendering."""

import itertools
import json

import pytest
import torch

from sparse_attn import AShape, Dense, HeadProxy, PerHead, VerticalSlash
from sparse_attn.planner import HeadSetting, ModelShape, Plan, PlanError, load_plan
from sparse_attn.planner.calibrate import Candidate, Profile, profile_layer
from sparse_attn.planner.decode import DecodeCandidates
from sparse_attn.planner.cli import main as cli_main
from sparse_attn.planner.solver import KernelTimeModel, choose, make_plan
from backends import set_field

SHAPE = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


# ---------------------------------------------------------------------------------------------------- solver
def brute_force(recall, cost, budget):
    r, c = recall.tolist(), cost.tolist()
    best = None
    for pick in itertools.product(*(range(len(row)) for row in r)):
        spent = sum(c[u][i] for u, i in enumerate(pick)) / len(pick)
        value = sum(r[u][i] for u, i in enumerate(pick))
        if spent <= budget + 1e-6 and (best is None or value > best):
            best = value
    return best


@pytest.mark.parametrize("seed", range(6))
def test_choose_keeps_the_budget_and_nears_the_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    units, options = 5, 4
    cost = torch.rand(units, options, generator=g)
    recall = torch.rand(units, options, generator=g)
    budget = float(cost.min(1).values.mean() + 0.5 * (cost.max(1).values.mean() - cost.min(1).values.mean()))
    pick = choose(recall, cost, budget)
    assert float(cost.gather(1, pick[:, None]).mean()) <= budget + 1e-9
    got = float(recall.gather(1, pick[:, None]).sum())
    assert got >= 0.9 * brute_force(recall, cost, budget)


def test_choose_limits():
    recall = torch.tensor([[0.5, 0.9, 1.0], [0.2, 0.95, 1.0]])
    cost = torch.tensor([[0.1, 0.3, 1.0], [0.1, 0.2, 1.0]])
    assert choose(recall, cost, 1.0).tolist() == [2, 2]  # everything fits: the best option each
    assert choose(recall, cost, 0.1).tolist() == [0, 0]  # only the cheapest fit
    assert choose(recall, cost, 0.25).tolist() == [1, 1]  # the best gains per cost first
    allowed = torch.tensor([[True, False, True], [True, True, True]])
    assert choose(recall, cost, 0.25, allowed).tolist() == [0, 1]
    with pytest.raises(ValueError, match="cheapest"):
        choose(recall, cost, 0.05)


def synthetic_profile(layers=2, heads=4):
    candidates = [Candidate.of("Dense"), Candidate.of("AShape", sink_tokens=16, local_tokens=32),
                  Candidate.of("HeadProxy", gamma=0.9, min_budget=16), Candidate.of("VerticalSlash", vertical=8, slash=16, last_q=16)]
    g = torch.Generator().manual_seed(0)
    density = torch.stack([torch.ones(layers, heads), 0.2 + 0.1 * torch.rand(layers, heads, generator=g),
                           0.3 + 0.2 * torch.rand(layers, heads, generator=g), 0.4 + 0.2 * torch.rand(layers, heads, generator=g)], 1)
    recall = torch.stack([torch.ones(layers, heads), 0.5 + 0.4 * torch.rand(layers, heads, generator=g),
                          0.8 + 0.15 * torch.rand(layers, heads, generator=g), 0.7 + 0.2 * torch.rand(layers, heads, generator=g)], 1)
    shape = ModelShape(layers, heads, heads // 2, 16)
    return Profile("tiny", shape, candidates, recall, density, 16, 16, {"context_lens": [256], "prompts": 1})


@pytest.mark.parametrize("target", [0.25, 0.4, 0.6, 1.0])
def test_make_plan_keeps_the_density_budget(target):
    plan = make_plan(synthetic_profile(), target_density=target)
    assert plan.mean("density") <= target + 1e-6
    assert plan.budget["target_density"] == target
    looser = make_plan(synthetic_profile(), target_density=min(1.0, target + 0.2))
    assert looser.mean("recall") >= plan.mean("recall") - 1e-9


def test_make_plan_floors_head_proxy_budgets():
    """HeadProxy heads read at least ``min_keys`` keys per query block at run time (their calibrated floor where
    that is larger, 0 keeps it); other patterns and the measured density, recall and error are left as calibrated."""
    profile = synthetic_profile()
    for min_keys, want in ((1024, 1024), (8, 16), (0, 16)):
        plan = make_plan(profile, target_density=0.6, min_keys=min_keys)
        proxies = [s for layer in plan.heads for s in layer if s.pattern == "HeadProxy"]
        assert proxies, "the budget leaves room for HeadProxy heads"
        assert all(s.params["min_budget"] == want for s in proxies)
        assert plan.budget["min_keys"] == min_keys
        assert all(s.params == dict(profile.candidates[1].params) for layer in plan.heads for s in layer
                   if s.pattern == "AShape")
    assert make_plan(profile, target_density=0.6).budget["min_keys"] == 1024
    profile.candidates[2] = Candidate.of("HeadProxy", gamma=0.9)  # no floor of its own: HeadProxy's default, 2048
    assert {s.params["min_budget"] for layer in make_plan(profile, target_density=0.6).heads for s in layer
            if s.pattern == "HeadProxy"} == {2048}
    profile = synthetic_profile()
    loose = make_plan(profile, target_density=0.6, min_keys=0)
    assert [[s.density for s in layer] for layer in plan.heads] == [[s.density for s in layer] for layer in loose.heads]
    with pytest.raises(ValueError, match="min_keys"):
        make_plan(profile, target_density=0.6, min_keys=-1)


def test_make_plan_time_budget_and_pattern_limit():
    profile = synthetic_profile()
    plan = make_plan(profile, target_time=0.5)
    model = KernelTimeModel()
    costs = [model.cost(Candidate(s.pattern, tuple(sorted(s.params.items()))), torch.tensor(s.density), 2, 16, 256)
             for layer in plan.heads for s in layer]
    assert float(sum(costs)) / len(costs) <= 0.5 + 1e-6
    static = make_plan(profile, target_density=0.5, patterns=["AShape"])
    assert set(static.pattern_counts()) <= {"AShape", "Dense"}
    with pytest.raises(ValueError, match="exactly one"):
        make_plan(profile, target_density=0.3, target_time=0.3)
    with pytest.raises(ValueError, match="cheapest"):
        make_plan(profile, target_density=0.05)


# ---------------------------------------------------------------------------------------------------- plan format
def example_plan() -> Plan:
    heads = [
        [HeadSetting("HeadProxy", {"gamma": 0.9, "min_budget": 32}, 0.3, 0.95),
         HeadSetting("HeadProxy", {"gamma": 0.95, "min_budget": 32}, 0.4, 0.97),
         HeadSetting("AShape", {"sink_tokens": 16, "local_tokens": 32}, 0.2, 0.9),
         HeadSetting("VerticalSlash", {"vertical": 8, "slash": 16, "last_q": 16}, 0.5, 0.99)],
        [HeadSetting("Dense", {}, 1.0, 1.0)] * 4,
    ]
    decode = [{"double_sparsity": {"r": 4, "budget_fraction": 0.125, "channels": [[3, 1, 0, 7], [15, 2, 9, 4]],
                                   "error": 0.05},
               "kv_pruning": {"sparsity": 0.5}}, None]
    return Plan("tiny-model", SHAPE, heads, 16, 16, {"target_density": 0.5}, {"prompts": 1}, decode=decode)


def test_plan_round_trip(tmp_path):
    plan = example_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = load_plan(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded == plan
    data = json.loads(path.read_text())
    assert data["format"] == "sparse-attn-plan" and data["version"] == 1
    assert "decode" in data["layers"][0] and "decode" not in data["layers"][1]
    config, channels = loaded.double_sparsity(0, dense_below=0)
    assert (config.r, config.budget_fraction, config.dense_below) == (4, 0.125, 0)
    assert channels.tolist() == [[3, 1, 0, 7], [15, 2, 9, 4]]
    assert loaded.kv_pruning(0).sparsity == 0.5
    assert loaded.double_sparsity(1) is None and loaded.kv_pruning(1) is None
    assert data["model"] == {"id": "tiny-model", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    assert data["summary"]["density"] == pytest.approx((0.3 + 0.4 + 0.2 + 0.5 + 4) / 8)


def test_plan_to_patterns_builds_the_chosen_masks():
    patterns = example_plan().to_patterns()
    assert isinstance(patterns[1], Dense)
    layer = patterns[0]
    assert isinstance(layer, PerHead)
    proxy = layer.patterns[0]
    assert proxy is layer.patterns[1] and proxy.gamma == (0.9, 0.95, 1.0, 1.0)  # one shared estimate
    torch.manual_seed(0)
    q, k = torch.randn(160, 4, 16), torch.randn(160, 2, 16)
    sizes = dict(q_lens=160, kv_lens=160, num_heads=4, q_block_size=16, kv_block_size=16, q=q, k=k)
    got = layer.build_mask(**sizes).to_block_bool()[0]
    expected = [HeadProxy(gamma=0.9, min_budget=32), HeadProxy(gamma=0.95, min_budget=32),
                AShape(16, 32), VerticalSlash(vertical=8, slash=16, last_q=16)]
    for h, pattern in enumerate(expected):
        assert torch.equal(got[h], pattern.build_mask(**sizes).to_block_bool()[0, min(h, pattern.build_mask(**sizes).heads - 1)])


class FakeConfig:
    def __init__(self, layers=2, heads=4, kv_heads=2, hidden=64):
        self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads = layers, heads, kv_heads
        self.hidden_size = hidden


def test_plan_checks_the_model(tmp_path):
    plan = example_plan()
    plan.check_model(FakeConfig())
    with pytest.raises(PlanError, match=r"num_heads: plan 4, model 8") as error:
        plan.check_model(FakeConfig(heads=8, hidden=128))
    assert "tiny-model" in str(error.value)
    with pytest.raises(PlanError, match=r"num_layers: plan 2, model 3.*num_kv_heads: plan 2, model 1"):
        plan.check_model(FakeConfig(layers=3, kv_heads=1))
    with pytest.raises(PlanError, match="head_dim: plan 16, model 32"):
        plan.check_model(FakeConfig(hidden=128))
    plan.save(tmp_path / "p.json")
    with pytest.raises(PlanError, match="num_heads"):
        load_plan(tmp_path / "p.json", FakeConfig(heads=8, hidden=128))


@pytest.mark.parametrize("path,value,message", [
    (("format",), "other", "format"),
    (("version",), 99, "version"),
    (("version",), "1", "version: expected int"),
    (("model", "num_heads"), KeyError, "model.num_heads: missing"),
    (("model", "num_kv_heads"), 3, "num_kv_heads"),
    (("layers",), [], "layers: 0 entries"),
    (("layers", 0, "heads"), [], r"layers\[0\].heads: 0 entries"),
    (("layers", 1, "heads", 2, "pattern"), "Nope", r"layers\[1\].heads\[2\]: unknown pattern 'Nope'"),
    (("layers", 0, "heads", 0, "params"), {"gamma": 2.0}, r"layers\[0\].heads\[0\].params: invalid HeadProxy"),
    (("layers", 0, "heads", 2, "params"), {"window": 3}, r"layers\[0\].heads\[2\].params: AShape has no parameter"),
    (("layers", 0, "heads", 1, "density"), 1.5, r"layers\[0\].heads\[1\].density"),
    (("blocks", "kv"), 0, "blocks.kv"),
    (("layers", 0, "decode", "double_sparsity", "r"), 17, r"layers\[0\].decode.double_sparsity.r"),
    (("layers", 0, "decode", "double_sparsity", "channels"), [[1, 2, 3, 4]], r"channels: 1 rows but"),
    (("layers", 0, "decode", "double_sparsity", "channels", 1), [1, 1, 2, 3], r"channels\[1\]: expected 4 distinct"),
    (("layers", 0, "decode", "kv_pruning", "sparsity"), 1.0, r"kv_pruning.sparsity"),
    (("layers", 0, "decode", "quest"), {}, "unknown decode method"),
])
def test_plan_schema_errors_name_the_field(tmp_path, path, value, message):
    file = tmp_path / "plan.json"
    data = set_field(example_plan().to_dict(), path, value)
    file.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        load_plan(file)


def test_truncated_corrupt_and_missing_plan_files(tmp_path):
    file = tmp_path / "plan.json"
    example_plan().save(file)
    text = file.read_text()
    file.write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="truncated"):
        load_plan(file)
    file.write_text(text.replace('"layers"', '"layers" "', 1))
    with pytest.raises(PlanError, match="not valid JSON at line"):
        load_plan(file)
    file.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(PlanError, match="corrupt"):
        load_plan(file)
    file.write_text("")
    with pytest.raises(PlanError, match="empty"):
        load_plan(file)
    file.write_text("[1, 2]")
    with pytest.raises(PlanError, match="plan: expected dict"):
        load_plan(file)
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------- calibration
def test_profile_layer_measures_recall_and_density():
    torch.manual_seed(0)
    q, k = torch.randn(200, 4, 16), torch.randn(200, 2, 16)
    candidates = [Candidate.of("Dense"), Candidate.of("AShape", sink_tokens=16, local_tokens=16),
                  Candidate.of("HeadProxy", gamma=0.5, min_budget=0), Candidate.of("HeadProxy", gamma=0.8, min_budget=0)]
    v = torch.randn(200, 2, 16)
    measured = profile_layer(q, k, candidates, v, q_block_size=16, kv_block_size=16, query_rows=64)
    recall, density, error = measured["recall"], measured["density"], measured["error"]
    assert torch.allclose(recall[0], torch.ones(4)) and torch.allclose(density[0], torch.ones(4))
    assert torch.allclose(error[0], torch.zeros(4), atol=1e-5)
    assert bool((recall[1:] < 1).all()) and bool((density[1:] < 1).all()) and bool((error[1:] > 0.01).all())
    assert bool((recall[2] < recall[3]).all()) and bool((density[2] < density[3]).all())
    assert bool((error[2] > error[3]).all())
    visible = 13 * 14 // 2
    assert torch.allclose(density[1], torch.full((4,), (13 + 12 + 11) / visible))  # sink, diagonal, one before
    assert "error" not in profile_layer(q, k, candidates[:1], q_block_size=16, kv_block_size=16)


def test_head_proxy_candidates_are_measured_without_their_dense_tail():
    """A dense tail makes every HeadProxy candidate exact on the last query block (half of the objective): the
    profiler measures the selection there instead (recall, error and density), while the candidate runs with it."""
    from sparse_attn.planner.calibrate import candidate_keeps

    torch.manual_seed(2)
    q, k, v = torch.randn(256, 2, 16), torch.randn(256, 1, 16), torch.randn(256, 1, 16)
    with_tail = Candidate.of("HeadProxy", gamma=1.0, max_budget=0.25, min_budget=16, dense_tail=32)
    without = Candidate.of("HeadProxy", gamma=1.0, max_budget=0.25, min_budget=16)
    sizes = dict(q_block_size=16, kv_block_size=16)
    selected = candidate_keeps(q, k, [with_tail, without], tails=False, **sizes)
    assert torch.equal(selected[0], selected[1]) and not bool(selected[0][:, -1].all())
    run = candidate_keeps(q, k, [with_tail, without], **sizes)
    visible = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(run[0][:, -2:], visible[-2:].expand(2, -1, -1))  # 32 tail rows: two query blocks in full
    assert torch.equal(run[0][:, :-2], run[1][:, :-2])
    runtime = with_tail.build().build_mask(q_lens=256, kv_lens=256, num_heads=2, q=q, k=k, **sizes)
    measured = profile_layer(q, k, [with_tail, without], v, query_rows=64, **sizes)
    assert torch.equal(measured["error"][0], measured["error"][1])
    assert torch.equal(measured["recall"][0], measured["recall"][1])
    assert torch.equal(measured["density"][0], measured["density"][1])
    assert runtime.density() > float(measured["density"][0].mean()) + 0.05  # the tail's two block rows read in full


def test_output_error_matches_sparse_attention():
    """The profiler's output error is the error of block-sparse attention through the real op."""
    from sparse_attn import block_sparse_attention, dense_attention

    torch.manual_seed(1)
    q, k, v = torch.randn(96, 2, 16), torch.randn(96, 1, 16), torch.randn(96, 1, 16)
    candidate = Candidate.of("AShape", sink_tokens=16, local_tokens=16)
    error = profile_layer(q, k, [candidate], v, q_block_size=16, kv_block_size=16, query_rows=1000)["error"][0]
    mask = candidate.build().build_mask(q_lens=96, kv_lens=96, num_heads=2, q_block_size=16, kv_block_size=16)
    as_bhsd = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    sparse = block_sparse_attention(as_bhsd(q), as_bhsd(k), as_bhsd(v), mask, backend="reference")[0]
    dense = dense_attention(as_bhsd(q), as_bhsd(k), as_bhsd(v), causal=True, scale=16 ** -0.5)[0]
    rows_error = (sparse - dense).norm(dim=-1) / dense.norm(dim=-1)  # [H, 96]
    expected = (rows_error[:, :80].mean(1) + rows_error[:, 80:].mean(1)) / 2  # spread rows and last block alike
    assert torch.allclose(error, expected, atol=1e-4)


def test_decode_profile_limits():
    from sparse_attn.planner.decode import DecodeCandidates, heavy_channel_ranking, profile_decode

    torch.manual_seed(0)
    q, k, v = torch.randn(300, 4, 16), torch.randn(300, 2, 16), torch.randn(300, 2, 16)
    rows = torch.arange(280, 300)
    candidates = DecodeCandidates(double_sparsity=((16, 1.0), (4, 0.3)), kv_pruning=(0.0, 0.75))
    measured = profile_decode(q, k, v, rows, heavy_channel_ranking(q, k), candidates, 0.25)
    assert torch.allclose(measured["ds_recall"][0], torch.ones(4)) and float(measured["ds_error"][0].max()) < 1e-5
    assert float(measured["ds_read"][0]) == pytest.approx(1.0)
    from sparse_attn.decode import DoubleSparsityConfig

    config = DoubleSparsityConfig(r=4, budget_fraction=0.3, dense_below=0)
    read = sum(config.token_budget(int(r) + 1) / (int(r) + 1) for r in rows) / len(rows)  # the runtime's budget rule
    assert bool((measured["ds_recall"][1] < 1).all()) and float(measured["ds_read"][1]) == pytest.approx(read)
    assert float(measured["prune_error"][0].max()) < 1e-5 and bool((measured["prune_error"][1] > 0.05).all())


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_calibrate_a_transformers_model_and_plan(tiny_llama, tmp_path):
    from sparse_attn.planner.calibrate import calibrate

    candidates = [Candidate.of("Dense"), Candidate.of("AShape", sink_tokens=16, local_tokens=32),
                  Candidate.of("HeadProxy", gamma=0.9, min_budget=16)]
    prompts = [torch.randint(0, 64, (192,)), torch.randint(0, 64, (160,))]
    before = tiny_llama.config._attn_implementation
    with torch.no_grad():
        reference = tiny_llama(prompts[0][None]).logits
    profile = calibrate(tiny_llama, prompts, candidates, q_block_size=16, kv_block_size=16, query_rows=32,
                        progress=False)
    assert tiny_llama.config._attn_implementation == before
    with torch.no_grad():
        assert torch.allclose(tiny_llama(prompts[0][None]).logits, reference)
    assert profile.shape == ModelShape(2, 4, 2, 16)
    assert profile.recall.shape == (2, 3, 4) and profile.error.shape == (2, 3, 4) and profile.info["prompts"] == 2
    assert torch.allclose(profile.recall[:, 0], torch.ones(2, 4))
    assert bool((profile.recall <= 1 + 1e-6).all()) and bool((profile.density[:, 1:] < 1).all())

    profile.save(tmp_path / "profile.pt")
    again = Profile.load(tmp_path / "profile.pt")
    assert again.candidates == profile.candidates and torch.equal(again.error, profile.error)
    decode = again.decode
    settings = len(DecodeCandidates().double_sparsity)
    assert decode["ds_error"].shape == (2, settings, 4) and decode["prune_error"].shape == (2, 2, 4)
    assert decode["channels"].shape == (2, 2, 16)
    assert bool((decode["ds_recall"] <= 1 + 1e-6).all()) and bool((decode["prune_error"] > 0).all())
    plan = make_plan(again, target_density=0.6, kv_budget=0.5)
    assert plan.mean("density") <= 0.6
    assert all(d is not None and d["kv_pruning"]["sparsity"] >= 0.5 for d in plan.decode)  # only pruning fits 0.5
    plan.check_model(tiny_llama)

    import sparse_attn

    sparse_attn.configure(tiny_llama, layers=plan.to_patterns(), q_block_size=16, kv_block_size=16, dense_below=0)
    with torch.no_grad():
        sparse = tiny_llama(prompts[0][None]).logits
    assert sparse.shape == reference.shape and bool(torch.isfinite(sparse).all())


# ---------------------------------------------------------------------------------------------------- command line
def test_cli_solve_render_show(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    synthetic_profile().save(tmp_path / "profile.pt")
    plan_file, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert cli_main(["solve", "--profile", str(tmp_path / "profile.pt"), "--target-density", "0.4",
                     "--out", str(plan_file)]) == 0
    plan = load_plan(plan_file)
    assert plan.mean("density") <= 0.4
    assert cli_main(["render", str(plan_file), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert cli_main(["show", str(plan_file)]) == 0
    assert "layer   1:" in capsys.readouterr().out
    plan_file.write_text(plan_file.read_text()[:100])
    assert cli_main(["render", str(plan_file), "--out", str(png)]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("adaptive", [False, True])
def test_cli_calibrate_with_a_model_folder(tmp_path, tiny_llama, monkeypatch, capsys, adaptive):
    from sparse_attn.planner import cli

    class Tokenizer:
        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.tensor([[ord(c) % 64 for c in text]])}

    monkeypatch.setattr(cli, "load_model", lambda spec, dtype, device: (tiny_llama, Tokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("calibration text " * 40)
    out = tmp_path / "plan.json"
    assert cli_main(["calibrate", "--model", "tiny", "--out", str(out), "--target-density", "0.9",
                     "--text", str(text), "--context-len", "512", "--prompts", "1", "--block-size", "16",
                     "--no-progress", "--model-id", "tiny-llama"] + ["--adaptive"] * adaptive) == 0
    plan = load_plan(out, tiny_llama)
    assert plan.model_id == "tiny-llama" and plan.mean("density") <= 0.9
    offered = {label.split("(")[0] for label in plan.calibration["candidates"]}
    assert ({"AShape", "VerticalSlash"} <= offered) == adaptive
    assert "wrote" in capsys.readouterr().out


def test_heads_differing_in_budget_rules_share_one_head_proxy():
    fixed = {"gamma": 1.0, "head_scores": True, "pooling": "mean"}
    settings = [HeadSetting("HeadProxy", dict(fixed, min_budget=0.25, max_budget=0.25)),
                HeadSetting("HeadProxy", dict(fixed, min_budget=32, max_budget=32)),
                HeadSetting("AShape", {"sink_tokens": 16, "local_tokens": 32}),
                HeadSetting("HeadProxy", dict(fixed, gamma=0.9, min_budget=16))]
    plan = Plan("tiny-model", SHAPE, [settings, [HeadSetting("Dense")] * 4], 16, 16)
    layer = plan.to_patterns()[0]
    proxy = layer.patterns[0]
    assert proxy is layer.patterns[1] is layer.patterns[3]  # one estimate for the layer
    assert proxy.min_budget == (0.25, 32, 0.25, 16) and proxy.max_budget == (0.25, 32, 0.25, None)
    assert proxy.gamma == (1.0, 1.0, 1.0, 0.9)
    torch.manual_seed(0)
    q, k = torch.randn(160, 4, 16), torch.randn(160, 2, 16)
    sizes = dict(q_lens=160, kv_lens=160, num_heads=4, q_block_size=16, kv_block_size=16, q=q, k=k)
    got = layer.build_mask(**sizes).to_block_bool()[0]
    for h in (0, 1, 3):
        alone = HeadProxy(**{name: value for name, value in settings[h].params.items()}).build_mask(**sizes)
        assert torch.equal(got[h], alone.to_block_bool()[0, h])


def test_default_candidates_have_content_independent_densities():
    """The density a plan is solved for is the density it runs at, whatever the text."""
    from sparse_attn.planner.calibrate import default_candidates

    candidates = default_candidates()
    assert {c.pattern for c in candidates} == {"Dense", "ElasticSpan", "HeadProxy"}
    g = torch.Generator().manual_seed(0)
    sizes = dict(q_block_size=16, kv_block_size=16, query_rows=32)
    densities = []
    for _ in range(2):
        q, k, v = (torch.randn(1024, h, 16, generator=g) for h in (4, 2, 2))
        densities.append(profile_layer(q, k, candidates, v, **sizes)["density"])
    assert torch.equal(densities[0], densities[1])
    assert bool((densities[0][1:] < 1).all()) and bool((densities[0][0] == 1).all())
    # Budgets are fractions of the context over a token floor (calibration measures them without their dense tail):
    # twice the length never reads a larger share beyond block rounding, and the largest fractions (above the floor
    # at both lengths) about the same one.
    q, k, v = (torch.randn(2048, h, 16, generator=g) for h in (4, 2, 2))
    longer = profile_layer(q, k, candidates, v, **sizes)["density"]
    proxies = torch.tensor([c.pattern == "HeadProxy" for c in candidates])
    assert bool((longer[proxies] <= densities[0][proxies] + 0.005).all())
    assert bool((longer[proxies] < densities[0][proxies] - 0.1).any())  # where the floor binds at the shorter one
    large = torch.tensor([c.pattern == "HeadProxy" and dict(c.params)["max_budget"] >= 0.5 for c in candidates])
    assert torch.allclose(longer[large], densities[0][large], atol=0.08)


def test_time_model_charges_per_head_proxies_and_the_gamma_pass():
    model = KernelTimeModel()
    density = torch.tensor(0.2)
    group = model.cost(Candidate.of("HeadProxy", gamma=1.0, min_budget=0.1, max_budget=0.1), density, 3, 64, 4096)
    per_head = model.cost(Candidate.of("HeadProxy", gamma=1.0, min_budget=0.1, max_budget=0.1, head_scores=True),
                          density, 3, 64, 4096)
    adaptive = model.cost(Candidate.of("HeadProxy", gamma=0.9, min_budget=256), density, 3, 64, 4096)
    assert float(group) == pytest.approx(0.2 + 0.5 / 4 / 3)
    assert float(per_head) == pytest.approx(0.2 + 0.5 / 4)
    assert float(adaptive) == pytest.approx(0.2 + 0.5 / 4 / 3 + 0.5 * 64 / 4096)
