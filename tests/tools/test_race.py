"""``adamkit race``: the quick race writes its files, every adamkit recipe learns, recipes are honest."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys

import pytest
import torch

from adamkit.tools import cli, race, registry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # whole-model training runs


@pytest.fixture(scope="module")
def quick_race(tmp_path_factory):
    """One ``adamkit race --quick`` for the whole module (its output directory and stdout)."""
    out = tmp_path_factory.mktemp("race")
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        code = cli.main(["race", "--quick", "--no-progress", "--out", str(out)])
    finally:
        capture.undo()
    assert code == 0
    return out, "\n".join(lines)


def test_quick_race_writes_json_with_a_curve_per_recipe(quick_race):
    out, _ = quick_race
    data = json.loads((out / "race.json").read_text())
    ran, skipped = data["recipes"], data["skipped"]
    # Every registered recipe either ran or was skipped with a reason; the fp32 ones always run.
    assert set(ran) | set(skipped) == set(race.RECIPES)
    assert not set(ran) & set(skipped)
    assert {"sgd-momentum", "torch-adamw", "adamkit-adam", "adamkit-adamw"} <= set(ran)
    assert all(reason for reason in skipped.values())
    for name, run in ran.items():
        curve = run["curve"]
        assert len(curve) == 11, name  # step 0 and 10 evaluations
        assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
        assert curve[-1]["step"] == data["steps"]
        assert len(run["train_losses"]) == data["steps"]
        assert run["state_bytes_per_param"] > 0


def test_quick_race_runs_lion(quick_race):
    """Lion's rows run (fp32; bf16 + Kahan with 8-bit state), at Lion's own lr, with half of
    AdamW's state (m only; the tiny model's tensors are below min_8bit_size: fp32 m)."""
    out, _ = quick_race
    ran = json.loads((out / "race.json").read_text())["recipes"]
    lion, adamw = ran["lion"], ran["adamkit-adamw"]
    assert lion["optimizer"] == "adamkit.Lion" and lion["lr"] < adamw["lr"]
    assert lion["state_bytes_per_param"] == pytest.approx(adamw["state_bytes_per_param"] / 2, rel=0.01)
    kahan8 = ran["lion-bf16-kahan-8bit"]
    assert kahan8["precision"] == "bf16-kahan" and kahan8["state"] == "8bit"
    assert kahan8["val_loss"] < kahan8["initial_val_loss"] - 0.5


def test_quick_race_every_adamkit_recipe_learns(quick_race):
    out, _ = quick_race
    ran = json.loads((out / "race.json").read_text())["recipes"]
    adamkit_runs = {n: r for n, r in ran.items() if r["optimizer"].startswith("adamkit.")}
    assert len(adamkit_runs) >= 2
    for name, run in adamkit_runs.items():
        assert run["diverged_at"] is None, name
        assert run["val_loss"] < run["initial_val_loss"] - 0.5, name
        assert run["final_train_loss"] < run["train_losses"][0] - 0.5, name


def test_quick_race_is_fair(quick_race):
    out, _ = quick_race
    ran = json.loads((out / "race.json").read_text())["recipes"]
    # Same seed: every recipe starts from the same weights, so the step-0 validation loss agrees
    # (exactly for fp32 parameters; bf16 recipes start from the same weights rounded to bf16).
    assert len({run["initial_val_loss"] for run in ran.values() if run["precision"] == "fp32"}) == 1
    first = ran["adamkit-adamw"]["initial_val_loss"]
    assert all(run["initial_val_loss"] == pytest.approx(first, abs=0.01) for run in ran.values())
    # adamkit.AdamW is a drop-in for torch.optim.AdamW: the same curve up to rounding.
    ours, theirs = ran["adamkit-adamw"]["curve"], ran["torch-adamw"]["curve"]
    assert [p["val_loss"] for p in ours] == pytest.approx([p["val_loss"] for p in theirs], abs=1e-3)
    assert ran["sgd-momentum"]["lr"] > ran["adamkit-adamw"]["lr"]


def test_quick_race_table_and_output(quick_race):
    out, stdout = quick_race
    md = (out / "race.md").read_text()
    ran = json.loads((out / "race.json").read_text())["recipes"]
    for name in ran:
        assert f"| {name} |" in md and f"| {name} |" in stdout
    assert "peak RSS" in md and "ms/step" in md and "state B/param" in md
    assert "torch.optim.SGD" in stdout and "peak lr 0.05" in stdout  # the per-recipe lr is stated


def test_quick_race_png(quick_race):
    pytest.importorskip("matplotlib")
    out, _ = quick_race
    assert (out / "race.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_png_is_skipped(monkeypatch, tmp_path):
    result = race.race(
        "gpt", ["adamkit-adamw"], quick=True, steps=3, evals=1, untimed_steps=0, progress=False
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    notes: list[str] = []
    files = race.write(result, tmp_path, log=notes.append)
    assert [f.name for f in files] == ["race.json", "race.md"]
    assert not (tmp_path / "race.png").exists()
    assert "adamkit[plot]" in notes[0]


def test_unavailable_recipe_is_skipped_with_a_note(monkeypatch):
    # an optimizer said to take adamkit's options that does not accept state_format
    monkeypatch.setitem(
        registry.TRAINABLE, "fake", registry.Training("fake", torch.optim.AdamW, 1e-3, adamkit=True)
    )
    monkeypatch.setitem(race.RECIPES, "fake-state", race.Recipe("fake-state", "fake", state="8bit"))
    assert "state_format" in race.unavailable(race.RECIPES["fake-state"])
    assert race.unavailable(race.RECIPES["adamkit-adamw"]) is None
    notes: list[str] = []
    result = race.race(
        "gpt", ["fake-state", "adamkit-adam"], quick=True, steps=3, evals=1, progress=False, log=notes.append
    )
    assert list(result.runs) == ["adamkit-adam"]
    assert "state_format" in result.skipped["fake-state"]
    assert any(n.startswith("skipping fake-state") for n in notes)
    assert "skipped fake-state" in race.markdown(result)


def test_recipe_table_covers_the_precision_recipes():
    for name in ("bf16-kahan", "bf16-kahan8-8bit", "bf16-sr", "bf16-master", "bf16-state", "8bit-state"):
        recipe = race.RECIPES[name]
        assert registry.TRAINABLE[recipe.optimizer].adamkit
        assert registry.optimizer_kwargs(recipe.optimizer, recipe.precision, recipe.state)  # passes options


def test_digits_race():
    pytest.importorskip("sklearn")
    result = race.race("digits", ["sgd-momentum", "adamkit-adamw"], quick=True, evals=2, progress=False)
    assert result.task == "digits" and list(result.runs) == ["sgd-momentum", "adamkit-adamw"]
    run = result.runs["adamkit-adamw"]
    assert math.isfinite(run.val_loss) and run.val_loss < run.initial_val_loss


def test_race_leaves_global_state_alone():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    result = race.race(
        "gpt", ["adamkit-adamw"], quick=True, steps=2, evals=1, untimed_steps=0, threads=2, progress=False
    )
    assert result.threads == 2
    assert torch.equal(state, torch.get_rng_state()) and torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipes", "adamkit-adamw,adadelta"], "unknown recipe(s) adadelta"),
        (["--recipes", ","], "unknown recipe"),
    ],
)
def test_cli_bad_recipes(capsys, args, message):
    assert cli.main(["race", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adamkit race: error:") and message in err and "adamkit-adamw" in err


@pytest.mark.parametrize("args", [["--task", "mnist"], ["--steps", "0"], ["--evals", "-1"]])
def test_cli_bad_arguments(capsys, args):
    with pytest.raises(SystemExit) as exc:
        cli.main(["race", *args])
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


class _Broken(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("boom")


def test_a_failing_recipe_does_not_stop_the_race(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TRAINABLE, "broken", registry.Training("Broken", _Broken, lr=0.1))
    monkeypatch.setitem(race.RECIPES, "broken", race.Recipe("broken", "broken"))
    notes: list[str] = []
    result = race.race(
        "gpt", ["broken", "sgd-momentum"], quick=True, steps=3, evals=1, progress=False, log=notes.append
    )
    assert list(result.runs) == ["sgd-momentum"]
    assert result.failed["broken"].startswith("RuntimeError: boom (at test_race.py:")
    assert notes == [f"broken failed: {result.failed['broken']}"]
    assert "failed broken" in race.markdown(result)
    assert race.to_json(result)["failed"] == result.failed


# ------------------------------------------------------------------------------------------------
# The picture and the command's checks (no training: a race's JSON written by hand)
# ------------------------------------------------------------------------------------------------


def _run(curve, ms, state_bpp, rss_mib):
    return {
        "curve": [{"step": s, "wall_s": 0.1 * s, "val_loss": v} for s, v in curve],
        "val_loss": curve[-1][1],
        "ms_per_step": ms,
        "state_bytes_per_param": state_bpp,
        "peak_rss_bytes": None if rss_mib is None else int(rss_mib * 2**20),
    }


RACE_JSON = {
    "description": "hand-written",
    "steps": 20,
    "seed": 0,
    "threads": 1,
    "recipes": {
        "sgd-momentum": _run([(0, 4.0), (10, 3.0), (20, 2.6)], 10.0, 4.0, 50),
        "adamkit-adamw": _run([(0, 4.0), (10, 2.5), (20, 2.0)], 12.0, 8.0, 60),
        "8bit-state": _run([(0, 4.0), (10, 2.6), (20, 1.95)], 13.0, 2.08, None),
    },
}


def test_relative_curves_subtract_fp32_adamw():
    rel = race.relative_curves(RACE_JSON)
    assert rel["adamkit-adamw"] == [(10, 0.0), (20, 0.0)]
    assert rel["8bit-state"] == [(10, pytest.approx(0.1)), (20, pytest.approx(-0.05))]
    without = {**RACE_JSON, "recipes": {"sgd-momentum": RACE_JSON["recipes"]["sgd-momentum"]}}
    assert race.relative_curves(without) == {}


def test_picture_shows_the_difference_memory_loss_and_time():
    pytest.importorskip("matplotlib")
    fig = race.plot(RACE_JSON)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("relative to fp32 AdamW" in t for t in titles)
    for panel, values in [
        ("optimizer state, bytes/param", [2.08, 8.0, 4.0]),  # the last recipe is the lowest bar
        ("peak RSS growth (MiB)", [0.0, 60.0, 50.0]),
        ("ms per training step (median)", [13.0, 12.0, 10.0]),
    ]:
        (ax,) = [a for a in fig.axes if a.get_title() == panel]
        by_y = sorted(ax.patches, key=lambda b: b.get_y())  # lowest bar first: the last recipe
        assert [round(b.get_width(), 2) for b in by_y] == values, panel
    assert "n/a" in [t.get_text().strip() for a in fig.axes for t in a.texts]  # unknown RSS is said


def test_every_optimizer_of_a_full_race_has_its_own_colour():
    """Each optimizer of the full race gets a colour of its own; its precision, state and gradient
    recipes keep it with a line style and bar hatch of their own (fifteen recipes once shared ten
    colours: SGD and a Lion recipe were both blue), and the legend gives each curve's lr."""
    pytest.importorskip("matplotlib")
    one = RACE_JSON["recipes"]["adamkit-adamw"]
    data = {
        **RACE_JSON,
        "recipes": {n: {**one, "optimizer_name": r.optimizer, "lr": 1e-3} for n, r in race.RECIPES.items()},
    }
    fig = race.plot(data)
    (ax,) = [a for a in fig.axes if a.get_title() == "optimizer state, bytes/param"]
    bars = dict(zip(reversed(list(race.RECIPES)), sorted(ax.patches, key=lambda b: b.get_y())))
    colour = {n: tuple(b.get_facecolor()) for n, b in bars.items()}
    for a in race.RECIPES:
        for b in race.RECIPES:
            same = race.RECIPES[a].optimizer == race.RECIPES[b].optimizer
            assert (colour[a] == colour[b]) == same, (a, b)
    looks = {(colour[n], bars[n].get_hatch()) for n in race.RECIPES}
    assert len(looks) == len(race.RECIPES)  # every recipe told apart
    (curves,) = [a for a in fig.axes if a.get_title() == "validation loss"]
    assert all("(lr " in t.get_text() for t in curves.get_legend().get_texts())


def test_cli_replot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "race.json").write_text(json.dumps(RACE_JSON))
    assert cli.main(["race", "--replot", str(tmp_path)]) == 0
    assert (tmp_path / "race.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["race", "--replot", str(tmp_path / "nowhere")]) == 2
    assert "no race.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, missing, message",
    [
        (["--task", "digits", "--no-plot"], "sklearn", "pip install 'adamkit[digits]'"),
        (["--quick"], "matplotlib", "pip install 'adamkit[plot]'"),
    ],
)
def test_cli_checks_optional_dependencies_before_any_work(monkeypatch, capsys, args, missing, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real(n, *a))
    assert cli.main(["race", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err  # nothing ran, not even the plan


def test_lr_sweep_races_each_optimizer_at_its_best_lr(monkeypatch, tmp_path):
    """race(sweep=True): each optimizer at the same multiples of its paper lr on the quick race;
    every recipe of an optimizer then races at the lr with the lowest validation loss there (torch's
    AdamW at adamkit's: the same algorithm), and the table, JSON and picture say so."""
    monkeypatch.setattr(race, "LR_GRID", (1.0, 3.0))
    quick = race.SETTINGS[("gpt", True)]  # a shorter quick race: the sweep's logic, not its values
    monkeypatch.setitem(race.SETTINGS, ("gpt", True), dataclasses.replace(quick, steps=12))
    names = ["adamkit-adamw", "bf16-kahan", "torch-adamw", "lion"]
    result = race.race(
        "gpt", names, quick=True, steps=8, evals=1, progress=False, sweep=True, log=lambda s: None
    )
    sweep = result.sweep
    assert list(sweep.tried) == ["adamw", "lion"]
    for opt, tried in sweep.tried.items():
        paper = race.registry.PAPER_LR[opt]
        assert list(tried) == [pytest.approx(paper), pytest.approx(3 * paper)]
        assert sweep.chosen[opt] == min(tried, key=lambda lr: tried[lr])
    assert result.runs["adamkit-adamw"].lr == result.runs["bf16-kahan"].lr == sweep.chosen["adamw"]
    assert result.runs["torch-adamw"].lr == sweep.chosen["adamw"]  # one algorithm: one sweep
    assert result.runs["lion"].lr == sweep.chosen["lion"]
    md = race.markdown(result)
    assert "| adamw | 0.001 |" in md and "**" in md and "best of 2 multiples" in md
    data = race.to_json(result)
    assert data["lr_sweep"]["chosen"] == sweep.chosen
    if importlib.util.find_spec("matplotlib") is not None:
        fig = race.plot(data)
        assert "best of 2 multiples" in fig._suptitle.get_text()
