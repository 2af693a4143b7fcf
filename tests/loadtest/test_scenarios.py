"""Scenario files, overrides, adapter discovery and the open-loop sampler's statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest.scenarios import (
    WORDS,
    Scenario,
    ScenarioError,
    Workload,
    available_scenarios,
    gamma_intervals,
    load_scenario,
    parse_override,
    popularity_probs,
    resolve_adapters,
    sample_adapter_indices,
    synth_prompt,
)

DEMO = ["uppercase", "signoff", "pirate"]


def test_shipped_scenarios_load_in_both_profiles():
    names = available_scenarios()
    assert {"chat", "s1", "s2", "smoke"} <= set(names)
    for name in names:
        cpu = load_scenario(name)
        assert cpu.name == name
        if cpu.paper:
            paper = load_scenario(name, "paper")
            assert paper.rate >= cpu.rate
            assert paper.input_len[1] >= cpu.input_len[1]


def test_paper_values_of_s1_s2():
    for name, ranks in (("s1", (8,)), ("s2", (64, 32, 16, 8))):
        s = load_scenario(name, "paper")
        assert (s.num_adapters, s.alpha, s.rate, s.cv) == (200, 1.0, 2.0, 1.0)
        assert s.input_len == (8, 512) and s.output_len == (8, 512)
        assert s.adapter_ranks == ranks and s.popularity == "power"


def test_chat_lengths_center_on_85_in():
    s = load_scenario("chat")
    assert sum(s.input_len) / 2 == 85
    paper = load_scenario("chat", "paper")
    assert sum(paper.input_len) / 2 == 85 and sum(paper.output_len) / 2 == 165


def test_overrides_and_their_errors():
    s = load_scenario("chat", overrides=["rate=2", "input_len=[4, 8]", "protocol=http",
                                         "ignore_eos=false"])
    assert (s.rate, s.input_len, s.protocol, s.ignore_eos) == (2.0, (4, 8), "http", False)
    assert parse_override("adapter_dir=/tmp/x") == ("adapter_dir", "/tmp/x")
    with pytest.raises(ScenarioError, match="unknown key 'rat'"):
        load_scenario("chat", overrides=["rat=2"])
    with pytest.raises(ScenarioError, match="rate must be a number > 0"):
        load_scenario("chat", overrides={"rate": 0})
    with pytest.raises(ScenarioError, match="input_len"):
        load_scenario("chat", overrides={"input_len": [9, 3]})
    with pytest.raises(ScenarioError, match="protocol"):
        load_scenario("chat", overrides={"protocol": "udp"})
    with pytest.raises(ScenarioError, match="num_adapters = 5 but only 3"):
        load_scenario("chat", overrides={"num_adapters": 5})
    with pytest.raises(ScenarioError, match="no scenario 'nope'"):
        load_scenario("nope")
    with pytest.raises(ScenarioError, match="no \\[paper\\] table"):
        load_scenario("smoke", "paper")


def test_scenario_file_by_path_roundtrip(tmp_path):
    s = load_scenario("s2", "paper", {"rate": 3})
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(s.to_dict()))
    assert load_scenario(path) == s


def _adapter(root, name, rank):
    (root / name).mkdir()
    (root / name / "adapter_config.json").write_text(json.dumps({"r": rank}))


def test_adapter_dir_scan_interleaves_ranks(tmp_path):
    for i in range(3):
        for r in (8, 16, 32, 64):
            _adapter(tmp_path, f"a{i}-r{r}", r)
    (tmp_path / "not-an-adapter").mkdir()
    s = Scenario(name="t", adapter_dir=str(tmp_path), adapter_ranks=(64, 32, 16, 8),
                 num_adapters=6)
    assert resolve_adapters(s) == ["a0-r64", "a0-r32", "a0-r16", "a0-r8", "a1-r64", "a1-r32"]
    only8 = Scenario(name="t", adapter_dir=str(tmp_path), adapter_ranks=(8,), num_adapters=3)
    assert resolve_adapters(only8) == ["a0-r8", "a1-r8", "a2-r8"]
    every = Scenario(name="t", adapter_dir=str(tmp_path), num_adapters=12)
    assert len(set(resolve_adapters(every))) == 12
    with pytest.raises(ScenarioError, match="wants 4 adapters of ranks \\[8\\].*holds 3"):
        resolve_adapters(Scenario(name="t", adapter_dir=str(tmp_path), adapter_ranks=(8,),
                                  num_adapters=4))
    with pytest.raises(ScenarioError, match="does not exist"):
        resolve_adapters(Scenario(name="t", adapter_dir=str(tmp_path / "x"), num_adapters=1))


def test_gamma_intervals_have_the_asked_mean_and_cv():
    rng = np.random.default_rng(1)
    for rate, cv in ((2.0, 1.0), (0.5, 2.0), (10.0, 0.5), (1.0, 4.0)):
        x = gamma_intervals(rng, rate, cv, 200_000)
        assert x.mean() == pytest.approx(1 / rate, rel=0.03)
        assert x.std() / x.mean() == pytest.approx(cv, rel=0.05)


@pytest.mark.parametrize("popularity,alpha", [("power", 1.0), ("power", 0.3), ("zipf", 1.0),
                                              ("zipf", 2.0), ("uniform", 1.0)])
def test_adapter_popularity_matches_its_distribution(popularity, alpha):
    n, draws = 20, 200_000
    rng = np.random.default_rng(2)
    idx = sample_adapter_indices(rng, n, alpha, popularity, draws)
    assert idx.min() >= 0 and idx.max() < n
    p = popularity_probs(n, alpha, popularity)
    assert p.sum() == pytest.approx(1.0)
    freq = np.bincount(idx, minlength=n) / draws
    assert np.abs(freq - p).max() < 0.01
    if popularity == "zipf" or (popularity == "power" and alpha < 1):
        assert freq[0] > 3 * freq[-1]  # skewed towards the first adapters
    else:
        assert np.allclose(p, 1 / n)  # S-LoRA's sampler with alpha = 1 is uniform


def test_synth_prompt_is_about_the_target_length():
    rng = np.random.default_rng(3)
    for n in (1, 8, 85, 512):
        words = synth_prompt(rng, n).split()
        assert len(words) == n and set(words) <= set(WORDS)


def test_workload_is_deterministic_open_loop_and_follows_the_scenario():
    s = load_scenario("chat", overrides={"rate": 4.0, "base_fraction": 0.2})
    a = Workload(s, DEMO).take(3000)
    b = Workload(s, DEMO).take(3000)
    assert a == b
    assert Workload(s, DEMO, seed=7).take(5) != a[:5]
    times = np.array([r.t_arrival for r in a])
    assert np.all(np.diff(times) > 0)
    assert len(a) / times[-1] == pytest.approx(4.0, rel=0.06)
    assert [r.index for r in a] == list(range(3000))
    assert all(s.input_len[0] <= r.input_len <= s.input_len[1] for r in a)
    assert all(s.output_len[0] <= r.max_tokens <= s.output_len[1] for r in a)
    assert {r.input_len for r in a} == set(range(s.input_len[0], s.input_len[1] + 1))
    assert all(len(r.prompt.split()) == r.input_len for r in a)
    labels = [r.label for r in a]
    assert labels.count("base") / len(a) == pytest.approx(0.2, abs=0.03)
    assert set(labels) == {"base", *DEMO}
    # zipf alpha=1 over 3 adapters: 6/11, 3/11, 2/11 of the adapter requests
    adapted = [lb for lb in labels if lb != "base"]
    assert adapted.count("uppercase") / len(adapted) == pytest.approx(6 / 11, abs=0.03)


def test_base_only_workload():
    s = Scenario(name="base", num_adapters=0)
    assert s.base_fraction == 1.0
    assert {r.adapter_id for r in Workload(s, []).take(50)} == {""}
