"""GPU check of the state engine: Triton kernels against the pure-torch reference path, our model
against mamba_ssm's own MambaLMHeadModel, and document-encoding throughput.

Run on the GPU machine, after ``scripts/gpu_setup.sh build``:

    python benchmarks/gpu_check.py --tokenizer path/to/gpt-neox-20b-tokenizer.json --out docs/benchmarks/gpu_check.json

Errors are relative: ||a - b|| / ||b||, against the fp32 reference path. Timings: CUDA-synchronised
wall clock, median of repeats after warm-up, random bf16 weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, Tokenizer, init_weights
from picaso_rag.adapters import checkpoint_names
from picaso_rag.kernels import set_kernel_backend, triton_kernels_available

TOLERANCES = {  # relative error allowed, by comparison
    "triton_fp32_vs_reference_fp32": 2e-3,  # Triton's fp32 dots run in tf32
    "triton_bf16_vs_reference_bf16": 1e-2,  # same precision, different kernels
    "triton_bf16_vs_reference_fp32": 3e-2,  # bf16 weights and activations against fp32
}
BF16_TOL = 3e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def engines(cfg: Mamba2Config, tokenizer: Tokenizer) -> dict[str, PicasoEngine]:
    base = init_weights(Mamba2LM(cfg), seed=0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = Mamba2LM(cfg)
        model.load_state_dict(base.state_dict())
        out[name] = PicasoEngine(model.to("cuda", dtype), tokenizer)
    return out


def run_both(fn):
    """fn() under the reference backend and under Triton."""
    set_kernel_backend("reference")
    ref = fn()
    set_kernel_backend("triton")
    return ref, fn()


def decode_logits(engine: PicasoEngine, state, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced decoding: the logits of each single-token step (the step kernels' path)."""
    ssm, conv = state.ssm[None].to(engine.model.dtype).clone(), state.conv[None].to(engine.model.dtype).clone()
    logits = []
    with torch.inference_mode():
        for t in tokens:
            logits.append(engine.model.step(torch.tensor([t], device="cuda"), ssm, conv)[0].float())
    return torch.stack(logits)


def correctness(tokenizer: Tokenizer) -> dict:
    cfg = Mamba2Config(d_model=512, n_layer=4, vocab_size=50288, d_state=128, headdim=64, chunk_size=256)
    eng = engines(cfg, tokenizer)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (3, 50, 255, 256, 257, 700, 1300, 90)]
    query = torch.randint(0, 50000, (64,), generator=g).tolist()
    def run(e: PicasoEngine, backend: str, forced_tokens: list[int] | None = None) -> dict:
        set_kernel_backend(backend)
        states = e.encode(docs, batch_size=4)
        ctx = e.compose(states, "picaso-s")
        logits, _ = e.read(query, state=ctx)
        gen = e.generate(query, state=ctx, max_new_tokens=32)
        step = decode_logits(e, ctx, forced_tokens if forced_tokens is not None else gen.token_ids)
        return {"states": states, "logits": logits, "tokens": gen.token_ids, "step": step}

    reference = {dtype: run(eng[dtype], "reference") for dtype in ("fp32", "bf16")}
    results = {}
    for dtype, ref_dtype in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
        ref = reference[ref_dtype]
        got = run(eng[dtype], "triton", forced_tokens=ref["tokens"])
        pairs = list(zip(got["states"], ref["states"]))
        agree = sum(a == b for a, b in zip(got["tokens"], ref["tokens"])) / max(1, len(ref["tokens"]))
        results[f"triton_{dtype}_vs_reference_{ref_dtype}"] = {
            "encode_ssm_state_max_rel_err": max(rel(s.ssm, r.ssm) for s, r in pairs),
            "encode_conv_state_max_rel_err": max(rel(s.conv, r.conv) for s, r in pairs),
            "encode_log_decay_max_rel_err": max(rel(s.log_decay, r.log_decay) for s, r in pairs),
            "read_from_composed_state_logits_rel_err": rel(got["logits"], ref["logits"]),
            "decode_step_logits_rel_err": rel(got["step"], ref["step"]),
            "greedy_tokens_agreement": agree,
            "greedy_first_divergence": next((i for i, (a, b) in enumerate(zip(got["tokens"], ref["tokens"])) if a != b), None),
        }
    return results


def _mamba_ssm_cfg() -> dict:
    """mamba_ssm's fused path needs causal-conv1d; without it, its unfused path (torch conv1d)."""
    try:
        import causal_conv1d  # noqa: F401

        return {"layer": "Mamba2"}
    except ImportError:
        return {"layer": "Mamba2", "use_mem_eff_path": False}


def against_mamba_ssm(tokenizer: Tokenizer) -> dict:
    """Our model vs mamba_ssm's MambaLMHeadModel loaded with the same weights (bf16, fused kernels)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = Mamba2Config(d_model=768, n_layer=4, vocab_size=50288, d_state=128, headdim=64, chunk_size=256)
    ours = init_weights(Mamba2LM(cfg), seed=1).to("cuda", torch.bfloat16).eval()
    theirs = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=4, vocab_size=50288, ssm_cfg=_mamba_ssm_cfg(),
                                          rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                                          pad_vocab_size_multiple=16, tie_embeddings=True),
                              device="cuda", dtype=torch.bfloat16).eval()
    missing, unexpected = theirs.load_state_dict(checkpoint_names(ours.state_dict(), ours.cfg), strict=False)
    ids = torch.randint(0, 50000, (2, 600), device="cuda")
    with torch.inference_mode():
        want = theirs(ids).logits
        set_kernel_backend("triton")
        got = ours(ids).logits
    return {"logits_rel_err_bf16": rel(got, want), "missing_keys": list(missing), "unexpected_keys": list(unexpected),
            "mamba_ssm_ssm_cfg": _mamba_ssm_cfg()}


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(tokenizer: Tokenizer) -> dict:
    """encode tokens/s for mamba2-130m shapes, against a plain batched prefill of mamba_ssm's model."""
    cfg = Mamba2Config(d_model=768, n_layer=24, vocab_size=50288, d_state=128, headdim=64, chunk_size=256)
    model = init_weights(Mamba2LM(cfg), seed=2).to("cuda", torch.bfloat16)
    engine = PicasoEngine(model, tokenizer, fingerprint="benchmark")
    set_kernel_backend("triton")
    out = {}
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        plain = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=24, vocab_size=50288, ssm_cfg=_mamba_ssm_cfg(),
                                             rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                                             pad_vocab_size_multiple=16, tie_embeddings=True),
                                 device="cuda", dtype=torch.bfloat16).eval()
    except Exception as exc:  # pragma: no cover - reported in the JSON
        plain, out["plain_prefill_error"] = None, repr(exc)
    for batch in (16, 64):
        docs = torch.randint(0, 50000, (batch, 512)).tolist()
        ids = torch.tensor(docs, device="cuda")
        t_encode = timed(lambda: engine.encode(docs, batch_size=batch))
        t_forward = timed(lambda: model(ids, logits="none"))
        row = {"encode_tokens_per_s": batch * 512 / t_encode, "our_forward_no_logits_tokens_per_s": batch * 512 / t_forward}
        if plain is not None:
            with torch.inference_mode():
                t_plain = timed(lambda: plain(ids, num_last_tokens=1))
            row["mamba_ssm_prefill_tokens_per_s"] = batch * 512 / t_plain
            row["encode_vs_plain_prefill"] = row["encode_tokens_per_s"] / row["mamba_ssm_prefill_tokens_per_s"]
        out[f"B{batch}_L512"] = row
    out["mamba_ssm_ssm_cfg"] = _mamba_ssm_cfg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "run this on the GPU machine"
    assert triton_kernels_available(), "mamba-ssm is not installed: run scripts/gpu_setup.sh build first"
    tokenizer = Tokenizer.from_file(args.tokenizer)
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "correctness": correctness(tokenizer),
        "vs_mamba_ssm_model": against_mamba_ssm(tokenizer),
        "throughput_mamba2_130m_shape_bf16": throughput(tokenizer),
    }
    import mamba_ssm

    report["mamba_ssm"] = mamba_ssm.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    failures = []
    for name, r in report["correctness"].items():
        tol = TOLERANCES[name]
        for key in ("encode_ssm_state_max_rel_err", "read_from_composed_state_logits_rel_err", "decode_step_logits_rel_err"):
            if not r[key] <= tol:
                failures.append(f"{name}.{key} = {r[key]:.2e} > {tol}")
    if not report["vs_mamba_ssm_model"]["logits_rel_err_bf16"] <= BF16_TOL:
        failures.append(f"vs mamba_ssm logits {report['vs_mamba_ssm_model']['logits_rel_err_bf16']:.2e}")
    print("GPU CHECK", "FAILED:\n  " + "\n  ".join(failures) if failures else "PASSED")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
