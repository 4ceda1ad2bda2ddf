"""The benchmark harness runs and writes its JSON (timings themselves are never asserted)."""

import json
import math

import pytest
import torch

from adamkit.tools import bench, cli


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(
        [
            "bench",
            "--cases",
            "c",
            "--impls",
            "torch fused,adamkit fused",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--scale",
            "0.03",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert [r["impl"] for r in result["rows"]] == ["torch fused", "adamkit fused"]
    assert result["rows"][0]["vs_torch_fused"] == 1.0 and result["stream_gbps"] > 0
    out = capsys.readouterr().out
    assert "| c: 2000 tensors of 1K | adamkit fused |" in out
    # each row's arithmetic-only time (in cache) for the case's parameters, and which limit binds
    assert "arithmetic ms (in cache)" in out
    for r in result["rows"]:
        # a difference of two timings, clamped at 0 (on a busy machine the larger size may not
        # measure slower): a number, and which limit binds
        assert r["arithmetic_ms"] >= 0 and r["binds"] in ("arithmetic", "memory")
        # against the probes timed with the case (one case here: the run's best as well)
        assert r["case_stream_gbps"] == result["stream_gbps"]
        assert r["pct_stream"] == pytest.approx(100 * r["gbps"] / r["case_stream_gbps"], rel=1e-9)
        memory_ms = r["params"] * r["bytes_per_param"] / (r["case_stream_gbps"] * 1e9) * 1e3
        assert r["memory_ms"] == pytest.approx(memory_ms, rel=1e-9)
        assert r["binds"] == ("arithmetic" if r["arithmetic_ms"] > memory_ms else "memory")


def test_unknown_names_are_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown implementations"):
        bench.bench(["c: 2000 tensors of 1K"], ["nope"])
    with pytest.raises(ValueError, match="unknown case"):
        bench.bench(["z"], ["torch fused"])


def test_impl_names_with_commas_are_parsed():
    assert bench._parse_impls("torch fused,adamkit fused, 8-bit state") == [
        "torch fused",
        "adamkit fused, 8-bit state",
    ]


def test_incache_benchmark_runs_every_recipe(capsys):
    """benchmarks/bench_incache.py (a script, not part of the package) runs and reports every
    recipe against torch fused."""
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "bench_incache.py"))
    script["main"](["--n", "4096", "--updates", "8192", "--repeats", "1"])
    out = capsys.readouterr().out
    for name in script["RECIPES"]:
        assert f"| {name} | " in out
    assert "| torch fused | " in out and " 1.00x |" in out


def test_training_step_case_steps_after_a_real_backward():
    """Case d: gradients from a real backward of a 100-layer MLP; step + zero_grad are timed."""
    case = "d: training step (100-layer MLP, 32M)"
    shapes = bench.CASES[case](1.0)
    assert len(shapes) == 200 and sum(math.prod(s) for s in shapes) == 32_092_200
    impl = bench.implementations()["adamkit fused, 8-bit state"]
    runner = bench._TrainRunner(impl, bench.CASES[case](0.001))
    before = [p.detach().clone() for p in runner.params]
    assert runner.step() > 0
    assert all(p.grad is None for p in runner.params)  # zero_grad ran
    assert all(not torch.equal(p, q) for p, q in zip(runner.params, before))  # every tensor stepped
    result = bench.bench(
        [case], ["torch fused", "adamkit fused"], scale=0.001, warmup=1, repeats=1, arithmetic=False
    )
    assert [r["impl"] for r in result["rows"]] == ["torch fused", "adamkit fused"]
    assert result["rows"][0]["params"] == sum(math.prod(s) for s in bench.CASES[case](0.001))
