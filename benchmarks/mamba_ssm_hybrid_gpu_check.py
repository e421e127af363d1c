"""GPU check: a mamba_ssm ``MambaLMHeadModel`` with attention layers (``attn_layer_idx``) saved with its own
``save_pretrained`` loads through :func:`picaso_rag.load_checkpoint` and gives mamba_ssm's logits.

The CPU test (tests/test_mamba_ssm_hybrid.py) compares against transformers' Nemotron-H holding the same
weights; this runs mamba_ssm itself (its Triton kernels need a GPU). Writes JSON.

    PYTHONPATH=. python benchmarks/mamba_ssm_hybrid_gpu_check.py --out docs/benchmarks/mamba_ssm_hybrid_gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from picaso_rag import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "mamba_ssm_hybrid_gpu_check.json")
    args = parser.parse_args()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    config = MambaConfig(d_model=256, d_intermediate=0, n_layer=6, vocab_size=50277, attn_layer_idx=[2, 5],
                         attn_cfg={"num_heads": 8, "num_heads_kv": 4, "head_dim": 32, "causal": True,
                                   "qkv_proj_bias": False, "out_proj_bias": False},
                         ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32, "chunk_size": 64,
                                  "use_mem_eff_path": False},  # its fused path needs the causal-conv1d extension
                         rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16)
    reference = MambaLMHeadModel(config, device="cuda", dtype=torch.float32).eval()
    ids = torch.randint(0, 50000, (2, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results: dict = {"device": torch.cuda.get_device_name(), "config": {k: v for k, v in vars(config).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        shutil.copy(REPO / "models" / "picaso-mini" / "tokenizer.json", Path(tmp) / "tokenizer.json")
        for dtype in (torch.float32, torch.bfloat16):
            ref = MambaLMHeadModel(config, device="cuda", dtype=dtype).eval()
            ref.load_state_dict(torch.load(Path(tmp) / "pytorch_model.bin", weights_only=True))
            ours, _ = load_checkpoint(tmp, device="cuda", dtype=dtype)
            with torch.no_grad():
                expected = ref(ids).logits.float()
                got = ours(ids).logits.float()
            diff = (got - expected).abs()
            name = str(dtype).replace("torch.", "")
            results[name] = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                             "logit_scale": expected.abs().mean().item(),
                             "argmax_agreement": (got.argmax(-1) == expected.argmax(-1)).float().mean().item()}
            print(name, results[name], flush=True)
    results["ok"] = results["float32"]["max_abs_diff"] < 1e-2 and results["bfloat16"]["argmax_agreement"] > 0.9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print("ok" if results["ok"] else "MISMATCH", args.out)


if __name__ == "__main__":
    main()
