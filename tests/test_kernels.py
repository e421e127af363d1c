"""The decoding step and the composition sum: references against independent computations, and
the Triton kernels against their references (in Triton's CPU interpreter, where Triton exists)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picaso_rag.kernels import chunk_scan, chunk_scan_ref, causal_conv, conv_step_ref, ssm_step, ssm_step_ref, weighted_sum_ref

from .conftest import TEXTS


def test_model_step_equals_reading_one_more_token(engine):
    """Decoding one token in place gives the logits and states of reading that token."""
    ids = torch.tensor([engine.tokenize(TEXTS[2])])
    prefix = engine.model(ids[:, :-1])
    whole = engine.model(ids)
    ssm, conv = prefix.ssm_state.clone(), prefix.conv_state.clone()
    logits = engine.model.step(ids[:, -1], ssm, conv)
    torch.testing.assert_close(logits, whole.logits[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm, whole.ssm_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv, whole.conv_state)


@pytest.mark.parametrize("layer_major", [False, True])
def test_cpu_ssm_step_in_place_equals_the_reference(layer_major):
    """The CPU's in-place step (what decoding runs) against ssm_step_ref, on a batch-major state and
    on a layer of the scheduler's layer-major buffer (a contiguous block inside a strided whole)."""
    g = torch.Generator().manual_seed(0)
    b, h, p, n, groups = 5, 6, 8, 16, 2
    whole = torch.randn(3, b, h, p, n, generator=g)
    state = whole.transpose(0, 1)[:, 1] if layer_major else whole[0]
    x, dt = torch.randn(b, h, p, generator=g), torch.randn(b, h, generator=g)
    A, D, dt_bias = -torch.rand(h, generator=g) * 4, torch.randn(h, generator=g), torch.randn(h, generator=g)
    B, C = torch.randn(b, groups, n, generator=g), torch.randn(b, groups, n, generator=g)
    expected_state = state.clone()
    expected = ssm_step_ref(expected_state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_limit=(0.0, 2.0))
    before = whole.clone()
    y = ssm_step(state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_limit=(0.0, 2.0))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)  # updated in place
    layers, other = (whole.transpose(0, 1), before.transpose(0, 1)) if layer_major else (whole[None], before[None])
    for i in range(layers.shape[1]):  # the other layers of the buffer are not written
        if i != (1 if layer_major else 0):
            assert torch.equal(layers[:, i], other[:, i])


@pytest.mark.parametrize("length", [1, 5, 32, 40])
def test_cpu_short_reads_scan_to_the_reference_result(length):
    """A read shorter than a chunk scans in a chunk of its own length (a power of two from 16) on the
    CPU: the same outputs and final state as the reference at the model's chunk size."""
    g = torch.Generator().manual_seed(length)
    b, h, p, n, groups, chunk = 2, 4, 8, 16, 2, 256
    x, dt = torch.randn(b, length, h, p, generator=g), torch.rand(b, length, h, generator=g) * 0.1
    A, D = -torch.rand(h, generator=g) * 4, torch.randn(h, generator=g)
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    initial = torch.randn(b, h, p, n, generator=g)
    y, final = chunk_scan(x, dt, A, B, C, D, chunk, initial_state=initial)
    y_ref, final_ref = chunk_scan_ref(x, dt, A, B, C, D, chunk, initial_state=initial)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)


def test_conv_step_equals_causal_conv_of_one_token():
    g = torch.Generator().manual_seed(0)
    x, state = torch.randn(3, 1, 10, generator=g), torch.randn(3, 10, 3, generator=g)
    weight, bias = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
    out, new_state = causal_conv(x, state, weight, bias, torch.ones(3, dtype=torch.long))
    state_in_place = state.clone()
    torch.testing.assert_close(conv_step_ref(x[:, 0], state_in_place, weight, bias), out[:, 0])
    torch.testing.assert_close(state_in_place, new_state)


def test_weighted_sum_ref_equals_stacked_einsum():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) for _ in range(5)]
    weights = torch.rand(5, 3, 4, generator=g, dtype=torch.float64)
    expected = torch.einsum("klh,klhpn->lhpn", weights, torch.stack(states))
    torch.testing.assert_close(weighted_sum_ref(states, weights, torch.float64), expected)


INTERPRETED = r"""
import torch, triton
from picaso_rag.kernels import compose as kc, ssd
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    states = [torch.randn(3, 4, 5, 7).to(dtype) for _ in range(4)]
    weights = torch.rand(4, 3, 4)
    for out_dtype in (dtype, torch.float32):
        got = kc._weighted_sum_triton(states, weights, out_dtype)
        torch.testing.assert_close(got.float(), kc.weighted_sum_ref(states, weights, out_dtype).float(), rtol=1e-2, atol=1e-2)
    for width in (2, 4):
        x, state = torch.randn(2, 300).to(dtype), torch.randn(2, 300, width - 1).to(dtype)
        weight, bias = torch.randn(300, width), torch.randn(300)
        state_ref, out = state.clone(), torch.empty_like(x)
        ssd._conv_step_kernel()[(2, 2)](x, state, weight, bias, out, 300, x.stride(0), state.stride(0), state.stride(1),
                                        HAS_BIAS=True, WIDTH=width, BLOCK=256)
        torch.testing.assert_close(out.float(), ssd.conv_step_ref(x, state_ref, weight, bias).float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(state, state_ref)
print("ok")
"""


def test_triton_kernels_match_references_in_interpreter():
    """The fused composition and conv-step kernels, run by Triton's interpreter on the CPU
    (CI has no GPU; the GPU run is in benchmarks/latency.py's checks). Triton is a test dependency."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
