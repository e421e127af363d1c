"""GPU check of Nemotron-H: our HybridLM (Triton kernels, bf16) against transformers' NemotronHForCausalLM,
and composition's order invariance on the GPU. A random MoE Nemotron-H (every layer kind M, *, -, E;
Mamba-2 width by heads, not expand x hidden; grouped routing in a latent width), saved with
save_pretrained and loaded from its directory, as a user's checkpoint would be. Mamba-2 shapes as in
benchmarks/gpu_check.py (heads of 64, state 128, chunks of 256). Seconds once the Triton kernels are compiled.

Run on the GPU machine, after ``bash scripts/gpu_setup.sh build``:

    PYTHONPATH=. python scripts/nemotron_gpu_check.py --tokenizer ../shared/data/gpt-neox-20b-tokenizer.json \\
        --out docs/results/hybrid/nemotron_gpu_check.json

``--device cpu`` runs the same checks on the CPU (reference kernels only; what tests/test_hybrid_nemotron.py
covers at a smaller size). Errors are relative, ||a - b|| / ||b||, against transformers in fp32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from picaso_rag import PicasoEngine, Tokenizer, load_checkpoint
from picaso_rag.kernels import set_kernel_backend, triton_kernels_available

PATTERN = "M*-EM-M*E"  # hybrid_override_pattern: accepted by every transformers version with Nemotron-H
TOLERANCES = {"ours_fp32_vs_transformers_fp32": 2e-3,  # Triton's fp32 dots run in tf32
              "ours_bf16_vs_transformers_fp32": 5e-2}  # bf16 weights and activations (expert choices may flip)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def transformers_model(directory: Path, device: str):
    import transformers

    config = transformers.NemotronHConfig(
        vocab_size=50288, hidden_size=256, hybrid_override_pattern=PATTERN, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, intermediate_size=512, mamba_num_heads=6, mamba_head_dim=64, ssm_state_size=128, n_groups=2,
        chunk_size=256, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256, moe_latent_size=128, routed_scaling_factor=2.5,
        time_step_min=1e-9)  # transformers floors dt at time_step_min; we apply time_step_limit (docs/hybrids.md)
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for p in itertools.chain(model.parameters(), model.buffers()):
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return model.to(device), transformers.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="gpt-neox-20b tokenizer.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="where to write the JSON result")
    args = parser.parse_args()
    device, start = args.device, time.perf_counter()
    backends = ["reference"] + (["triton"] if device == "cuda" and triton_kernels_available() else [])
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "pattern": PATTERN, "backends": backends}
    directory = Path(tempfile.mkdtemp(prefix="nemotron-"))
    try:
        hf_model, result["transformers"] = transformers_model(directory, device)
        shutil.copy(args.tokenizer, directory / "tokenizer.json")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 50000, (2, 600), generator=g).to(device)  # 600: two full chunks of 256 and a partial one
        with torch.inference_mode():
            want = hf_model(ids).logits.float()
            prompt = ids[:1, :40]
            want_tokens = hf_model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                            pad_token_id=0)[0, 40:].tolist()

        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model, _ = load_checkpoint(directory, device=device, dtype=dtype)
            engine = PicasoEngine(model, Tokenizer.from_file(args.tokenizer))
            for backend in backends:
                set_kernel_backend(backend)
                with torch.inference_mode():
                    got = model(ids).logits
                tokens = engine.generate(prompt[0].tolist(), max_new_tokens=16).token_ids
                result[f"ours_{dtype_name}_{backend}_vs_transformers_fp32"] = {
                    "logits_rel_err": rel(got, want),
                    "greedy_tokens_agreement": sum(a == b for a, b in zip(tokens, want_tokens)) / len(want_tokens),
                }
        set_kernel_backend(backends[-1])

        # composition on this device, bf16: the composed state and the answer are the same for every order
        engine = PicasoEngine.from_pretrained(directory, device=device, dtype=torch.bfloat16)
        docs = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (50, 130, 257)]
        query = torch.randint(0, 50000, (24,), generator=g).tolist()
        states = engine.encode(docs)
        for method in ("picaso-s", "picaso-r"):
            reference, identical = None, True
            for order in itertools.permutations(range(len(states))):
                composed = engine.compose([states[i] for i in order], method=method)
                logits, _ = engine.read(query, state=composed)
                answer = engine.generate(query, state=composed, max_new_tokens=8).token_ids
                current = (composed.tensors(), logits, answer)
                if reference is None:
                    reference = current
                    continue
                identical &= all(torch.equal(t, reference[0][name]) for name, t in current[0].items())
                identical &= torch.equal(logits, reference[1]) and answer == reference[2]
            result[f"{method}_bitwise_identical_for_6_orders"] = identical
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    failures = [f"{key}: {value['logits_rel_err']:.2e} > {TOLERANCES[key.replace('_reference', '').replace('_triton', '')]}"
                for key, value in result.items() if isinstance(value, dict)
                and value["logits_rel_err"] > TOLERANCES[key.replace("_reference", "").replace("_triton", "")]]
    failures += [key for key, value in result.items() if key.endswith("_orders") and not value]
    result["failures"], result["passed"], result["seconds"] = failures, not failures, round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    raise SystemExit(0 if not failures else 1)


if __name__ == "__main__":
    main()
