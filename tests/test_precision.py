"""Storage precision (picaso_rag.precision): fp32 exact, bf16 and fp8 within their rounding, log-decays exact."""

import pytest
import torch
from safetensors.torch import load, save

from picaso_rag import Mamba2Config, PicasoError, State
from picaso_rag.precision import FP8, PRECISIONS, dequantize, precision_of, quantize, roundtrip, state_nbytes

CFG = Mamba2Config(d_model=64, n_layer=3, vocab_size=128, d_state=16, headdim=16)


def random_state(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    ssm = torch.randn(CFG.n_layer, CFG.nheads, CFG.headdim, CFG.d_state, generator=g)
    # heads whose magnitudes differ by orders of magnitude, as the decays of real heads make them
    ssm *= torch.logspace(-4, 2, CFG.nheads)[None, :, None, None]
    ssm[1, 2] = 0.0  # an all-zero head
    conv = torch.randn(CFG.n_layer, CFG.conv_dim, CFG.d_conv - 1, generator=g)
    log_decay = -torch.rand(CFG.n_layer, CFG.nheads, generator=g) * 50
    return State(ssm, conv, log_decay, 17, "ab" * 32)


def test_fp32_is_exact_and_log_decay_always_fp32_exact():
    state = random_state()
    for precision in PRECISIONS:
        tensors = quantize(state, precision)
        assert tensors["log_decay"].dtype == torch.float32
        assert torch.equal(tensors["log_decay"], state.log_decay)
        back = dequantize(tensors, state.n_tokens, state.fingerprint)
        assert torch.equal(back.log_decay, state.log_decay)
        assert (back.n_tokens, back.fingerprint) == (state.n_tokens, state.fingerprint)
    back = roundtrip(state, "fp32")
    assert torch.equal(back.ssm, state.ssm) and torch.equal(back.conv, state.conv)


def test_bf16_within_bf16_rounding():
    state = random_state()
    back = roundtrip(state, "bf16")
    assert back.ssm.dtype == torch.float32  # roundtrip returns the state's own dtype
    # bf16 keeps 8 significant bits: relative error at most 2^-8 per element
    assert ((back.ssm - state.ssm).abs() <= state.ssm.abs() * 2**-8).all()
    assert quantize(state, "bf16")["ssm"].dtype == torch.bfloat16


def test_fp8_per_head_scale_keeps_every_head():
    state = random_state()
    tensors = quantize(state, "fp8")
    assert tensors["ssm"].dtype == FP8 and tensors["ssm_scale"].shape == (CFG.n_layer, CFG.nheads)
    assert tensors["conv"].dtype == torch.bfloat16
    back = roundtrip(state, "fp8")
    err = (back.ssm - state.ssm).flatten(2).norm(dim=2) / state.ssm.flatten(2).norm(dim=2).clamp_min(1e-30)
    nonzero = state.ssm.flatten(2).abs().amax(2) > 0
    # e4m3 keeps 4 significant bits: a few percent per head, whatever the head's magnitude (1e-4 .. 1e2)
    assert err[nonzero].max() < 0.05
    assert torch.equal(back.ssm[1, 2], torch.zeros_like(back.ssm[1, 2]))  # zero head: exact, no NaN
    # one scale for the whole tensor would flush the smallest heads to zero: the per-head scale is needed
    whole = (state.ssm / (state.ssm.abs().max() / 448)).to(FP8).float() * (state.ssm.abs().max() / 448)
    assert (whole[:, 0] == 0).float().mean() > 0.9 and (back.ssm[:, 0] != 0).float().mean() > 0.9


def test_safetensors_roundtrip_and_precision_of():
    state = random_state()
    for precision in PRECISIONS:
        tensors = load(save(quantize(state, precision)))
        assert precision_of(tensors) == precision
        assert torch.equal(dequantize(tensors, 17, state.fingerprint).ssm, roundtrip(state, precision).ssm)


def test_nbytes_from_config_match_the_tensors():
    state = random_state()
    for precision in PRECISIONS:
        tensors = quantize(state, precision)
        assert state_nbytes(CFG, precision) == sum(t.numel() * t.element_size() for t in tensors.values())
    big = Mamba2Config(d_model=2560, n_layer=64, vocab_size=50288)  # mamba2-2.7b
    assert state_nbytes(big, "bf16") / 2**20 == pytest.approx(82.0, abs=1.0)  # the figure of ../shared/docs/gpu.md
    assert state_nbytes(big, "fp8") < 0.52 * state_nbytes(big, "bf16")


def test_bad_input_names_the_fix():
    state = random_state()
    with pytest.raises(PicasoError, match="fp32, bf16, fp8"):
        quantize(state, "int4")
    tensors = quantize(state, "fp8")
    del tensors["ssm_scale"]
    with pytest.raises(PicasoError, match="Re-encode"):
        dequantize(tensors, 17, state.fingerprint)
    tensors = quantize(state, "fp8")
    tensors["ssm_scale"] = tensors["ssm_scale"][:1]
    with pytest.raises(PicasoError, match="re-encode"):
        dequantize(tensors, 17, state.fingerprint)


# ---------------------------------------------------------------- the precision option of the stores
def test_store_precision_option(tmp_path):
    from picaso_rag import StateStore, StoreStatus

    state = random_state()
    sizes = {}
    for precision in PRECISIONS:
        store = StateStore(tmp_path / precision, precision=precision)
        path = store.put("node", state, text="t")
        sizes[precision] = path.stat().st_size
        found = store.get("node", state.fingerprint, text="t")
        assert found.ok, found.detail
        want = roundtrip(state, precision)
        assert torch.equal(found.state.ssm.float(), want.ssm) and torch.equal(found.state.log_decay, state.log_decay)
        # a file of any precision reads back through any store (the precision is in the file)
        assert StateStore(tmp_path / precision).get("node", state.fingerprint, text="t").ok
    header = 1024  # a state file's header is under 1 KiB
    for precision in PRECISIONS:
        assert state_nbytes(CFG, precision) < sizes[precision] < state_nbytes(CFG, precision) + header
    with pytest.raises(PicasoError, match="fp32, bf16, fp8"):
        StateStore(tmp_path / "x", precision="int8")
    with pytest.raises(PicasoError, match="not both"):
        StateStore(tmp_path / "x", precision="fp8", dtype=torch.bfloat16)
    # a damaged fp8 file is corrupt, never loaded: a flipped scale changes the checksum
    store = StateStore(tmp_path / "fp8")
    path = store.path("node", state.fingerprint)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    assert store.get("node", state.fingerprint).status is StoreStatus.CORRUPT


def test_fp8_header_checks(tmp_path):
    from picaso_rag.errors import StateFileError
    from picaso_rag.store import decode_state_file, encode_state_file

    state = random_state()
    good = encode_state_file(state, "node", precision="fp8")
    header, tensors = decode_state_file(good)
    assert set(tensors) == {"ssm", "ssm_scale", "conv", "log_decay"} and tensors["ssm"].dtype == FP8
    bad = dict(quantize(state, "fp8"))
    bad["conv"] = bad["conv"].to(FP8)  # fp8 anywhere but ssm is refused
    with pytest.raises(StateFileError, match="F8_E4M3"):
        decode_state_file(save(bad, metadata=header.metadata))
    bad = dict(quantize(state, "fp8"))
    bad["ssm_scale"] = bad["ssm_scale"][:, :1].contiguous()
    with pytest.raises(StateFileError, match="ssm_scale shape"):
        decode_state_file(save(bad, metadata=header.metadata))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fp8_scale_is_the_correctly_rounded_quotient_on_every_device(device):
    """A head's scale is amax / 448 rounded once (what the CPU computes), so a state quantised on a
    GPU has the same bytes as on the CPU. CUDA divides by a Python number as a * (1/448) (PyTorch's
    BinaryDivTrueKernel.cu), which differs for about half of all values: the heads here are chosen
    among those. (On the CPU both roundings agree with the code; the CUDA case catches the bug.)"""
    amax = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 100 + 1e-3
    quotient = (amax.double() / 448).float()  # the exact quotient, rounded once
    reciprocal = amax * torch.tensor(1 / 448, dtype=torch.float32)
    differs = quotient != reciprocal
    print(f"\nvalues whose scale a * (1/448) gets wrong: {differs.float().mean():.1%}")
    assert differs.float().mean() > 0.3
    chosen = amax[differs][:CFG.n_layer * CFG.nheads].view(CFG.n_layer, CFG.nheads)
    state = random_state()
    ssm = state.ssm.clamp(-1e-3, 1e-3)  # below every chosen value: each head's largest magnitude is its chosen one
    ssm[..., 0, 0] = chosen
    state = State(ssm, state.conv, state.log_decay, state.n_tokens, state.fingerprint)
    scale = quantize(state.to(device), "fp8")["ssm_scale"].cpu()
    assert torch.equal(scale, (chosen.double() / 448).float())
