"""Hugging Face OLMo 2 checkpoints: the name map, strict checks, loading and writing.

A checkpoint directory holds `config.json`, the weights as `model.safetensors` or as
shards listed in `model.safetensors.index.json`, and `tokenizer.json`. Tensors are read
one at a time and converted to the target dtype and device as they arrive, so a float32
checkpoint loads into bf16 without ever holding a float32 copy of the model.
"""
from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Olmo2Config
from .errors import CheckpointError
from .progress import Progress

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in LOADABLE_DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise CheckpointError(f"unsupported dtype {dtype!r}: choose float32, bfloat16 or float16")


def fused_projections(config: Olmo2Config) -> dict[str, tuple[tuple[str, int], ...]]:
    """The projections of a layer as the kernel engine and quantised checkpoints hold them: fused name ->
    its Hugging Face parts (name, output width) stacked along the output features, in order."""
    q, kv, i, h = config.q_width, config.kv_width, config.intermediate_size, config.hidden_size
    return {
        "self_attn.qkv_proj": (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)),
        "self_attn.o_proj": (("self_attn.o_proj", h),),
        "mlp.gate_up_proj": (("mlp.gate_proj", i), ("mlp.up_proj", i)),
        "mlp.down_proj": (("mlp.down_proj", h),),
    }


def projection_in_features(config: Olmo2Config) -> dict[str, int]:
    """in_features of each fused projection (its K)."""
    return {"self_attn.qkv_proj": config.hidden_size, "self_attn.o_proj": config.q_width,
            "mlp.gate_up_proj": config.hidden_size, "mlp.down_proj": config.intermediate_size}


def expected_shapes(config: Olmo2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an OLMo 2 checkpoint must hold, by its Hugging Face name.

    A checkpoint saved quantised (config.quantization set) holds the fused projections
    instead, in the tensors its quantisation method names (olmo2_fast.quantization), and
    lm_head's too when its quantization_config says "lm_head": true.
    """
    h = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    method = None
    if config.quantization:
        from .quantization import checkpoint_method, checkpoint_quantizes_lm_head  # torch-only imports

        method = checkpoint_method(config)
        if checkpoint_quantizes_lm_head(config):  # lm_head.qweight / .scales / .zeros (a tied one: an int4 copy)
            shapes.pop("lm_head.weight", None)
            shapes.update({f"lm_head.{suffix}": shape
                           for suffix, shape in method.tensor_shapes(config.vocab_size, h).items()})
    in_features = projection_in_features(config)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_norm.weight": (config.q_width,),
            p + "self_attn.k_norm.weight": (config.kv_width,),
            p + "post_attention_layernorm.weight": (h,),
            p + "post_feedforward_layernorm.weight": (h,),
        })
        for fused, parts in fused_projections(config).items():
            k = in_features[fused]
            if method is not None:
                n = sum(width for _, width in parts)
                shapes.update({f"{p}{fused}.{suffix}": shape for suffix, shape in method.tensor_shapes(n, k).items()})
            else:
                shapes.update({f"{p}{part}.weight": (width, k) for part, width in parts})
    return shapes


def resolve_checkpoint(path: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, fetched with huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; pass the checkpoint directory that holds config.json")
    text = str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint directory not found: {local}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{text!r} is not a local directory, and huggingface_hub is not installed to fetch "
                              "it from the hub (pip install huggingface_hub), or pass a local directory") from None
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # the hub raises many types (offline, 404, gated, auth): report them all plainly
        raise CheckpointError(f"could not fetch {text!r} (revision {revision or 'main'}) from the Hugging Face hub: "
                              f"{type(e).__name__}: {e}. If you are offline, pass a local checkpoint "
                              "directory") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, per the index or the single file."""
    index = directory / INDEX_FILE
    single = directory / WEIGHTS_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not in {directory}: {', '.join(missing)}")
        return files
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{single} is not a readable safetensors file: {e}") from None
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: only safetensors is supported)" if others else ""
    raise CheckpointError(f"no weights in {directory}: expected {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def iter_checkpoint(directory: Path, config: Olmo2Config, dtype: torch.dtype, device,
                    progress: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) converted to `dtype` on `device`, one tensor at a time, after strict checks.

    Name checks happen before any tensor is read, so a wrong checkpoint fails fast.
    """
    expected = expected_shapes(config)
    method = None
    if config.quantization:
        from .quantization import checkpoint_method

        method = checkpoint_method(config)
    files = weight_files(directory)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: extra copy allowed, ignored
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
        raise CheckpointError(f"checkpoint {directory} does not match its config.json ({config.num_hidden_layers} "
                              f"layers, tie_word_embeddings={config.tie_word_embeddings}): " + "; ".join(parts))
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    bar = Progress(len(expected), "loading weights", enabled=progress)
    try:
        for path, names in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise CheckpointError(f"tensor {name} in {path.name} has shape {tuple(tensor.shape)}, "
                                              f"expected {expected[name]} from config.json")
                    if method is not None and method.is_code_tensor(name):  # quantised codes keep their dtype
                        if tensor.dtype != torch.int32:
                            raise CheckpointError(f"tensor {name} in {path.name} has dtype {tensor.dtype}, expected "
                                                  f"int32 packed {method.name} codes")
                        yield name, tensor.to(device=device)
                    elif tensor.dtype not in LOADABLE_DTYPES:
                        raise CheckpointError(f"tensor {name} in {path.name} has dtype {tensor.dtype}; supported: "
                                              "float32, bfloat16, float16")
                    else:
                        converted = tensor.to(device=device, dtype=dtype)
                        _check_finite(name, path, tensor, converted)
                        yield name, converted
                    bar.advance()
    except SafetensorError as e:
        raise CheckpointError(f"could not read {path}: {e}") from None
    finally:
        bar.close()


def _check_finite(name: str, path: Path, stored: torch.Tensor, converted: torch.Tensor):
    """Refuse a weight holding inf or NaN, which would make every generation silently empty or garbage.

    Checked on the converted tensor (one device reduction per tensor, at load only), so values that
    overflow the target dtype (float32 weights loaded as float16) are caught too."""
    if bool(torch.isfinite(converted).all()):
        return
    bad = int((~torch.isfinite(converted)).sum())
    if bool(torch.isfinite(stored).all()):
        raise CheckpointError(f"tensor {name} in {path.name} overflows {converted.dtype} ({bad} values become inf): "
                              "load it in bfloat16 or float32")
    raise CheckpointError(f"tensor {name} in {path.name} holds {bad} non-finite values (inf or NaN): the checkpoint "
                          "is damaged")


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _is_checkpoint_file(name: str) -> bool:
    """Files a save writes or replaces; anything else already in a target directory is kept."""
    return (name in (CONFIG_FILE, "generation_config.json", "special_tokens_map.json", "chat_template.jinja")
            or name.startswith("tokenizer") or name.endswith((".safetensors", ".safetensors.index.json")))


def save_checkpoint(directory: str | Path, config: Olmo2Config, tensors: dict[str, torch.Tensor],
                    num_shards: int = 1, extra_files: dict[str, Path] | None = None) -> Path:
    """Write config.json, the tensors in the Hugging Face layout (one file, or shards plus an index) and
    `extra_files` (name -> source file, e.g. the tokenizer files) as the checkpoint `directory`.

    Everything is written into a temporary directory beside the target first. A new target is that
    directory, renamed; into an existing one each file is renamed over its old version and the
    checkpoint files of an earlier save that this one does not write (stale shards, an old index)
    are removed. So a failed save (full disk, bad tensor) leaves an existing checkpoint untouched,
    no stale weights remain, other files in the directory (a README) are kept, and saving over the
    checkpoint a model was loaded from is safe (its memory-mapped files keep their old contents).
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise CheckpointError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if num_shards > len(tensors):
        raise CheckpointError(f"num_shards={num_shards} is more than the {len(tensors)} tensors to save")
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {directory}: it is a file")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # mkdir, not tempfile.mkdtemp: the directory becomes the checkpoint, so it gets the usual (umask) mode.
        staging = directory.parent / f".{directory.name}.saving-{secrets.token_hex(6)}"
        staging.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot save a checkpoint to {directory}: {e.strerror or e}") from None
    try:
        _write_checkpoint(staging, config, tensors, num_shards)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        if not directory.exists():
            staging.rename(directory)
            return directory
        written = {f.name for f in staging.iterdir()}
        stale = [f for f in directory.iterdir() if f.is_file() and _is_checkpoint_file(f.name) and f.name not in written]
        for name in sorted(written, key=lambda n: n == CONFIG_FILE):  # config.json last
            (staging / name).replace(directory / name)
        for f in stale:
            f.unlink()
    except OSError as e:
        raise CheckpointError(f"could not save the checkpoint to {directory}: {e.strerror or e}; "
                              "an existing checkpoint there is unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_checkpoint(directory: Path, config: Olmo2Config, tensors: dict[str, torch.Tensor], num_shards: int):
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": "pt"}
    if num_shards == 1:
        save_file(tensors, directory / WEIGHTS_FILE, metadata=metadata)
        return
    names = list(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        shard_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[shard * per_shard:(shard + 1) * per_shard]}
        save_file(chunk, directory / shard_name, metadata=metadata)
        weight_map.update({n: shard_name for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
