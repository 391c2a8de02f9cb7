"""The device code on a CUDA GPU: the signal pass and every policy's per-step code run without a
host sync, replay in a CUDA graph, agree with the CPU, and cost little against reading the
logits once.

Marked ``gpu``; skipped without CUDA. Nothing here imports SGLang, so the checks run on a GPU
machine that has torch but no SGLang: ``.ci/gpu`` runs them and writes the microbenchmark to
``$OUT/gpu_kernels.md`` (or ``GPU_RESULTS``).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pytest
import torch

from sglang_entropy.signals import GroupConfidenceWindows, token_signals
from sglang_entropy.types import DecodeStep, DenoiseStep, DraftProposals

pytestmark = pytest.mark.gpu
VOCAB = 152_064  # Qwen2.5's padded vocabulary
SLOTS = 512

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@contextlib.contextmanager
def no_host_sync():
    """Any operation that waits for the device (``.item()``, ``.tolist()``, a device-to-host
    copy, a data-dependent shape) raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def random_logits(batch: int, device, seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=generator) * 3  # [B, V]
    logits[:, : batch * 7 % 50 + 2] += 8  # a few confident rows
    return logits.to(device=device, dtype=dtype)


def decode_inputs(batch: int, device):
    """Everything one decode step hands the policies, for ``batch`` rows."""
    logits = random_logits(batch, device)
    confidence_k = torch.full((batch,), 20, device=device)
    entropy_k = torch.full((batch,), 20, device=device)
    slots = torch.arange(batch, device=device) % SLOTS
    token_index = torch.arange(batch, device=device) * 3 % 40
    return logits, confidence_k, entropy_k, slots, token_index


def decode_step(logits, confidence_k, entropy_k, slots, token_index, windows, state, params):
    """The signal pass and the policies' decisions of one step: [B] device tensors only."""
    from sglang_entropy_branch.policy import eager_branch
    from sglang_entropy_prune.echo import echo_stop
    from sglang_entropy_prune.policy import deepconf_stop

    signals = token_signals(logits, confidence_k, entropy_k)
    window = torch.full_like(token_index, 8)
    group_confidence, window_full = windows.update(slots, token_index, signals["confidence"], window)
    signals["group_confidence"] = group_confidence
    mask = torch.ones_like(slots, dtype=torch.bool)

    def step(policy_state):
        return DecodeStep(mask, slots, token_index, window_full, signals, params, policy_state, logits)

    deepconf = deepconf_stop(step({}))
    echo = echo_stop(step(state))
    eager = eager_branch(step({}))
    return {
        **{f"signal.{name}": value for name, value in signals.items()},
        "deepconf.stop": deepconf.stop,
        "echo.stop": echo.stop,
        "echo.reason": echo.stop_reason,
        "eager.width": eager.branch_width,
    }


def decode_params(batch: int, device) -> dict[str, torch.Tensor]:
    """Per-row parameters as the adapter keeps them: bool, int64 or float32 [B] tensors."""
    from sglang_entropy_prune.echo import EchoParams

    def full(value):
        dtype = torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int) else torch.float32
        return torch.full((batch,), value, dtype=dtype, device=device)

    echo = EchoParams()
    return {
        # deepconf's and eager's (eager reads top-K entropy against it): rows on both sides
        "threshold": torch.linspace(1.0, 6.0, batch, device=device),
        "max_sequences": full(8),
        "echo_width": full(False),
        "lowest_group_confidence": full(True),
        "tail_decline": full(True),
        "entropy_spike": full(True),
        "min_group_confidence": full(echo.min_group_confidence),
        "tail_max": full(echo.tail_max),
        "spike_min": full(echo.spike_min),
        "run_length": full(echo.run_length),
    }


def run_decode(batch: int, device):
    from sglang_entropy_prune.echo import init_buffers

    windows = GroupConfidenceWindows(SLOTS, 64, device)
    state = init_buffers(SLOTS, device)
    inputs = [t.to(device) for t in decode_inputs(batch, "cpu")]
    return decode_step(*inputs, windows, state, decode_params(batch, device))


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_the_decode_step_runs_on_cuda_without_a_host_sync_and_agrees_with_the_cpu(batch):
    with no_host_sync():
        on_gpu = run_decode(batch, "cuda")
    on_cpu = run_decode(batch, "cpu")
    for name, expected in on_cpu.items():
        got = on_gpu[name].cpu()
        if expected.dtype.is_floating_point:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
        else:
            assert torch.equal(got, expected), name


def test_signals_on_cuda_match_a_float64_reference():
    logits = random_logits(32, "cuda", seed=3)
    k = torch.full((32,), 20, device="cuda")
    with no_host_sync():
        signals = token_signals(logits, k, k)
    logprobs = torch.log_softmax(logits.double().cpu(), dim=-1)
    p = logprobs.exp()
    entropy = -(p * logprobs).sum(-1)
    torch.testing.assert_close(signals["entropy"].cpu().double(), entropy, rtol=1e-4, atol=1e-4)
    top = logprobs.topk(20, dim=-1).values
    torch.testing.assert_close(signals["confidence"].cpu().double(), -top.mean(-1), rtol=1e-4, atol=1e-4)


def test_ccd_and_taps_steps_run_on_cuda_without_a_host_sync():
    from sglang_entropy_ccd.policy import CCD, CCDParams
    from sglang_entropy_specroute.policy import CONFIDENCES, GRANULARITIES, route

    def unmask(device):
        generator = torch.Generator().manual_seed(1)
        logits = (torch.randn(8, 32, 4096, generator=generator) * 4).to(device)  # [B, L, V]
        masked = torch.rand(8, 32, generator=generator).to(device) < 0.7
        params = CCDParams(budget=2, early_exit="cosine")
        state = CCD().denoise_start(8, 32, params, device)
        steps = torch.arange(8, device=device) % 4
        decisions = []
        for _ in range(3):
            decision = CCD().unmask_step(DenoiseStep(logits, masked, masked, steps, 32, params, state))
            decisions.append((decision.commit, decision.exit))
            masked = masked & ~decision.commit
        return decisions

    def routed(device):
        generator = torch.Generator().manual_seed(2)
        logprobs = -torch.rand(3, 64, 4, generator=generator).to(device) * 3  # [D, B, N]
        params = {
            "granularity": torch.tensor([GRANULARITIES.index("step")] * 64, device=device),
            "confidence": torch.tensor([CONFIDENCES.index("path")] * 64, device=device),
            "drafter": torch.full((64,), -1, device=device),
        }
        proposals = DraftProposals(torch.zeros_like(logprobs, dtype=torch.int64), logprobs, params=params)
        proposals.previous = torch.full((64,), -1, device=device)
        return route(proposals).drafter

    with no_host_sync():
        gpu_unmask, gpu_route = unmask("cuda"), routed("cuda")
    for (commit, exit_now), (cpu_commit, cpu_exit) in zip(gpu_unmask, unmask("cpu"), strict=True):
        assert torch.equal(commit.cpu(), cpu_commit) and torch.equal(exit_now.cpu(), cpu_exit)
    assert torch.equal(gpu_route.cpu(), routed("cpu"))


def captured_decode_step(batch: int):
    """The decode step captured in a CUDA graph after one warm-up run (which updates the
    per-slot state once; capturing runs nothing). Returns the graph, its output tensors and its
    inputs (logits, confidence_k, entropy_k, slots, token_index), which a replay reads anew."""
    from sglang_entropy_prune.echo import init_buffers

    inputs = decode_inputs(batch, "cuda")
    params = decode_params(batch, "cuda")
    windows, state = GroupConfidenceWindows(SLOTS, 64, "cuda"), init_buffers(SLOTS, "cuda")
    side = torch.cuda.Stream()  # warm up on a side stream, as graph capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(*inputs, windows, state, params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = decode_step(*inputs, windows, state, params)
    return graph, outputs, inputs


def test_the_decode_step_replays_in_a_cuda_graph():
    from sglang_entropy_prune.echo import init_buffers

    batch = 64
    graph, captured, (logits, confidence_k, entropy_k, slots, token_index) = captured_decode_step(batch)
    fresh = random_logits(batch, "cuda", seed=7)
    logits.copy_(fresh)
    token_index.add_(1)
    graph.replay()
    replayed = {name: value.clone() for name, value in captured.items()}

    # the same two steps run eagerly on fresh state: the warm-up's, then the replay's
    params = decode_params(batch, "cuda")
    windows, state = GroupConfidenceWindows(SLOTS, 64, "cuda"), init_buffers(SLOTS, "cuda")
    decode_step(*decode_inputs(batch, "cuda"), windows, state, params)
    expected = decode_step(fresh, confidence_k, entropy_k, slots, token_index, windows, state, params)
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(replayed[name], value, rtol=1e-4, atol=1e-4, msg=name)
        else:
            assert torch.equal(replayed[name], value), name


def device_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    end.synchronize()
    return 2 * source.numel() * 4 * 10 / (start.elapsed_time(end) / 1000)


def test_per_step_cost_against_the_memory_floor():
    """Microbenchmark, recorded: the signal pass plus the deepconf, echo and eager steps at batch
    1-256 over a 152k vocabulary, in a CUDA graph, against one read of the [B, V] bf16 logits
    at the measured bandwidth."""
    bandwidth = device_bandwidth()
    rows = []
    for batch in (1, 8, 32, 64, 128, 256):
        graph, _, _ = captured_decode_step(batch)
        for _ in range(5):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = 50
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        step_us = start.elapsed_time(end) * 1000 / replays
        floor_us = batch * VOCAB * 2 / bandwidth * 1e6
        rows.append((batch, step_us, floor_us))
        assert math.isfinite(step_us) and step_us > 0
    write_results(rows, bandwidth)


def write_results(rows, bandwidth: float) -> None:
    out = Path(os.environ.get("GPU_RESULTS") or Path(os.environ.get("OUT", ".")) / "gpu_kernels.md")
    name = torch.cuda.get_device_name()
    lines = [
        f"# Per-step device cost on {name}",
        "",
        "Command: `.ci/gpu` (`python -m pytest -m gpu tests/test_gpu.py`)  ",
        f"torch {torch.__version__}; vocabulary {VOCAB}; bf16 logits; the signal pass (entropy, top-K entropy, "
        "confidence, margin, varentropy), the group-confidence window and the deepconf, echo and eager "
        f"decisions, replayed in a CUDA graph. Measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; the floor is "
        "one read of the [B, V] logits at that bandwidth.",
        "",
        "| batch | step (us) | floor (us) | step / floor |",
        "|---|---|---|---|",
        *(f"| {b} | {s:.1f} | {f:.1f} | {s / f:.1f} |" for b, s, f in rows),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
