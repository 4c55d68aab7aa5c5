"""Loading real Hugging Face layouts, and every loader error a user can hit."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.checkpoint import INDEX_FILE, WEIGHTS_FILE, iter_checkpoint, resolve_checkpoint
from olmo2_fast.config import Olmo2Config
from olmo2_fast.errors import CheckpointError, ConfigError, TokenizerError


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "ckpt", seed=5)


def logits_of(path, **kwargs):
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (1, 13))
    return OLMo2.from_pretrained(path, device="cpu", **kwargs)(ids)


def test_sharded_float32_and_bf16_checkpoints_load_to_the_same_model(tmp_path, ckpt):
    sharded = make_checkpoint(tmp_path / "sharded", seed=5, num_shards=3)
    assert (sharded / INDEX_FILE).is_file() and not (sharded / WEIGHTS_FILE).exists()
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    torch.testing.assert_close(logits_of(sharded), logits_of(ckpt), rtol=0, atol=0)
    bf16_ckpt = make_checkpoint(tmp_path / "bf16", seed=5, dtype=torch.bfloat16)
    model = OLMo2.from_pretrained(bf16_ckpt, device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.engine.parameters())
    torch.testing.assert_close(logits_of(bf16_ckpt, dtype="bfloat16").float(), logits_of(ckpt), rtol=0.05, atol=0.1)


def test_float32_checkpoint_converts_tensor_by_tensor(ckpt):
    cfg = Olmo2Config.from_json_file(ckpt / "config.json")
    stream = iter_checkpoint(ckpt, cfg, torch.bfloat16, "cpu", progress=False)
    name, first = next(stream)  # a generator: one converted tensor at a time, not a float32 state dict
    assert first.dtype == torch.bfloat16
    stream.close()


def test_progress_bar_when_asked(ckpt, capsys):
    cfg = Olmo2Config.from_json_file(ckpt / "config.json")
    n = sum(1 for _ in iter_checkpoint(ckpt, cfg, torch.float32, "cpu", progress=True))
    assert f"{n}/{n}" in capsys.readouterr().err


def rewrite_weights(path, edit):
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}), r"unexpected 1 tensor\(s\): model.layers.9.extra"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), r"model.norm.weight .* shape \(3,\), expected \(48,\)"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(48, dtype=torch.int8)}), "dtype torch.int8"),
])
def test_wrong_tensors_are_named(ckpt, edit, message):
    rewrite_weights(ckpt, edit)
    with pytest.raises(CheckpointError, match=message):
        OLMo2.from_pretrained(ckpt, device="cpu")


def test_tied_checkpoints_omit_lm_head(tmp_path):
    path = make_checkpoint(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / WEIGHTS_FILE)
    model = OLMo2.from_pretrained(path, device="cpu")
    assert model.engine.lm_head_weight() is model.engine.model.embed_tokens.weight


def test_missing_paths_and_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        OLMo2.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="is a file"):
        OLMo2.from_pretrained(ckpt / "config.json")
    (ckpt / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        OLMo2.from_pretrained(ckpt, device="cpu")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        OLMo2.from_pretrained(ckpt, device="cpu")
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config file not found"):
        OLMo2.from_pretrained(ckpt, device="cpu")


def test_broken_config_index_and_weights(tmp_path):
    path = make_checkpoint(tmp_path / "a")
    (path / "config.json").write_text("{ broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OLMo2.from_pretrained(path)
    path = make_checkpoint(tmp_path / "b", num_shards=2)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard"):
        OLMo2.from_pretrained(path, device="cpu")
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        OLMo2.from_pretrained(path, device="cpu")
    path = make_checkpoint(tmp_path / "c")
    (path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        OLMo2.from_pretrained(path, device="cpu")


def test_unsupported_dtype_device_backend_and_quantize(ckpt):
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        OLMo2.from_pretrained(ckpt, device="cpu", dtype="int8")
    with pytest.raises(CheckpointError, match="unknown backend"):
        OLMo2.from_pretrained(ckpt, device="cpu", backend="jax")
    with pytest.raises(CheckpointError, match="unknown device"):
        OLMo2.from_pretrained(ckpt, device="tpu:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda(ckpt):
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        OLMo2.from_pretrained(ckpt, device="cuda")


def test_hub_ids_without_huggingface_hub_say_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed"):
        resolve_checkpoint("allenai/OLMo-2-0425-1B")


def test_hub_ids_offline_say_so(monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (the hub extra)")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not fetch 'allenai/OLMo-2-0425-1B' .*revision stage1-step1000"):
        resolve_checkpoint("allenai/OLMo-2-0425-1B", revision="stage1-step1000")


def test_a_torch_backend_model_leaves_triton_unimported(ckpt):
    # Triton's interpreter must be switched on before triton is first imported: if loading or
    # running a torch-backend model imported it, a later backend="triton" on a CPU would fail.
    code = f"""
import sys
from olmo2_fast import OLMo2
model = OLMo2.from_pretrained({str(ckpt)!r}, device="cpu")
model.generate("hi", max_new_tokens=2)
model.generate(["hi", "a longer prompt"], max_new_tokens=2, temperature=0.8, top_p=0.9, seed=1, repetition_penalty=1.1)
assert "triton" not in sys.modules, "triton was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_saving_over_a_sharded_checkpoint_leaves_no_stale_shards(tmp_path, ckpt):
    target = make_checkpoint(tmp_path / "target", seed=6, num_shards=3)
    (target / "README.md").write_text("kept")
    model = OLMo2.from_pretrained(ckpt, device="cpu")
    model.save_pretrained(target)  # one file now
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["README.md", "config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
    torch.testing.assert_close(logits_of(target), logits_of(ckpt), rtol=0, atol=0)  # the new weights, not the old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_saving_onto_the_models_own_source_directory(tmp_path):
    source = make_checkpoint(tmp_path / "src", seed=7, num_shards=2)
    expected = logits_of(source)
    model = OLMo2.from_pretrained(source, device="cpu")
    model.save_pretrained(source)  # its weights may be memory-mapped from these very files
    assert not list(source.glob("model-*")) and (source / WEIGHTS_FILE).is_file()
    torch.testing.assert_close(logits_of(source), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(torch.randint(0, 400, (1, 5), generator=torch.Generator().manual_seed(1))),
                               OLMo2.from_pretrained(source, device="cpu")(
                                   torch.randint(0, 400, (1, 5), generator=torch.Generator().manual_seed(1))))


@pytest.mark.parametrize("num_shards, message", [(0, "num_shards must be an integer >= 1, got 0"),
                                                 (-1, "num_shards must be an integer >= 1, got -1"),
                                                 (2.0, "num_shards must be an integer"),
                                                 (10_000, "more than the")])
def test_bad_shard_counts_are_refused_before_anything_is_written(tmp_path, ckpt, num_shards, message):
    model = OLMo2.from_pretrained(ckpt, device="cpu")
    with pytest.raises(CheckpointError, match=message):
        model.save_pretrained(tmp_path / "out", num_shards=num_shards)
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_the_existing_checkpoint_intact(tmp_path, ckpt, monkeypatch):
    target = make_checkpoint(tmp_path / "target", seed=6, num_shards=2)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import olmo2_fast.checkpoint as checkpoint

    def disk_full(tensors, path, metadata=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; an existing checkpoint there is unchanged"):
        OLMo2.from_pretrained(ckpt, device="cpu").save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_saving_to_a_file_path_is_refused(tmp_path, ckpt):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="it is a file"):
        OLMo2.from_pretrained(ckpt, device="cpu").save_pretrained(tmp_path / "file")


@pytest.mark.parametrize("value, message", [(float("nan"), "holds 1 non-finite values"),
                                            (float("inf"), "holds 1 non-finite values")])
def test_non_finite_weights_are_refused_by_name(ckpt, value, message):
    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 4] = value
    rewrite_weights(ckpt, poison)
    with pytest.raises(CheckpointError, match=f"model.layers.1.mlp.down_proj.weight in model.safetensors {message}"):
        OLMo2.from_pretrained(ckpt, device="cpu")


def test_weights_that_overflow_float16_are_refused_with_advice(ckpt):
    rewrite_weights(ckpt, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    with pytest.raises(CheckpointError, match="model.norm.weight .* overflows torch.float16 .*load it in bfloat16"):
        OLMo2.from_pretrained(ckpt, device="cpu", dtype="float16")
    assert OLMo2.from_pretrained(ckpt, device="cpu", dtype="bfloat16")  # bf16 holds 1e6
