import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sglang_entropy.signals import MAX_TOP_K, GroupConfidenceWindows, Workspace, token_signals
from sglang_entropy.testing import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def check(logits_np, confidence_k, entropy_k, device, dtype=torch.float32):
    logits = torch.tensor(logits_np, dtype=dtype, device=device)
    got = token_signals(
        logits,
        torch.tensor(confidence_k, device=device),
        torch.tensor(entropy_k, device=device),
    )
    expected = reference.signals(logits.double().cpu().numpy(), confidence_k, entropy_k)
    for name, values in expected.items():
        np.testing.assert_allclose(got[name].cpu().numpy(), values, rtol=2e-4, atol=2e-4, err_msg=name)


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 400))
    logits = draw(arrays(np.float32, (rows, vocab), elements=st.floats(-40, 40, width=32)))
    width = min(MAX_TOP_K, vocab)
    confidence_k = draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows))
    entropy_k = draw(st.lists(st.integers(2, max(2, width)), min_size=rows, max_size=rows))
    return logits, confidence_k, entropy_k


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(batch=batches())
def test_signals_match_float64_reference_on_random_logits(device, batch):
    check(*batch, device)


@pytest.mark.parametrize("device", DEVICES)
def test_signals_on_peaked_and_flat_distributions(device):
    vocab = 1000
    peaked = np.full((1, vocab), -1e4, dtype=np.float32)
    peaked[0, 3] = 0.0
    flat = np.zeros((1, vocab), dtype=np.float32)
    check(np.concatenate([peaked, flat]), [20, 20], [20, 20], device)
    got = token_signals(
        torch.tensor(flat, device=device), torch.tensor([20], device=device), torch.tensor([20], device=device)
    )
    assert got["entropy"].item() == pytest.approx(np.log(vocab), rel=1e-5)
    assert got["topk_entropy"].item() == pytest.approx(np.log(20), rel=1e-5)


@pytest.fixture(scope="module")
def real_logits(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = tokenizer("The capital of France is Paris. Two plus two is", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0]  # [T, V], the SmolLM2 vocabulary


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, MAX_TOP_K), big_k=st.integers(2, MAX_TOP_K))
def test_signals_match_reference_on_real_logits(real_logits, device, k, big_k):
    rows = real_logits.shape[0]
    check(real_logits.numpy(), [k] * rows, [big_k] * rows, device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 12),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_group_confidence_is_the_sliding_window_mean(device, window, lengths, seed):
    rng = np.random.default_rng(seed)
    windows = GroupConfidenceWindows(num_slots=len(lengths) + 1, max_window=16, device=device)
    traces = [rng.uniform(0, 10, n) for n in lengths]
    seen = [[] for _ in lengths]
    # interleave the requests as a continuous batch does: every step, the ones still running
    for step in range(max(lengths)):
        rows = [i for i, n in enumerate(lengths) if step < n]
        means, full = windows.update(
            torch.tensor([i + 1 for i in rows], device=device),
            torch.tensor([step] * len(rows), device=device),
            torch.tensor([traces[i][step] for i in rows], dtype=torch.float32, device=device),
            torch.tensor([window] * len(rows), device=device),
        )
        for row, i in enumerate(rows):
            seen[i].append((means[row].item(), bool(full[row])))
    for trace, got in zip(traces, seen, strict=True):
        expected = reference.window_means(trace, window)
        np.testing.assert_allclose([m for m, _ in got], expected, rtol=1e-5, atol=1e-5)
        assert [f for _, f in got] == [i + 1 >= window for i in range(len(trace))]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(window=st.integers(1, 12), length=st.integers(2, 40), data=st.data())
def test_window_restarts_cleanly_after_readmission_to_a_used_slot(device, window, length, data):
    """A retracted request re-admitted in a slot that held another request's values."""
    readmitted_at = data.draw(st.integers(1, length - 1))
    rng = np.random.default_rng(length)
    trace = rng.uniform(0, 10, length)
    windows = GroupConfidenceWindows(num_slots=3, max_window=16, device=device)
    windows.values[2] = 1000.0  # another request's leftovers
    for step in range(readmitted_at, length):
        mean, full = windows.update(
            torch.tensor([2], device=device),
            torch.tensor([step], device=device),
            torch.tensor([trace[step]], dtype=torch.float32, device=device),
            torch.tensor([window], device=device),
            first_index=torch.tensor([readmitted_at], device=device),
        )
        since = trace[readmitted_at : step + 1]
        assert mean.item() == pytest.approx(since[-window:].mean(), rel=1e-5)
        assert bool(full) == (len(since) >= window)


def test_reused_workspace_gives_the_same_signals_as_fresh_buffers():
    workspace = Workspace()
    for rows in (4, 9, 2, 9):  # grows, shrinks, reuses
        logits = torch.randn(rows, 500) * 4
        k = torch.full((rows,), 20)
        fresh = token_signals(logits, k, k)
        reused = token_signals(logits, k, k, workspace=workspace)
        for name, values in fresh.items():
            torch.testing.assert_close(reused[name], values, msg=name)
