"""The dashboard's views: a layer's label x expert, co-occurrence and transition counts summed over a step range, and the
expert time shares it sends where the experts were timed."""

import math

import pytest

from moe_lightning.dashboard.views import (
    CURVES,
    UnknownLayerError,
    layer_matrices,
    layer_series,
    slim,
)


def layer(label_expert, cooccurrence):
    return {"label_expert": label_expert, "cooccurrence": cooccurrence}


def record(step, layers, transitions, label_names=("copy", "sort")):
    return {"step": step, "label_names": None if label_names is None else list(label_names), "layers": layers,
            "transitions": transitions}


# 2 layers, 3 experts, 2 labels; steps 1 and 2 are summed below, step 5 is left out of the range.
RECORDS = [
    record(1, [layer([[2, 1, 0], [0, 0, 3]], [[3, 1, 0], [1, 2, 1], [0, 1, 3]]),
               layer([[0, 3, 0], [1, 0, 2]], [[1, 0, 0], [0, 3, 0], [0, 0, 2]])],
           [[[1, 1, 0], [0, 0, 1], [0, 2, 1]]]),
    record(2, [layer([[1, 0, 0], [0, 1, 2]], [[1, 0, 1], [0, 2, 0], [1, 0, 1]]),
               layer([[1, 0, 0], [0, 3, 0]], [[1, 0, 0], [0, 3, 0], [0, 0, 0]])],
           [[[0, 1, 0], [0, 0, 0], [1, 0, 1]]]),
    record(5, [layer([[9, 9, 9], [9, 9, 9]], [[9, 9, 9], [9, 9, 9], [9, 9, 9]]),
               layer([[9, 9, 9], [9, 9, 9]], [[9, 9, 9], [9, 9, 9], [9, 9, 9]])],
           [[[9, 9, 9], [9, 9, 9], [9, 9, 9]]]),
]


def close(actual, expected):
    return all(
        (a is None and e is None) or (a is not None and e is not None and math.isclose(a, e))
        for row_a, row_e in zip(actual, expected, strict=True) for a, e in zip(row_a, row_e, strict=True)
    )


def test_specialisation_is_each_labels_share_summed_over_the_steps():
    spec = layer_matrices(RECORDS, 0, start=1, end=2)["specialisation"]
    # Summed counts: copy [3, 1, 0] (4 tokens), sort [0, 1, 5] (6 tokens).
    assert spec["rows"] == ["copy", "sort"]
    assert spec["counts"] == [[3, 1, 0], [0, 1, 5]] and spec["row_tokens"] == [4, 6]
    assert close(spec["share"], [[3 / 4, 1 / 4, 0], [0, 1 / 6, 5 / 6]])
    # NMI by hand: joint p = counts / 10, p(label) = (.4, .6), p(expert) = (.3, .2, .5).
    mutual = (0.3 * math.log(0.3 / 0.12) + 0.1 * math.log(0.1 / 0.08) + 0.1 * math.log(0.1 / 0.12)
              + 0.5 * math.log(0.5 / 0.3))
    h_label = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    h_expert = -(0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.5 * math.log(0.5))
    assert spec["nmi"] == pytest.approx(mutual / ((h_label + h_expert) / 2))


def test_cooccurrence_is_the_share_of_expert_is_tokens_that_also_picked_j():
    cooc = layer_matrices(RECORDS, 0, start=1, end=2)["cooccurrence"]
    # Summed counts [[4, 1, 1], [1, 4, 1], [1, 1, 4]]: each expert picked by 4 tokens, each pair by 1.
    assert cooc["row_tokens"] == [4, 4, 4]
    assert close(cooc["share"], [[None, 0.25, 0.25], [0.25, None, 0.25], [0.25, 0.25, None]])


def test_transitions_go_from_the_chosen_layer_to_the_next():
    trans = layer_matrices(RECORDS, 0, start=1, end=2)["transitions"]
    # Summed counts [[1, 2, 0], [0, 0, 1], [1, 2, 2]].
    assert trans["next_layer"] == 1 and trans["row_tokens"] == [3, 1, 5]
    assert close(trans["share"], [[1 / 3, 2 / 3, 0], [0, 0, 1], [0.2, 0.4, 0.4]])


def test_another_layer_and_range():
    matrices = layer_matrices(RECORDS, 1, end=1)
    assert (matrices["start"], matrices["end"], matrices["records"]) == (1, 1, 1)
    assert close(matrices["specialisation"]["share"], [[0, 1, 0], [1 / 3, 0, 2 / 3]])
    assert matrices["transitions"] == {"note": "layer 1 is the last MoE layer: no next layer"}
    assert matrices["cooccurrence"] == {"note": "every token picked a single expert: nothing co-occurs"}


def test_a_label_without_tokens_has_no_share_and_names_fall_back_to_indices():
    records = [record(1, [layer([[0, 0, 0], [1, 1, 0]], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])], [], label_names=None)]
    spec = layer_matrices(records, 0)["specialisation"]
    assert spec["rows"] == ["label 0", "label 1"] and spec["share"] == [[None, None, None], [0.5, 0.5, 0]]
    # Expert 2 was never picked: its row has no share either.
    assert layer_matrices(records, 0)["cooccurrence"]["share"][2] == [None, None, None]


def test_views_without_data_say_why():
    unlabelled = [record(1, [layer([], [[2, 1], [1, 2]]), layer([], [[2, 0], [0, 2]])], [[[0, 0], [0, 0]]], None)]
    matrices = layer_matrices(unlabelled, 0)
    assert matrices["specialisation"] == {"note": "no labels in this run"}
    assert matrices["transitions"] == {"note": "no token routed at both layers in the chosen steps"}
    assert layer_matrices(RECORDS, 0, start=3, end=4)["specialisation"] == {"note": "no record in the chosen steps"}


def test_bad_layer_and_range_are_named():
    with pytest.raises(UnknownLayerError, match="unknown layer 2: the run has layers 0..1"):
        layer_matrices(RECORDS, 2)
    with pytest.raises(UnknownLayerError, match="the run has no record yet"):
        layer_matrices([], 0)
    with pytest.raises(ValueError, match="empty step range: start=3 > end=1"):
        layer_matrices(RECORDS, 0, start=3, end=1)


def test_expert_time_shares_reach_the_page_where_the_experts_were_timed():
    untimed = {"layer": 0, "load": [3, 1], "load_share": [0.75, 0.25], **dict.fromkeys(CURVES, 0.0)}
    timed = {**untimed, "expert_time_share": [0.6, 0.4], "cooccurrence": [[3, 1], [1, 1]]}
    records = [{"step": 1, "layers": [untimed]}, {"step": 2, "layers": [timed]}]
    assert "expert_time_share" not in slim(records[0])["layers"][0]
    assert slim(records[1])["layers"][0]["expert_time_share"] == [0.6, 0.4]
    assert "cooccurrence" not in slim(records[1])["layers"][0]
    assert layer_series(records, 0)["expert_time_share"] == [None, [0.6, 0.4]]
