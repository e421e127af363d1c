"""Loading and saving checkpoints of every family (picaso_rag.adapters), the tokenizer, the fingerprint.

Weights load without executing code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import adapters
from .config import ModelConfig
from .errors import CheckpointError
from .layers import SigmoidRouter
from .model import PicasoLM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class Tokenizer:
    """A thin wrapper over a ``tokenizers`` tokenizer.json (the format of GPT-NeoX and most HF models).

    Usage: ``tok = Tokenizer.from_file("tokenizer.json"); ids = tok.encode("hello")``.
    """

    def __init__(self, tokenizer, eos_token: str | None = None):
        self._tok = tokenizer
        self.eos_token_id: int | None = None
        for candidate in ([eos_token] if eos_token else []) + ["<|endoftext|>", "</s>", "<eos>"]:
            tid = tokenizer.token_to_id(candidate)
            if tid is not None:
                self.eos_token_id = tid
                break

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded into the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise CheckpointError(f"{name!r} is not a directory; pass the path of a Mamba-2 checkpoint directory or a hub id like 'state-spaces/mamba2-130m'.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin", "tokenizer*"]))
    except Exception as exc:  # offline, unknown repo, ...
        raise CheckpointError(
            f"could not download {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "without network access, download the checkpoint elsewhere and pass its local directory."
        ) from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors weight file; a truncated or damaged one is a CheckpointError naming the fix."""
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError for a missing shard)
        raise CheckpointError(
            f"{path} could not be read as safetensors ({type(exc).__name__}: {str(exc)[:200]}); the file is truncated "
            "or damaged (an interrupted download or copy?): download or copy the checkpoint again."
        ) from None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
            if not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
                raise ValueError("shard names must be plain file names")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{directory / 'model.safetensors.index.json'} is not a valid index ({exc}); "
                                  "restore it from the checkpoint.") from None
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(_load_safetensors(directory / shard))
        return weights
    if (directory / "pytorch_model.bin").is_file():
        try:  # weights_only: refuse pickled code, load tensors only
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{directory / 'pytorch_model.bin'} could not be loaded as plain tensors ({type(exc).__name__}); "
                "it may hold pickled code, which picaso-rag refuses to run. Convert it to model.safetensors."
            ) from exc
    raise CheckpointError(f"{directory} has config.json but no weights; expected one of {', '.join(WEIGHT_FILES)}.")


def fingerprint_of(model: PicasoLM, tokenizer: Tokenizer) -> str:
    """sha256 of the config, the tokenizer, the dtype and every weight: states are valid only for this.

    A pure Mamba-2 model hashes its config and weight names as its checkpoint (mamba_ssm's layout)
    has them, as before the one-model code: the states users stored stay valid."""
    cfg = model.cfg
    h = hashlib.sha256()
    described = adapters.mamba2_legacy_dict(cfg) if adapters.is_pure_mamba2(cfg) else cfg.to_dict()
    h.update(json.dumps(described, sort_keys=True).encode())
    h.update(tokenizer.to_json().encode())
    h.update(str(model.dtype).encode())
    for name, t in sorted(adapters.checkpoint_names(model.state_dict(), cfg).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_tokenizer(directory: Path, tokenizer: str | os.PathLike | Tokenizer | None) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    tok_path = Path(tokenizer).expanduser() if tokenizer is not None else directory / "tokenizer.json"
    if tok_path.is_dir():  # a tokenizer directory (a transformers checkpoint's, say): its tokenizer.json
        tok_path = tok_path / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(
            f"no tokenizer at {tok_path}. state-spaces checkpoints ship without one: pass "
            "tokenizer='path/to/gpt-neox-20b-tokenizer.json' (or put tokenizer.json in the checkpoint directory)."
        )
    return Tokenizer.from_file(tok_path)


def load_checkpoint(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
) -> tuple[PicasoLM, Tokenizer]:
    """Load a checkpoint of any family picaso_rag.adapters maps, and its tokenizer.

    Pure Mamba-2 (mamba_ssm or transformers layout), mamba_ssm with ``attn_layer_idx``,
    transformers' ``GraniteMoeHybridForCausalLM`` (Granite 4.0-H, dense and MoE),
    ``BambaForCausalLM``, ``NemotronHForCausalLM`` (dense and MoE) and this project's
    ``picaso_hybrid`` all load as one :class:`~picaso_rag.model.PicasoLM`.

    ``tokenizer``: a tokenizer.json path or :class:`Tokenizer`; default: tokenizer.json in the directory.
    ``dtype``: default fp32 on CPU, bf16 on CUDA.

    Usage: ``model, tok = load_checkpoint("./picaso-mini", device="cuda")``.
    """
    directory = resolve_checkpoint_dir(name_or_path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no config.json. Pass the directory that holds config.json and the weights.")
    try:
        raw_config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON ({exc}); restore the checkpoint's config.json.") from exc
    try:
        adapters.family_of(raw_config)
        cfg = ModelConfig.from_dict(raw_config)
    except CheckpointError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field missing or of the wrong type
        raise CheckpointError(f"{directory / 'config.json'} has a missing or invalid field ({type(exc).__name__}: {exc}); "
                              "restore the checkpoint's config.json.") from None

    tok = _load_tokenizer(directory, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}; pass the tokenizer this model was trained with.")
    weights = adapters.internal_names(_read_weights(directory), cfg)
    model = PicasoLM(cfg)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {directory} do not match its config.json ({cfg.family}): missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}. Is this checkpoint complete, with its own config.json?"
        )
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"weights in {directory} do not fit its config.json ({str(exc)[:300]}); "
                              "restore the checkpoint's own config.json and weights.") from None
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    for name, module in model.named_modules():
        if isinstance(module, SigmoidRouter):  # routers stay fp32, as transformers keeps them: in bf16 the
            module.float()                     # correction bias would lose the small gaps that pick the experts
            for key, tensor in module.state_dict().items():
                tensor.copy_(weights[f"{name}.{key}"])
    return model, tok


def save_checkpoint(model: PicasoLM, tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """Write a checkpoint that :func:`load_checkpoint` reads: config.json (the mamba_ssm layout for a
    Mamba-2 model, ``picaso_hybrid`` for a hybrid), model.safetensors and tokenizer.json.

    Each file is written to a temporary name, fsynced and renamed over the old one, so a save killed
    at any point leaves every file whole: the old checkpoint, or the new one file by file (the weights
    go last: a reader never meets new weights under an old config of another shape).
    Usage: ``save_checkpoint(model, tok, "models/my-model")``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in adapters.checkpoint_names(model.state_dict(), model.cfg).items()}
    if model.cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    config = adapters.config_json(model.cfg)

    def atomic(name: str, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb+") as f:  # on disk before the rename: a crash never leaves a renamed, empty file
                os.fsync(f.fileno())
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    atomic("tokenizer.json", tokenizer.save)
    atomic("config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    atomic("model.safetensors", lambda p: save_file(weights, p, metadata={"format": "pt"}))
    try:  # the renames themselves on disk
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # (directories cannot be opened on some platforms)
        pass
    return directory


def load_hybrid_checkpoint(directory: Path, raw_config: dict, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None) -> tuple[PicasoLM, Tokenizer]:
    """Deprecated alias of :func:`load_checkpoint` (kept for one release)."""
    return load_checkpoint(directory, device=device, dtype=dtype, tokenizer=tokenizer)


def save_hybrid_checkpoint(model: PicasoLM, tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """Deprecated alias of :func:`save_checkpoint`, which saves every model (kept for one release)."""
    return save_checkpoint(model, tokenizer, directory)
