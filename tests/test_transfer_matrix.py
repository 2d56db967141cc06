"""benchmarks/transfer_matrix.py: lab rows read across as a release x attacker matrix."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.transfer_matrix import CLEAN, RELEASE, collect, main, table

LORA = "lora:epochs=8,lr=1e-3,batch_size=8"


def arm(runs: list[float]) -> dict:
    return {"final": {"exact_match": {"runs": runs}}, "best": {"exact_match": {"runs": runs}}}


def lab_row(method: str, options: dict, seeds: list[int], attackers: dict,
            surrogates: list[str] | None = None, augment: str | None = None,
            dataset: str = "fashion-mnist") -> dict:
    """A row as `mmguard lab` writes it: attackers maps a model to (release, clean,
    uniform) runs, one per seed."""
    return {
        "setting": {"dataset": dataset, "kind": "triples", "method": method,
                    "options": options, "seeds": seeds, "limit": 240, "holdout": 0.2,
                    "evaluate_on": "test", "limit_test": 200, "eps": 8 / 255,
                    "augment": augment, "strip_rare_words": None},
        "protect": {"optimisation": {"surrogates": surrogates} if surrogates else {}},
        "attackers": {f"{model}:{LORA}": {"method": arm(release), "clean": arm(clean),
                                          "uniform": arm(uniform)}
                      for model, (release, clean, uniform) in attackers.items()},
    }


def test_rows_split_over_seeds_join_into_one_cell_with_its_mean_and_standard_error():
    rows = [lab_row("wrong-target", {}, [0], {"tower-a": ([22.0], [79.5], [79.5])},
                    surrogates=["tower-a"]),
            lab_row("wrong-target", {}, [1, 2], {"tower-a": ([20.5, 24.0], [74.5, 76.0],
                                                             [77.5, 78.5])},
                    surrogates=["tower-a"])]
    cell = collect(rows, "fashion-mnist", "exact_match", "final", "test")["`wrong-target`"][
        "tower-a"]
    assert cell.seeds == 3
    assert cell.mean(RELEASE) == pytest.approx(22.1667, abs=1e-3)
    assert cell.sem(RELEASE) == pytest.approx(1.0138, abs=1e-3)  # stdev 1.756 / sqrt 3
    assert cell.mean(CLEAN) == pytest.approx(76.6667, abs=1e-3)
    # 22.2 is 71% below clean (76.7) and 56.3 points below uniform (78.5)
    assert cell.text() == "**22.2 ± 1.0** (3); -71%, 56.3 below uniform, WB"


def test_white_box_only_where_the_attacker_is_a_surrogate_and_never_for_a_model_free_release():
    rows = [lab_row("wrong-target", {"surrogates": ["tower-a", "tower-b"]}, [0],
                    {"tower-a": ([30.0], [80.0], [80.0]), "tower-c": ([70.0], [72.0], [66.0])},
                    surrogates=["tower-a", "tower-b"]),
            lab_row("class-pattern", {"cells": 8}, [0], {"tower-a": ([60.0], [80.0], [79.0])})]
    matrix = collect(rows, "fashion-mnist", "exact_match", "final", "test")
    collision = matrix["`wrong-target` [surrogates=tower-a+tower-b]"]
    assert collision["tower-a"].white_box and not collision["tower-c"].white_box
    assert collision["tower-c"].text() == "70.0 (1); -3%, 4.0 above uniform"
    assert not matrix["`class-pattern` [cells=8]"]["tower-a"].white_box
    rendered = table(matrix, "exact_match")
    assert "| `tower-a` | `tower-c` |" in rendered  # one column per attacker model
    assert rendered.count("\n| `") == 2  # one line per release


def test_robustness_rows_other_sets_and_unfinished_attackers_are_left_out():
    unfinished = lab_row("wrong-target", {}, [0], {"tower-a": ([30.0], [80.0], [80.0])})
    del unfinished["attackers"][f"tower-a:{LORA}"]["method"]
    rows = [lab_row("wrong-target", {}, [0], {"tower-a": ([30.0], [80.0], [80.0])},
                    augment="jpeg:75"),
            lab_row("wrong-target", {}, [0], {"tower-a": ([30.0], [80.0], [80.0])},
                    dataset="emoji-categories"),
            unfinished]
    assert collect(rows, "fashion-mnist", "exact_match", "final", "test") == {}


def test_a_missing_or_unreadable_results_file_is_named(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "lab-broken.json"
    broken.write_text("{ not json")
    for path in (tmp_path / "missing.json", broken):
        monkeypatch.setattr(sys, "argv", ["transfer_matrix.py", str(path)])
        with pytest.raises(SystemExit):
            main()
        assert path.name in capsys.readouterr().err
    empty = tmp_path / "lab-empty.json"
    empty.write_text(json.dumps({"rows": {}}))
    monkeypatch.setattr(sys, "argv", ["transfer_matrix.py", str(empty)])
    with pytest.raises(SystemExit):
        main()
    assert "no lab row on 'fashion-mnist'" in capsys.readouterr().err
