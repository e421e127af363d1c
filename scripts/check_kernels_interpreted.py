"""Check the GPU decode-step call against its reference on a CPU, in Triton's interpreter.

``ssm_step`` hands mamba_ssm's ``selective_state_update`` tied per-headdim parameters (stride 0),
the dt bias and the fused softplus. This runs that exact call on the CPU, with the Triton kernel
taken from the mamba-ssm source archive (mamba-ssm itself cannot be installed without CUDA), and
compares it with ``ssm_step_ref``. CI has no Triton; run it where Triton is installed:

    scripts/gpu_setup.sh fetch          # the mamba-ssm source archive, into .gpu/
    pip install triton einops
    python scripts/check_kernels_interpreted.py .gpu/mamba_ssm-2.3.2.post1.tar.gz

(The composition and conv-step kernels have their interpreter test in tests/test_kernels.py.)
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"


def unpack_triton_ops(archive: Path, into: Path) -> None:
    """mamba_ssm/ops/triton/{selective_state_update,softplus}.py as a bare package under ``into``."""
    package = into / "mamba_ssm" / "ops" / "triton"
    package.mkdir(parents=True)
    for init in (into / "mamba_ssm", into / "mamba_ssm" / "ops", package):
        (init / "__init__.py").touch()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.name.endswith(f"mamba_ssm/ops/triton/{name}") and name in ("selective_state_update.py", "softplus.py"):
                source = tar.extractfile(member).read().decode()
                # the interpreter runs on CPU tensors, which have no CUDA device index to switch to
                source = source.replace("with torch.cuda.device(x.device.index):", "if True:")
                (package / name).write_text(source)


def main() -> None:
    archive = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/mamba_ssm-2.3.2.post1.tar.gz")
    root = Path(tempfile.mkdtemp())
    unpack_triton_ops(archive, root)
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    import picaso_rag.kernels.ssd as ssd

    ssd._triton_for = lambda t: True  # take the Triton branch on CPU tensors
    gen = torch.Generator().manual_seed(0)
    b, h, p, n, g = 2, 4, 8, 16, 2
    for dtype in (torch.float32, torch.bfloat16):
        for limit in ((0.0, float("inf")), (0.001, 0.1)):  # the fused softplus, and the clamped path
            def rand(*shape):
                return torch.randn(*shape, generator=gen).to(dtype)

            state, x, dt = rand(b, h, p, n), rand(b, h, p), rand(b, h)
            A = -torch.rand(h, generator=gen) * 4
            B, C, D, bias = rand(b, g, n), rand(b, g, n), rand(h), rand(h)
            ref_state, triton_state = state.clone(), state.clone()
            y_ref = ssd.ssm_step_ref(ref_state, x, dt, A, B, C, D, dt_bias=bias, dt_limit=limit)
            y = ssd.ssm_step(triton_state, x, dt, A, B, C, D, dt_bias=bias, dt_limit=limit)

            def rel(a, r):
                return ((a.float() - r.float()).norm() / r.float().norm()).item()

            print(f"{str(dtype):15s} dt_limit={limit}: output rel. error {rel(y, y_ref):.1e}, state {rel(triton_state, ref_state):.1e}")


if __name__ == "__main__":
    main()
