import csv
import json
import sys
from pathlib import Path

import pytest

from toyroot import write_toy_cifar
from unpoison import bench
from unpoison.bench import BenchError, BenchOptions, Grid

REPO = Path(__file__).resolve().parents[1]

TOY_GRID = {
    "name": "toy", "profile": "smoke", "seeds": [0, 1],
    "attacks": ["badnets", "none", {"label": "badnets-sq", "name": "badnets", "params": {"trigger": "square"}}],
    "defenses": [{"label": "none-e1", "name": "none", "set": {"train.epochs": 1}}, "none"],
    "run": {"report": False},
    "exclude": [{"attack": "none", "defense": "none-e1"}],
    "overrides": [{"where": {"attack": "badnets-sq", "seed": 1}, "attack_params": {"size": 2}}],
}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_cifar(tmp_path_factory.mktemp("toy-data"))


def options(root: Path, **kw) -> BenchOptions:
    return BenchOptions(data_root=str(root), device="cpu", precision="fp32", progress=False, command="test", **kw)


def table_without_times(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------- grid expansion
def test_grid_expands_every_cell_in_sharing_order():
    cells = Grid.from_dict(TOY_GRID).cells()
    # 3 attacks x 2 defences x 2 seeds, minus the excluded (none, none-e1) cell of each seed
    assert len(cells) == 10
    ids = [c.id for c in cells]
    assert len(set(ids)) == 10
    # per seed: the clean baseline first, and within an attack the no-defence cell first
    assert ids[:5] == ["cifar10.none.none.wrn16-1.s0", "cifar10.badnets.none.wrn16-1.s0",
                       "cifar10.badnets.none-e1.wrn16-1.s0", "cifar10.badnets-sq.none.wrn16-1.s0",
                       "cifar10.badnets-sq.none-e1.wrn16-1.s0"]
    square = {c.seed: c for c in cells if c.attack == "badnets-sq" and c.defense == "none"}
    assert square[0].attack_name == "badnets" and square[0].attack_params == {"trigger": "square"}
    assert square[1].attack_params == {"trigger": "square", "size": 2}      # the override hit seed 1 only
    assert all(c.defense_params == {"train.epochs": 1} for c in cells if c.defense == "none-e1")
    assert all(c.profile == "smoke" for c in cells)


def test_grid_rejects_unknown_keys_and_bad_labels():
    with pytest.raises(BenchError, match="unknown key"):
        Grid.from_dict({**TOY_GRID, "defences": ["none"]})
    with pytest.raises(BenchError, match="run option"):
        Grid.from_dict({**TOY_GRID, "run": {"epochs": 3}})
    with pytest.raises(BenchError, match="label"):
        Grid.from_dict({**TOY_GRID, "attacks": [{"label": "bad/label", "name": "badnets"}]})
    with pytest.raises(BenchError, match="unique"):
        Grid.from_dict({**TOY_GRID, "attacks": ["badnets", "badnets"]})


def test_shipped_grids_parse():
    for name in ("quick-cifar10", "paper-cifar10"):
        grid = bench.load_grid(REPO / "configs" / f"{name}.yaml")
        cells = grid.cells()
        assert {c.defense for c in cells} >= {"none", "dlp", "cbd", "dst", "dbr"}
        assert {c.attack for c in cells} >= {"none", "badnets", "blended", "sig", "trojannn", "lc", "wanet"}
        assert {c.profile for c in cells} == {name.split("-")[0]}


def test_unavailable_and_unknown_names_get_a_clear_message(monkeypatch):
    from unpoison.defenses import DEFENSES

    monkeypatch.setitem(DEFENSES.entries, "ghost", "ghost:Ghost")   # planned, but its file does not exist
    grid = Grid.from_dict({**TOY_GRID, "defenses": ["none", "ghost", "nosuchthing"]})
    problems = "\n".join(bench.check_cells(grid.cells()))
    assert "defence 'ghost' is not available" in problems
    assert "unknown defence 'nosuchthing'" in problems
    assert {c.defense for c in bench.unavailable(grid.cells())} == {"ghost", "nosuchthing"}


def test_bad_settings_are_caught_before_running():
    grid = Grid.from_dict({**TOY_GRID, "attacks": [{"label": "b", "name": "badnets", "params": {"colour": 3}}]})
    assert any("does not take colour" in p for p in bench.check_cells(grid.cells()))
    grid = Grid.from_dict({**TOY_GRID, "defenses": [{"label": "n", "name": "none", "set": {"trian.epochs": 1}}]})
    assert any("no setting 'trian'" in p for p in bench.check_cells(grid.cells()))


def test_cli_refuses_a_grid_with_missing_methods(tmp_path, monkeypatch, capsys):
    from unpoison.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text("attacks: [badnets]\ndefenses: [none, nosuchthing]\nprofile: smoke\n")
    assert main(["bench", "--grid", str(grid), "--out", str(tmp_path / "out")]) == 2
    assert "unknown defence 'nosuchthing'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- shards
@pytest.mark.parametrize("count", [1, 2, 3, 7, 20])
def test_shards_partition_the_grid_and_keep_groups_together(count):
    cells = Grid.from_dict(TOY_GRID).cells()
    slices = [bench.shard(cells, i, count) for i in range(1, count + 1)]
    ids = [c.id for part in slices for c in part]
    assert sorted(ids) == sorted(c.id for c in cells)            # every cell exactly once
    groups = {c.group for c in cells}
    if len(groups) >= count:
        owners = {c.group: i for i, part in enumerate(slices) for c in part}
        assert all(owners[c.group] == i for i, part in enumerate(slices) for c in part)
        assert max(map(len, slices)) - min(map(len, slices)) <= max(len([c for c in cells if c.group == g])
                                                                    for g in groups)


def test_shard_text_is_checked():
    assert bench.parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "2", "a/b"):
        with pytest.raises(BenchError):
            bench.parse_shard(bad)


# ---------------------------------------------------------------------------- running
def small_grid(**changes) -> Grid:
    raw = {"name": "toy", "profile": "smoke", "seeds": [0, 1], "attacks": ["badnets"],
           "defenses": ["none", {"label": "none-e1", "name": "none", "set": {"train.epochs": 1}}],
           "run": {"report": False, "monitor": "stages"}, **changes}
    return Grid.from_dict(raw, "toy.yaml")


@pytest.mark.slow
def test_bench_runs_resumes_and_shards_merge_to_the_same_table(tmp_path, toy_root, monkeypatch):
    grid = small_grid()
    full = tmp_path / "full"
    outcome = bench.run_grid(grid, full, grid.cells(), options(toy_root))
    assert len(outcome["ran"]) == 4 and not outcome["failed"]
    written = bench.write_tables(full, grid)
    assert written["finished"] == 4 and not written["missing"]
    rows = table_without_times(full / "results.csv")
    assert [r["cell"] for r in rows] == [c.id for c in grid.cells()]
    markdown = (full / "results.md").read_text()
    assert "| badnets | none-e1 | 0,1 |" in markdown and "\u00b1" in markdown
    assert (full / "plots" / "cifar10-wrn16-1-smoke-bars.png").stat().st_size > 1000

    # resume: every cell is done, so nothing runs again
    import unpoison.run as run_module

    def must_not_run(cfg):
        raise AssertionError(f"cell {cfg.out} ran again")

    # a context, not monkeypatch.undo(): undo would also drop conftest's isolated UNPOISON_CACHE
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "run", must_not_run)
        again = bench.run_grid(grid, full, grid.cells(), options(toy_root))
    assert len(again["skipped"]) == 4 and not again["ran"]

    # two shards merged give the unsharded table (same numbers: runs are deterministic)
    parts = []
    for i in (1, 2):
        part = tmp_path / f"shard{i}"
        bench.run_grid(grid, part, bench.shard(grid.cells(), i, 2), options(toy_root))
        parts.append(part)
    merged = tmp_path / "merged"
    merged_grid = bench.merge(parts, merged)
    bench.write_tables(merged, merged_grid, plots=False)
    assert table_without_times(merged / "results.csv") == table_without_times(full / "results.csv")
    assert strip_times((merged / "results.md").read_text()) == strip_times(markdown)

    # changing one cell's settings reruns that cell only
    changed = small_grid(overrides=[{"where": {"defense": "none-e1", "seed": 0}, "set": {"train.epochs": 2}}])
    rerun = bench.run_grid(changed, full, changed.cells(), options(toy_root))
    assert rerun["ran"] == ["cifar10.badnets.none-e1.wrn16-1.s0"] and len(rerun["skipped"]) == 3


def strip_times(markdown: str) -> str:
    """results.md without what differs between two runs of the same cells: wall times, commands."""
    lines = [line for line in markdown.splitlines()
             if line.strip() and not line.startswith(("- wall time", "- command", "!["))]
    return "\n".join(line.rsplit("|", 2)[0] if line.startswith("|") else line for line in lines)


@pytest.mark.slow
def test_a_changed_default_makes_a_stored_result_stale(tmp_path, toy_root, monkeypatch):
    """The grid did not change but the code's recipe did (a profile was retuned): rerun."""
    from dataclasses import replace

    import unpoison.defenses.none as none_module

    grid = small_grid(seeds=[0], defenses=["none"])
    bench.run_grid(grid, tmp_path, grid.cells(), options(toy_root))
    cell = grid.cells()[0]
    assert bench.stored_result(bench.cell_dir(tmp_path, cell) / "metrics.json", cell) is not None
    original = none_module.get_profile

    def retuned(name):
        profile = original(name)
        return replace(profile, baseline=replace(profile.baseline, epochs=profile.baseline.epochs + 1))

    monkeypatch.setattr(none_module, "get_profile", retuned)
    assert bench.stored_result(bench.cell_dir(tmp_path, cell) / "metrics.json", cell) is None


@pytest.mark.slow
def test_committed_results_are_reused_and_written(tmp_path, toy_root, monkeypatch):
    grid = small_grid(seeds=[0], attacks=["badnets"], defenses=["none"])
    committed = tmp_path / "results"
    bench.run_grid(grid, tmp_path / "a", grid.cells(), options(toy_root, results=str(committed)))
    stored = json.loads((committed / "cifar10.badnets.none.wrn16-1.s0.json").read_text())
    assert stored["bench"]["spec"]["attack"] == "badnets" and stored["bench"]["command"] == "test"

    import unpoison.run as run_module

    monkeypatch.setattr(run_module, "run", lambda cfg: pytest.fail("a committed cell ran again"))
    outcome = bench.run_grid(grid, tmp_path / "b", grid.cells(), options(toy_root, results=str(committed)))
    assert outcome["skipped"] == ["cifar10.badnets.none.wrn16-1.s0"]
    assert bench.write_tables(tmp_path / "b", grid)["finished"] == 1


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path, toy_root):
    grid = small_grid(seeds=[0], attacks=["badnets"],
                      defenses=["none", {"label": "broken", "name": "none", "set": {"train.batch_size": 0}}])
    outcome = bench.run_grid(grid, tmp_path, grid.cells(), options(toy_root))
    assert outcome["ran"] == ["cifar10.badnets.none.wrn16-1.s0"]
    assert outcome["failed"] == ["cifar10.badnets.broken.wrn16-1.s0"]
    assert (tmp_path / "runs" / "cifar10.badnets.broken.wrn16-1.s0" / "error.txt").is_file()
    written = bench.write_tables(tmp_path, grid)
    assert written["missing"] == ["cifar10.badnets.broken.wrn16-1.s0"]
    assert "Not finished" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_cli_bench_end_to_end(tmp_path, toy_root):
    from unpoison.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: cli\nprofile: smoke\nattacks: [badnets]\ndefenses: [none]\n")
    out = tmp_path / "out"
    args = ["bench", "--grid", str(grid), "--out", str(out), "--data-root", str(toy_root), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    cell = out / "runs" / "cifar10.badnets.none.wrn16-1.s0"
    assert (cell / "report.html").is_file()                # reports are on unless the grid turns them off
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["bench"]["command"].startswith(f"unpoison bench --grid {grid}")
    assert main(args + ["--list"]) == 0
    # --profile runs the grid at another profile: different cells, recorded in grid.json for --merge
    assert main(args + ["--profile", "quick", "--list"]) == 0
    assert main(["bench", "--merge", str(out), "--out", str(out)]) == 0
    assert "1 of 1 cells finished" in (out / "results.md").read_text()


# ---------------------------------------------------------------------------- RESULTS.md
def test_results_md_is_regenerated_between_the_markers_only(tmp_path, toy_root):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import make_results
    finally:
        sys.path.pop(0)
    grid = small_grid(seeds=[0], defenses=["none"])
    committed = tmp_path / "results" / "toy"
    bench.run_grid(grid, tmp_path / "out", grid.cells(), options(toy_root, results=str(committed)))
    document = tmp_path / "RESULTS.md"
    document.write_text(f"# Results\n\nprose before\n\n{make_results.START}\nold table\n{make_results.END}\n\nprose after\n")
    args = ["--results", str(tmp_path / "results"), "--out", str(document)]
    assert make_results.main(args) == 0
    text = document.read_text()
    assert text.startswith("# Results\n\nprose before\n\n") and text.endswith(f"{make_results.END}\n\nprose after\n")
    assert "old table" not in text
    assert "## `toy`" in text and "1 of 1 cells measured" in text and "- command: `test`" in text
    assert "- machine: cpu" in text and "torch " in text
    # our badnets / no-defence cell beside the DLP paper's (Table 3: 91.31 / 100)
    assert "| **none** | ours (wrn16-1, smoke) |" in text and "| DLP paper, Table 3 (WRN-16-1) | 91.3 / 100.0 |" in text
    assert make_results.main(args + ["--check"]) == 0
    document.write_text(text.replace("91.3 / 100.0", "99.0 / 0.0"))        # a hand-edited number is caught
    assert make_results.main(args + ["--check"]) == 1


def test_add_run_keeps_a_labelled_variant_apart(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import add_run
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(add_run, "HERE", tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    base = {"dataset": "cifar10", "attack": "badnets", "defense": "dlp", "model": "wrn16-1", "seed": 0,
            "profile": "quick", "poison_rate": 0.1, "clean_acc": 0.6, "asr": 0.03, "detection": {"precision": 1.0}}
    for label, ca in ((None, 0.6), ("dlp-no-au", 0.5)):
        (run / "metrics.json").write_text(json.dumps({**base, "clean_acc": ca}))
        assert add_run.main([str(run), "--folder", "g", "--command", "c"] + (["--label", label] if label else [])) == 0
    files = sorted(p.name for p in (tmp_path / "results" / "g").iterdir())
    assert files == ["cifar10.badnets.dlp-no-au.wrn16-1.s0.json", "cifar10.badnets.dlp.wrn16-1.s0.json"]
    results = [json.loads((tmp_path / "results" / "g" / f).read_text()) for f in files]
    rows = {s["defense"]: s for s in bench.summarize(results)}
    assert set(rows) == {"dlp", "dlp-no-au"} and rows["dlp-no-au"]["clean_acc_mean"] == 0.5
    assert rows["dlp"]["precision_mean"] == 1.0 and "flagged precision" in bench.summary_table(list(rows.values()))


def test_paper_numbers_match_the_spec():
    """benchmarks/paper_results.yaml was typed from the spec's tables; read them again to be sure."""
    import yaml

    spec = REPO.parent / "shared" / "papers" / "algorithms.md"
    if not spec.is_file():
        pytest.skip("the spec (../shared/papers/algorithms.md) is not next to this checkout")
    lines = spec.read_text().splitlines()

    def first_table_after(heading: str) -> dict[str, dict[str, str]]:
        start = next(i for i, line in enumerate(lines) if line.startswith(heading))
        rows = []
        for line in lines[start + 1:]:
            if line.startswith("|"):
                rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
            elif rows:
                break
        header = rows[0]
        return {row[0]: dict(zip(header[1:], row[1:])) for row in rows[2:]}

    papers = yaml.safe_load((REPO / "benchmarks" / "paper_results.yaml").read_text())
    layout = {"dlp-table3": ("### 5.8", "defenses"), "fct-readme": ("### 3.10", "attacks")}
    for key, (heading, rows_are) in layout.items():
        table, paper = first_table_after(heading), papers[key]
        for defense, cells in paper["ca_asr"].items():
            for attack, numbers in cells.items():
                row, column = paper["defenses"][defense], paper["attacks"][attack]
                text = table[row][column] if rows_are == "defenses" else table[column][row]
                assert [float(v) for v in text.split("/")] == numbers, (key, defense, attack)


def test_a_detection_only_run_is_its_own_row():
    base = {"dataset": "cifar10", "model": "wrn16-1", "profile": "quick", "attack": "badnets", "defense": "none",
            "seed": 0, "clean_acc": 0.8, "asr": 1.0, "robust_acc": 0.0, "wall_seconds": 1.0}
    detector_run = {**base, "detector": "fct", "clean_acc": 0.1, "detection": {"auroc": 0.99}}
    summary = bench.summarize([base, detector_run])
    assert [s["defense"] for s in summary] == ["none", "fct (detector only)"]
    assert summary[0]["clean_acc_mean"] == 0.8 and summary[1]["auroc_mean"] == 0.99


def test_provenance_collapses_per_cell_commands_into_one_template():
    from unpoison.bench import command_template, provenance

    cells = [{"attack": a, "defense": d, "bench": {"command": f"unpoison run --attack {a} --defense {d} --out runs/{a}-{d}"}}
             for a, d in [("none", "none"), ("badnets", "dbr"), ("sig", "none")]]
    assert command_template(cells[1]) == "unpoison run --attack <attack> --defense <defense> --out runs/<attack>-<defense>"
    assert sum(line.count("`unpoison run") for line in provenance(cells)) == 1
    # a command naming another attack than its cell's is left as it is
    odd = {"attack": "sig", "defense": "none", "bench": {"command": "unpoison run --attack sigx --defense none"}}
    assert command_template(odd) == "unpoison run --attack sigx --defense <defense>"


def test_a_non_standard_poison_rate_gets_its_own_row():
    from unpoison.bench import flat_row, summarize

    def cell(rate, asr):
        return {"dataset": "cifar10", "model": "wrn16-1", "profile": "quick", "seed": 0, "attack": "sig",
                "defense": "none", "poison_rate": rate, "clean_acc": 0.8, "asr": asr}

    assert flat_row(cell(0.1, 0.9))["attack"] == "sig"
    assert flat_row(cell(0.05, 0.8))["attack"] == "sig (rate 0.05)"
    rows = summarize([cell(0.1, 0.9), cell(0.05, 0.8)])
    assert [r["attack"] for r in rows] == ["sig", "sig (rate 0.05)"] and all(r["n"] == 1 for r in rows)


@pytest.mark.slow
def test_a_budget_stops_the_grid_and_the_next_call_finishes_it_as_one_long_call(tmp_path, toy_root, monkeypatch):
    """The slice driver: a budget that runs out during the first cell stops it after its
    first epoch (checkpoint kept) and leaves the rest; the next call resumes it and runs the
    rest; the results equal those of one uninterrupted call, number for number."""
    from types import SimpleNamespace

    import unpoison.bench.execute as execute

    # no model cache: an earlier test's identical models would finish the cells without training
    grid = small_grid(defenses=["none"], seeds=[0, 1], run={"report": False, "monitor": "stages", "share_models": False})
    sliced = tmp_path / "sliced"
    with monkeypatch.context() as patch:
        # the grid's clock says the first cell may start; the engine's, that its epoch ended late
        patch.setattr(execute, "time", SimpleNamespace(time=lambda: 0.0))
        first = bench.run_grid(grid, sliced, grid.cells(), options(toy_root, deadline=1.0))
    assert not first["ran"] and first["left"] == [c.id for c in grid.cells()]
    interrupted = bench.cell_dir(sliced, grid.cells()[0])
    assert (interrupted / "checkpoints").is_dir() and not (interrupted / "metrics.json").exists()
    assert len((interrupted / "log.jsonl").read_text().splitlines()) == 1   # one epoch, then the stop

    second = bench.run_grid(grid, sliced, grid.cells(), options(toy_root))
    assert second["ran"] == [c.id for c in grid.cells()] and not second["left"]
    assert not (interrupted / "checkpoints").exists()   # a finished cell keeps no checkpoints

    whole = tmp_path / "whole"
    bench.run_grid(grid, whole, grid.cells(), options(toy_root))
    for cell in grid.cells():
        a, b = (json.loads((bench.cell_dir(o, cell) / "metrics.json").read_text()) for o in (sliced, whole))
        for key in ("clean_acc", "asr", "robust_acc", "n_poisoned"):
            assert a[key] == b[key], (cell.id, key)
        assert [s["name"] for s in a["stages"]] == [s["name"] for s in b["stages"]]
