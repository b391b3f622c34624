"""The paper-style table: its numbers are results.json's; seeds average, other axes become rows."""

import csv
import io
import json

import pytest

from jaxgist.reports import runs, table


def test_table_cells_are_the_results_json_figures(sweep_root):
    t = table.build(runs.read_runs([sweep_root]))
    assert t.columns == [("synthetic", "1"), ("synthetic", "3")]  # the cut-off and failed points are left out
    assert t.rows[:2] == [("gist", "zero_shot", "pretrained", ""), ("gist", "zero_shot", "finetuned", "")]
    csv_rows = {tuple(r[:3]): r for r in csv.reader(io.StringIO(table.to_csv(t)))}
    header = next(csv.reader(io.StringIO(table.to_csv(t))))
    markdown = table.to_markdown(t)
    for shots in ("1", "3"):
        written = json.loads((sweep_root / f"shots-{shots}" / "results.json").read_text())["gist"]
        for model, heads in written.items():
            for head, m in heads.items():
                cell = t.cell(("gist", head, model, ""), ("synthetic", shots))
                assert cell.mean == pytest.approx(100 * m["test_top1"])
                assert cell.std == pytest.approx(100 * m["test_top1_bootstrap_std"]) and cell.n == 1
                row = csv_rows[("gist", head, model)]
                title = f"synthetic {shots}-shot"
                assert float(row[header.index(f"{title} mean")]) == pytest.approx(100 * m["test_top1"], abs=1e-4)
                assert float(row[header.index(f"{title} std")]) == pytest.approx(
                    100 * m["test_top1_bootstrap_std"], abs=1e-4)
                assert f"{100 * m['test_top1']:.1f} ± {100 * m['test_top1_bootstrap_std']:.1f}" in markdown


def _run(name, shots, value, std=0.01, **axes):
    return runs.Run(path=name, name=name, status="complete", dataset="cub", shots=shots, axes=dict(axes),
                    results={"gist": {"finetuned": {"knn": {"test_top1": value, "test_top1_bootstrap_std": std}}}})


def test_seeds_share_a_cell_and_other_axes_make_rows():
    found = [_run("a", "5", 0.50, seed="0", lr="1"), _run("b", "5", 0.60, seed="1", lr="1"),
             _run("c", "5", 0.70, seed="0", lr="2"), _run("d", "all", 0.80, seed="0", lr="1"),
             _run("e", "1", 0.40, seed="0", lr="1"), _run("f", "10", 0.65, seed="0", lr="1")]
    t = table.build(found)
    assert [c[1] for c in t.columns] == ["1", "5", "10", "all"]
    seeds = t.cell(("gist", "knn", "finetuned", "lr=1"), ("cub", "5"))
    assert seeds.mean == pytest.approx(55.0) and seeds.std == pytest.approx(7.0710678) and seeds.n == 2
    assert seeds.runs == ("a", "b")
    assert t.cell(("gist", "knn", "finetuned", "lr=2"), ("cub", "5")).mean == pytest.approx(70.0)
    assert t.best(("cub", "5")) == ("gist", "knn", "finetuned", "lr=2")
    md = table.to_markdown(t)
    assert "| method | head | model | variant |" in md and "**70.0 ± 1.0**" in md and "55.0 ± 7.1 (n=2)" in md


def test_an_axis_the_shots_determine_is_not_a_variant():
    found = [_run("a", "1", 0.5, **{"data.synthetic.train_per_class": "1"}),
             _run("b", "5", 0.6, **{"data.synthetic.train_per_class": "5"})]
    t = table.build(found)
    assert {r[3] for r in t.rows} == {""} and len(t.columns) == 2


def test_no_complete_run_gives_an_empty_table():
    t = table.build([runs.Run(path="x", name="x", status="incomplete")])
    assert t.rows == [] and t.columns == [] and table.to_csv(t).strip() == "method,head,model"
