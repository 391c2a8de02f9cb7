"""The Pareto bench's arithmetic: forwards per token, ratios and the targets, on made-up rows."""

from types import SimpleNamespace

from sglang_entropy_ccd import pareto


def plan():
    args = SimpleNamespace(
        block_size=8,
        thresholds=[0.9],
        joint_thresholds=[0.5],
        budgets=[1],
        expand_ratios=[4.0],
        exit_schedule="cosine",
        taus=[(6.0, 2.0), (3.0, 0.5)],
    )
    return pareto.arms(args)


def rows(numbers: dict[str, tuple[int, int, int]]):
    """label -> (correct answers of 10, forwards, tokens)."""
    out = []
    for label, (right, forwards, tokens) in numbers.items():
        out += [
            {"arm": label, "correct": i < right, "forwards": forwards / 10, "tokens": tokens / 10} for i in range(10)
        ]
    return out


def test_arms_share_the_ccd_server_and_set_their_parameters_per_request():
    arms = plan()
    assert [a.family for a in arms] == [
        "one token per step",
        "LowConfidence",
        "JointThreshold",
        "CCD",
        "CCD + early exit",
        "CCD + early exit",
    ]
    ccd = [a for a in arms if a.algorithm == "CCD"]
    assert len({a.server for a in ccd}) == 1 and all(a.params for a in ccd)
    assert ccd[-1].params == {"early_exit": "cosine", "exit_tau_high": 3.0, "exit_tau_low": 0.5}


def test_targets_are_read_from_the_summary():
    arms = plan()
    labels = [a.label for a in arms]
    numbers = dict.fromkeys(labels, (9, 100, 100))
    numbers[labels[0]] = (10, 1100, 1000)  # one token per step: 1.1 forwards per token
    numbers[labels[1]] = (9, 500, 1000)  # LowConfidence 0.9
    numbers[labels[-2]] = (10, 260, 1000)  # 4.2x fewer, same accuracy
    numbers[labels[-1]] = (8, 200, 1000)
    summary = pareto.summarize(rows(numbers), arms)
    assert summary[0]["forwards_per_token"] == 1.1
    low, high = summary[1]["accuracy_ci"]  # 9 of 10 right
    assert 0.55 < low < 0.9 < high < 1.0
    met = pareto.targets(summary)
    assert met["4x_fewer_within_1_point"]["met"] and met["4x_fewer_within_1_point"]["best_arm"] == labels[-2]
    assert met["no_more_forwards_than_lowconfidence_at_its_accuracy"]["met"]
    numbers[labels[-2]] = (10, 600, 1000)  # now more forwards than LowConfidence at its accuracy, and < 4x
    met = pareto.targets(pareto.summarize(rows(numbers), arms))
    assert not met["4x_fewer_within_1_point"]["met"]
    assert met["no_more_forwards_than_lowconfidence_at_its_accuracy"]["lowconfidence_arms_not_matched"] == [labels[1]]


def test_answers_and_tokens_are_read_up_to_the_first_end_of_sequence():
    tokenizer = SimpleNamespace(eos_token_id=2, decode=lambda ids, skip_special_tokens: "".join(map(str, ids)))
    assert pareto.answer_text([5, 6, 2, 7, 2], tokenizer) == "56"
    assert pareto.answer_tokens([5, 6, 2, 7, 2], tokenizer) == 3
    assert pareto.answer_tokens([5, 6], tokenizer) == 2
