"""Reading workdirs: complete, incomplete (missing, cut off, malformed results) and failed runs."""

import json

from jaxgist.core import files, results
from jaxgist.reports import runs


def test_a_sweep_folder_expands_to_its_points_in_order_with_their_state(sweep_root):
    found = {r.name: r for r in runs.read_runs([sweep_root])}
    assert list(found) == ["shots-1", "shots-3", "shots-2", "shots-all", "shots-5"]
    assert found["shots-1"].complete and found["shots-3"].complete
    assert found["shots-1"].dataset == "synthetic" and found["shots-1"].shots == "1"
    cut = found["shots-2"]
    assert cut.status == "incomplete" and "results.json is not valid JSON" in cut.reason and cut.results == {}
    assert found["shots-all"].status == "failed" and "exited with status 1" in found["shots-all"].reason
    assert "DataError: no rows" in found["shots-all"].reason
    assert found["shots-5"].status == "incomplete" and "not started" in found["shots-5"].reason


def test_missing_or_malformed_results_are_reasons_not_crashes(tmp_path):
    empty = tmp_path / "empty"
    files.write_json_atomic(files.join(empty, "config.json"), {"data": {"source": "gist",
                                                                         "metadata": "d/CUB/metadata_5shot.csv"}})
    r = runs.read_run(empty)
    assert r.status == "incomplete" and "no results.json" in r.reason
    assert (r.dataset, r.shots) == ("cub", "5")

    bad = tmp_path / "bad"
    files.write_json_atomic(files.join(bad, "results.json"), {"gist": {"finetuned": {"knn": 0.5}}})
    r = runs.read_run(bad)
    assert r.status == "incomplete" and "results['gist']['finetuned']['knn'] must map metric names" in r.reason

    stages_only = tmp_path / "stages"
    results.write(stages_only, "gist", {}, run={"stages": {"match": {"images": 3}}})
    r = runs.read_run(stages_only)
    assert r.status == "incomplete" and "no test figures" in r.reason

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "results.json").write_text("")
    assert "is empty" in runs.read_run(blank).reason

    listed = runs.read_runs([tmp_path / "nowhere", tmp_path / "empty"])
    assert [r.status for r in listed] == ["incomplete", "incomplete"] and "does not exist" in listed[0].reason


def test_a_running_point_is_incomplete_even_with_old_results(tmp_path):
    results.write(tmp_path, "zero_shot", {"preset": {"zero_shot": {"test_top1": 0.5}}})
    files.write_json_atomic(files.join(tmp_path, runs.STATUS_FILE), {"status": "running", "started": "10:00"})
    r = runs.read_run(tmp_path)
    assert r.status == "incomplete" and "started 10:00" in r.reason
    files.write_json_atomic(files.join(tmp_path, runs.STATUS_FILE), {"status": "stopped", "returncode": 143})
    assert "rerun the sweep to resume" in runs.read_run(tmp_path).reason
    files.write_json_atomic(files.join(tmp_path, runs.STATUS_FILE), {"status": "done", "returncode": 0})
    assert runs.read_run(tmp_path).complete


def test_labels_from_the_config():
    assert runs.dataset_label({"data": {"source": "tfds", "tfds_name": "cars196"}}) == "cars196"
    assert runs.shots_label({"data": {"source": "gist", "metadata": "x/flower/metadata.csv"}}) == "all"
    assert runs.shots_label({"data": {"source": "synthetic", "synthetic": {"train_per_class": 5}}}) == "5"
    assert runs.dataset_label({}) == "-" and runs.shots_label({}) == "-"
    assert json.dumps(runs.read_status("/nonexistent")) == "{}"
