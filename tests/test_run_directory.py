"""The run directory's plot (coordinator/run_directory.py): what each panel draws."""

from coordinator.run_directory import plotted_series


def test_the_personalized_model_is_one_line_from_the_round_evaluations_to_the_final_one():
    rows = [{"phase": "expert", "round": 1, "train-loss": 1.6},
            {"phase": "personalize", "round": 1, "train-loss": 2.2},
            {"phase": "personalize", "round": 1, "eval-rouge1": 0.65, "eval-base-rouge1": 0.36},
            {"phase": "personalize", "round": 2, "train-loss": 2.1},
            {"phase": "evaluate", "round": 2, "eval-rouge1": 0.67, "eval-base-rouge1": 0.36}]
    assert [(label, points) for label, _, points in plotted_series(rows, "eval-rouge1")] == [
        ("personalized", [(1, 0.65), (2, 0.67)])]
    assert [(label, points) for label, _, points in plotted_series(rows, "train-loss")] == [
        ("expert", [(1, 1.6)]), ("personalize", [(1, 2.2), (2, 2.1)])]
