"""A hybrid model's per-document states stored like Mamba-2 states: precision, shape spec, bounds, budgets.

A tiny random picaso_hybrid model (2 Mamba-2 and 2 NoPE attention layers) on the CPU, fp32.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from picaso_rag import PicasoEngine, PicasoError, State, StateCache, StateStore, StoreStatus
from picaso_rag.cache import BudgetedStore
from picaso_rag.resolver import DocumentRef, StateResolver, StateWriter
from picaso_rag.errors import StateFileError, StateMismatchError
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.precision import FP8, PRECISIONS, dequantize, kv_nbytes_per_token, quantize, roundtrip, state_nbytes
from picaso_rag.state import HybridState, HybridStateSpec, StateSpec
from picaso_rag.store import DEFAULT_MAX_STATE_BYTES, encode_state_file, parse_state_header

from .conftest import TEXTS

QUERY = " Which of these happens in chloroplasts? The answer is"


def hybrid_config(**overrides) -> HybridConfig:
    base = dict(family="picaso_hybrid", vocab_size=50288, d_model=64, layer_types=("mamba", "attention", "mamba", "attention"),
                n_heads=4, n_kv_heads=2, head_dim=16, d_state=16, headdim=16, ngroups=1, chunk_size=16)
    base.update(overrides)
    return HybridConfig(**base)


@pytest.fixture(scope="module")
def hybrid(tokenizer) -> PicasoEngine:
    # std 0.1: logits far enough from uniform that a storage error shows in them (0.02 gives near-uniform ones)
    return PicasoEngine(init_weights(HybridLM(hybrid_config()), seed=0, std=0.1), tokenizer)


@pytest.fixture(scope="module")
def states(hybrid) -> list[HybridState]:
    return hybrid.encode(TEXTS)


def same(a: HybridState, b: HybridState) -> bool:
    return (type(a) is type(b) and a.position == b.position and a.n_tokens == b.n_tokens
            and all(torch.equal(t, b.tensors()[name]) and t.dtype == b.tensors()[name].dtype for name, t in a.tensors().items()))


# ------------------------------------------------------------------------------------- precision
def test_fp32_round_trips_bitwise_and_bf16_fp8_within_their_rounding(states):
    state = states[2]
    assert same(roundtrip(state, "fp32"), state)
    back = roundtrip(state, "bf16")
    for name in ("keys", "values", "ssm", "conv"):  # bf16 keeps 8 significant bits
        assert ((getattr(back, name) - getattr(state, name)).abs() <= getattr(state, name).abs() * 2**-8).all(), name
    tensors = quantize(state, "fp8")
    assert {n: t.dtype for n, t in tensors.items() if t.dtype == FP8}.keys() == {"ssm", "keys", "values"}
    assert tensors["keys_scale"].shape == (2, 2, 16) and tensors["keys_scale"].dtype == torch.float32
    back = roundtrip(state, "fp8")
    assert back.position == state.position and torch.equal(back.log_decay, state.log_decay)
    for name in ("keys", "values"):
        x, err = getattr(state, name), (getattr(back, name) - getattr(state, name)).abs()
        scale = tensors[f"{name}_scale"][:, :, None, :]
        # e4m3: 3 mantissa bits (relative rounding <= 2^-4) down to 2^-6, subnormal steps of 2^-9 below (x the scale)
        assert (err <= x.abs() * 2**-4 + scale * 2**-10).all(), name


def test_fp8_per_channel_scale_keeps_every_key_channel():
    """Key channels 10^6 apart (outlier channels, as real keys have): each keeps its 4 significant
    bits under its own scale, where one scale for the tensor flushes the small channels to zero."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 50, 16, generator=g) * torch.logspace(-4, 2, 16)[None, None, None, :]
    keys[1, 0, :, 3] = 0.0  # an all-zero channel: exact, no NaN
    state = HybridState(torch.zeros(1, 8, 16, 16), torch.zeros(1, 160, 3), torch.zeros(1, 8), 50, "ab" * 32,
                        keys=keys, values=keys.flip(-1).contiguous(), position=50)
    back = roundtrip(state, "fp8")
    for name in ("keys", "values"):
        x, y = getattr(state, name), getattr(back, name)
        assert ((y - x).abs() <= x.abs() * 2**-4).all(), name  # every value normal in its channel's window
        assert torch.isfinite(y).all()
    assert torch.equal(back.keys[1, 0, :, 3], torch.zeros(50))
    whole = keys.abs().max() / 448
    flat = (keys / whole).to(FP8).float() * whole
    assert (flat[..., 0] == 0).float().mean() > 0.9 and (back.keys[..., 0] != 0).float().mean() > 0.9


def test_reading_the_query_from_stored_states_stays_close(hybrid, states):
    """The query read from states stored in bf16 / fp8 (then composed) against fp32 states.

    Tolerances: (1) what the storage moves the query's logits by, relative to what the documents
    themselves move them (with against without context), stays below the per-value rounding of the
    format (bf16 2^-8, fp8 2^-4), i.e. this shallow model does not amplify storage errors beyond a
    stored value's own (measured: 0.09% and 0.45%); (2) the KL divergence from the fp32 next-token
    distributions (the expected extra NLL, nats/token) stays below 0.001, the scale at which
    docs/scaling.md accepted fp8 for Mamba-2 states (<= 0.0003 measured on picaso-mini v1; measured
    here: 1e-6 and 1.5e-5). A broken scale or axis moves the logits by the documents' whole effect.
    Deeper random models amplify more: benchmarks/hybrid_states_gpu_check.py reports a 12-layer one."""
    reference, _ = hybrid.read(QUERY, state=hybrid.compose(states))
    alone, _ = hybrid.read(QUERY)
    signal = (reference - alone).abs().max()
    for precision, per_value in (("bf16", 2**-8), ("fp8", 2**-4)):
        stored, _ = hybrid.read(QUERY, state=hybrid.compose([roundtrip(s, precision) for s in states]))
        moved = (stored - reference).abs().max()
        assert 0 < moved < per_value * signal, (precision, float(moved), float(signal))
        log_p, log_q = reference.log_softmax(-1), stored.log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        assert kl.max() < 1e-3, (precision, float(kl.max()))


def test_bytes_per_token_from_the_config_match_the_stored_tensors(hybrid, states):
    cfg = hybrid.model.cfg
    for state in states[:2]:
        for precision in PRECISIONS:
            tensors = quantize(state, precision)
            assert sum(t.numel() * t.element_size() for t in tensors.values()) == state_nbytes(cfg, precision, state.n_keys)
    assert kv_nbytes_per_token(cfg, "fp32") == 2 * 2 * 2 * 16 * 4 == states[0].kv_bytes_per_token
    assert [kv_nbytes_per_token(cfg, p) for p in PRECISIONS] == [512, 256, 128]


# -------------------------------------------------------------------------------------- the store
def test_store_round_trips_at_every_precision_with_every_guarantee(hybrid, states, tmp_path):
    fp, state = hybrid.fingerprint, states[2]
    for precision in (None, *PRECISIONS):
        store = StateStore(tmp_path / str(precision), precision=precision, mac=True)
        path = store.put("node", state, text=TEXTS[2])
        found = store.get("node", fp, text=TEXTS[2])
        assert found.ok, (precision, found.detail)
        if precision in (None, "fp32"):
            assert same(found.state, state)  # bit for bit
        else:
            assert same(found.state, roundtrip(state, precision, dtype=found.state.ssm.dtype))
        header = 1536  # a hybrid fp8 file's header (8 tensors, a MAC) is about 1.1 KiB
        assert 0 < path.stat().st_size - state_nbytes(hybrid.model.cfg, precision or "fp32", state.n_keys) < header
        assert store.get("node", fp, text="another text").status is StoreStatus.STALE
        # a flipped bit in the keys' scale (fp8) or the keys is caught by the checksum
        data = bytearray(path.read_bytes())
        offsets = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        name = "keys_scale" if precision == "fp8" else "keys"
        data[8 + struct.unpack("<Q", data[:8])[0] + offsets[name]["data_offsets"][0]] ^= 0x01
        path.write_bytes(bytes(data))
        assert store.get("node", fp, text=TEXTS[2]).status is StoreStatus.CORRUPT
    # a file written without this store's MAC key (forged with a valid checksum) is corrupt
    signed = StateStore(tmp_path / "fp8", mac=True)
    StateStore(tmp_path / "fp8").put("node", state, text=TEXTS[2])
    found = signed.get("node", fp, text=TEXTS[2])
    assert found.status is StoreStatus.CORRUPT and "MAC" in found.detail


def test_planted_files_of_another_hybrid_or_shape_are_refused_by_the_spec(hybrid, states, tmp_path, tokenizer):
    fp = hybrid.fingerprint
    spec = hybrid.state_spec
    assert isinstance(spec, HybridStateSpec) and spec.kv == (2, 2, 16) and spec.max_tokens == hybrid.max_document_tokens
    store = StateStore(tmp_path)
    other = PicasoEngine(init_weights(HybridLM(hybrid_config(n_kv_heads=4, layer_types=("mamba", "attention"))), seed=1),
                         tokenizer).encode([TEXTS[0]])[0]
    mamba = State(states[0].ssm, states[0].conv, states[0].log_decay, 5, fp)
    longer = states[0]
    planted = {  # each with this model's fingerprint and a valid checksum: only the shapes give it away
        "another hybrid": (HybridState(other.ssm, other.conv, other.log_decay, other.n_keys, fp, keys=other.keys,
                                       values=other.values, position=other.n_keys), "shape"),
        "other kv heads": (HybridState(longer.ssm, longer.conv, longer.log_decay, longer.n_keys, fp,
                                       keys=longer.keys.repeat(1, 2, 1, 1), values=longer.values.repeat(1, 2, 1, 1),
                                       position=longer.n_keys), "keys"),
        "a Mamba-2 state": (mamba, "Mamba-2 model's state"),
    }
    for label, (state, message) in planted.items():
        for precision in ("fp32", "fp8"):
            path = store.path(label, fp)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_state_file(state, label, precision=precision))
            found = store.get(label, fp, spec=spec)
            assert found.status is StoreStatus.CORRUPT and message in found.detail, (label, found.detail)
            assert [e.status for e in store.entries(fp, spec=spec) if e.path == path] == [StoreStatus.CORRUPT]
            assert store.get_many([label, label], fp, spec=spec)[1].status is StoreStatus.CORRUPT
    # the store refuses to write what a reader with the spec would refuse, and writes nothing
    with pytest.raises(PicasoError, match="not stored"):
        store.put("x", planted["other kv heads"][0], spec=spec)
    assert not store.path("x", fp).exists()


def test_the_longest_document_bounds_a_state_and_follows_the_engine(hybrid, states, tmp_path, tokenizer):
    state = states[4]
    n = state.n_keys
    # the same model under another fingerprint, whose documents may hold one token fewer than this state
    small = PicasoEngine(hybrid.model, tokenizer, fingerprint="ef" * 32, max_document_tokens=n - 1)
    assert small.state_spec.max_tokens == n - 1
    long_state = HybridState(state.ssm, state.conv, state.log_decay, n, small.fingerprint, keys=state.keys,
                             values=state.values, position=n)
    store = StateStore(tmp_path)
    with pytest.raises(PicasoError, match="raise engine.max_document_tokens"):  # refused, nothing half written
        store.put("long", long_state, spec=small.state_spec)
    assert not store.path("long", small.fingerprint).exists()
    path = store.path("long", small.fingerprint)  # planted anyway: refused on reading, before its tensors
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_state_file(long_state, "long"))
    found = store.get("long", small.fingerprint, spec=small.state_spec)
    assert found.status is StoreStatus.CORRUPT and "max_document_tokens" in found.detail
    small.max_document_tokens = n  # the spec follows the engine's limit
    assert small.state_spec.max_tokens == n and store.get("long", small.fingerprint, spec=small.state_spec).ok
    small.max_document_tokens = n - 1  # and back: what a read accepts is what its caller passes, nothing else
    assert store.get("long", small.fingerprint, spec=small.state_spec).status is StoreStatus.CORRUPT


def test_a_store_validates_the_same_whether_or_not_an_engine_was_built(hybrid, states, tmp_path, tokenizer):
    """No process-wide registry: building engines (of any limit) changes nothing a store accepts."""
    import subprocess
    import sys

    state = states[4]
    fp = "ab" * 32
    store = StateStore(tmp_path)
    long_state = HybridState(state.ssm, state.conv, state.log_decay, state.n_keys, fp, keys=state.keys,
                             values=state.values, position=state.n_keys)
    store.put("long", long_state)
    spec = PicasoEngine(hybrid.model, tokenizer, fingerprint=fp, max_document_tokens=state.n_keys - 1).state_spec
    # with the spec: CORRUPT (longer than its longest document); without: OK, in this process and in a fresh
    # one where no engine was ever built
    assert store.get("long", fp, spec=spec).status is StoreStatus.CORRUPT
    assert store.get("long", fp).ok
    code = (f"from picaso_rag import StateStore; import sys; s = StateStore({str(tmp_path)!r}); "
            f"sys.exit(0 if s.get('long', {fp!r}).ok else 1)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    import picaso_rag.state as state_module

    assert not any(name in vars(state_module) for name in ("register_state_spec", "state_spec_for", "_SPECS"))


def test_a_long_document_of_a_big_hybrid_reads_past_the_default_bound():
    """Granite-4.0-H-like attention (4 layers, 8 kv heads x 128): 131,072 tokens of fp32 keys and
    values are 4 GiB, past the 1 GiB default; the model's spec bounds its files instead."""
    cfg = hybrid_config(d_model=4096, layer_types=("mamba",) * 36 + ("attention",) * 4, n_heads=32, n_kv_heads=8,
                        head_dim=128, d_state=128, headdim=64, ngroups=1, chunk_size=256)
    spec = HybridStateSpec.of_config(cfg, max_tokens=1 << 17)
    assert spec.max_nbytes > 4 * DEFAULT_MAX_STATE_BYTES
    n = 1 << 17  # a header describing such a file (the tensor bytes are never read by the header check)
    shapes = {**spec.shapes(), "keys": (4, 8, n, 128), "values": (4, 8, n, 128)}
    tensors, start = {}, 0
    for name, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        tensors[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    metadata = {"format": "picaso-state/1", "node_id": "n", "fingerprint": "ab" * 32, "n_tokens": str(n),
                "position": str(n), "checksum": "0" * 64}
    header = json.dumps({"__metadata__": metadata, **tensors}).encode()
    assert parse_state_header(header, spec).data_len == start > DEFAULT_MAX_STATE_BYTES
    with pytest.raises(StateFileError, match="more than a state's"):
        parse_state_header(header)  # a process that does not know the model keeps the default bound
    shapes["keys"] = shapes["values"] = (4, 8, n + 1, 128)
    with pytest.raises(StateMismatchError, match="131,073 tokens"):
        spec.check_shapes(shapes)


def test_a_state_above_the_bound_of_an_unknown_model_is_refused_before_writing(states, tmp_path):
    state = states[2]
    unknown = HybridState(state.ssm, state.conv, state.log_decay, state.n_tokens, "cd" * 32, keys=state.keys,
                          values=state.values, position=state.position)
    store = StateStore(tmp_path, max_state_bytes=state.nbytes // 2)
    with pytest.raises(PicasoError, match="max_state_bytes"):
        store.put("n", unknown)
    assert not any(p.is_file() for p in (tmp_path / "v1").rglob("*")) if (tmp_path / "v1").exists() else True
    assert StateStore(tmp_path, max_state_bytes=state.nbytes).put("n", unknown).is_file()


def test_the_bound_counts_an_fp8_file_as_read_back_in_fp32(states, tmp_path):
    """An fp8 file is a quarter of the state it reads back as: the bound holds for both, on put and
    on read, before a tensor byte is read."""
    state = states[2]
    fp8 = StateStore(tmp_path, precision="fp8", max_state_bytes=state.nbytes // 2)  # the file fits, the state not
    with pytest.raises(PicasoError, match="as read back"):
        fp8.put("n", state)
    path = StateStore(tmp_path, precision="fp8").put("n", state)  # planted by a store of a larger bound
    assert path.stat().st_size < state.nbytes // 2
    found = fp8.get("n", state.fingerprint)
    assert found.status is StoreStatus.CORRUPT and "as read" in found.detail
    assert StateStore(tmp_path, max_state_bytes=state.nbytes).get("n", state.fingerprint).ok


def test_mamba2_specs_refuse_hybrid_files(engine, tmp_path):
    spec = StateSpec.of_config(engine.model.cfg)
    state = engine.encode([TEXTS[0]])[0]
    hybrid_like = HybridState(state.ssm, state.conv, state.log_decay, 3, engine.fingerprint,
                              keys=torch.zeros(1, 1, 3, 4), values=torch.zeros(1, 1, 3, 4), position=3)
    path = StateStore(tmp_path).path("n", engine.fingerprint)
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_state_file(hybrid_like, "n"))
    found = StateStore(tmp_path).get("n", engine.fingerprint, spec=engine.state_spec)
    assert found.status is StoreStatus.CORRUPT and "Mamba-2 model" in found.detail
    with pytest.raises(StateMismatchError):
        spec.check(hybrid_like)


def test_fp8_hybrid_file_layout_is_checked(states):
    state = states[1]
    good = quantize(state, "fp8")
    metadata = {"format": "picaso-state/1", "node_id": "n", "fingerprint": state.fingerprint,
                "n_tokens": str(state.n_keys), "position": str(state.n_keys), "checksum": "0" * 64}

    def header_of(tensors: dict) -> bytes:
        data = save(tensors, metadata=metadata)
        return data[8:8 + struct.unpack("<Q", data[:8])[0]]

    parse_state_header(header_of(good))
    bad = dict(good, keys_scale=good["keys_scale"][:, :1].contiguous())
    with pytest.raises(StateFileError, match="keys_scale shape"):
        parse_state_header(header_of(bad))
    bad = dict(good, values=good["values"].float())  # fp8 files hold keys and values in e4m3
    with pytest.raises(StateFileError, match="F8_E4M3"):
        parse_state_header(header_of(bad))
    bad = {n: t for n, t in good.items() if n != "values_scale"}
    with pytest.raises(StateFileError, match="expected tensors"):
        parse_state_header(header_of(bad))
    with pytest.raises(PicasoError, match="values_scale"):
        dequantize(dict(good, values_scale=good["values_scale"][:1]), 3, state.fingerprint)


# ------------------------------------------------------------------------------- budgets in bytes
def test_cache_and_budgeted_store_count_a_hybrid_state_by_its_real_size(hybrid, states, tmp_path):
    short, long_ = states[3], states[4]
    assert long_.nbytes - short.nbytes == (long_.n_keys - short.n_keys) * short.kv_bytes_per_token > 0
    cache = StateCache(device_bytes=2 * short.nbytes + long_.nbytes - 1, host_bytes=0)
    cache.put("a", short)
    cache.put("b", short)
    assert cache.stats().device_bytes == 2 * short.nbytes
    cache.put("c", long_)  # does not fit beside both short ones: the oldest goes
    stats = cache.stats()
    assert stats.device_bytes == short.nbytes + long_.nbytes <= stats.device_budget and cache.keys() == ["b", "c"]
    small = StateCache(device_bytes=long_.nbytes - 1)
    small.put("x", long_)  # larger than the budget by a byte: not cached
    assert small.stats().not_cached == 1 and small.stats().device_bytes == 0

    local = StateStore(tmp_path / "states")
    sizes = {}
    for i, state in enumerate(states):
        sizes[i] = local.put(f"n{i}", state).stat().st_size
    budget = sizes[4] + sizes[3]
    disk = BudgetedStore(StateStore(tmp_path / "states"), budget)  # counts the files it finds by their size
    assert disk.bytes == sum(sizes.values())
    disk.put("n4", states[4])  # the budget is enforced on the next write: least recently used out
    assert disk.bytes == sum(p.stat().st_size for p in (tmp_path / "states" / "v1").rglob("*.safetensors")) <= budget
    assert local.get("n4", hybrid.fingerprint).ok


def test_resolver_serves_hybrid_states_from_memory_and_store(hybrid, states, tmp_path):
    store = StateStore(tmp_path / "states", precision="fp8")
    writer = StateWriter()
    resolver = StateResolver(hybrid, StateCache(device_bytes=sum(s.nbytes for s in states)), [store], writer)
    docs = [DocumentRef.of(text, f"n{i}") for i, text in enumerate(TEXTS[:3])]
    first = resolver.resolve(docs)
    assert first.stats["states_encoded"] == 3 and all(s.has_keys for s in first.states)
    writer.flush()
    cold = StateResolver(hybrid, StateCache(device_bytes=1 << 30), [store]).resolve(docs)
    assert cold.stats["loaded_per_store"] == [3] and cold.stats["states_encoded"] == 0
    for got, want in zip(cold.states, first.states):
        assert got.position == want.position and got.keys.shape == want.keys.shape
        assert torch.allclose(got.keys, want.keys, rtol=2**-4, atol=1e-3)
    logits, _ = hybrid.read(QUERY, state=hybrid.compose(cold.states))
    assert torch.isfinite(logits).all()
    writer.close()


def test_a_header_that_lies_about_its_tokens_is_corrupt(hybrid, states, tmp_path):
    """A document's stored state holds one key per token from position 0: a header claiming 5,000
    tokens (or another position) over 3 tokens' keys is refused, whatever its checksum."""
    state = states[0]
    store = StateStore(tmp_path)
    for n_tokens, position in ((5000, state.n_keys), (state.n_keys, 5000), (5000, 5000)):
        lying = HybridState(state.ssm, state.conv, state.log_decay, n_tokens, hybrid.fingerprint, keys=state.keys,
                            values=state.values, position=position)
        path = store.path("liar", hybrid.fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_state_file(lying, "liar"))
        found = store.get("liar", hybrid.fingerprint)
        assert found.status is StoreStatus.CORRUPT and "one key per token" in found.detail, (n_tokens, position)
