"""olmo2_fast.quantization's int4 method: widths it takes (the lm_head's too), the config entry that
names a quantised lm_head, output-feature splits of the packed layout, what an int4 lm_head costs
the shipped demo model (plain PyTorch, the twin's numerics), and quantize_lm_head end to end (load,
save, reload on both backends; refusals)."""
import dataclasses
import importlib.resources
import types

import pytest
import torch

from checkpoints import make_checkpoint
from harness import DEVICE
from olmo2_fast import OLMo2
from olmo2_fast.config import PRESETS
from olmo2_fast.errors import CheckpointError, ConfigError
from olmo2_fast.kernels.int4_format import Int4Weight, dequantize_int4, int4_matmul_reference, quantize_int4
from olmo2_fast.quantization import INT4, checkpoint_method, checkpoint_quantizes_lm_head

INT4_SHAPE = dict(hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=1)


def test_widths_of_a_quantised_lm_head():
    """Every published size takes an int4 lm_head; a vocabulary that is no multiple of 8 is refused by name."""
    for config in PRESETS.values():
        INT4.check_widths(config, lm_head=True)
    odd = dataclasses.replace(PRESETS["1b"], vocab_size=100279)
    INT4.check_widths(odd)  # the projections alone are fine
    with pytest.raises(CheckpointError, match="vocab_size divisible by 8; this model has vocab_size=100279"):
        INT4.check_widths(odd, lm_head=True)


def test_the_config_entry_names_a_quantised_lm_head():
    config = PRESETS["1b"]
    assert "lm_head" not in INT4.config_entry() and INT4.config_entry()["layout"] == INT4.layout
    assert not checkpoint_quantizes_lm_head(config.with_(quantization_config=tuple(INT4.config_entry().items())))
    entry = INT4.config_entry(lm_head=True)
    assert entry["lm_head"] is True
    assert checkpoint_quantizes_lm_head(config.with_(quantization_config=tuple(entry.items())))
    assert INT4.tensor_shapes(100352, 2048) == {"qweight": (12544, 64, 8, 4), "scales": (16, 100352),
                                                "zeros": (16, 100352)}


def test_checkpoints_name_the_layout_they_hold():
    """The current layout reads as the method; the previous one ("int32-k8-n", or no layout entry: checkpoints
    saved before config.json named it) through a reader that expects its [K / 8, N] codes and repacks them
    (tests/test_int4_torch.py loads one); any other layout is refused."""
    def saved(**entry):
        return PRESETS["1b"].with_(quantization_config=tuple(dict(INT4.config_entry(), **entry).items()))
    assert checkpoint_method(saved()) is INT4
    for legacy in (saved(layout="int32-k8-n"),
                   PRESETS["1b"].with_(quantization_config=(("quant_method", "olmo2_fast_int4"), ("group_size", 128)))):
        reader = checkpoint_method(legacy)
        assert reader.tensor_shapes(6144, 2048)["qweight"] == (256, 6144)
        assert reader.config_entry() == INT4.config_entry()  # saving writes the current layout
    with pytest.raises(ConfigError, match="packed as 'int8-rows'"):
        checkpoint_method(saved(layout="int8-rows"))


def test_columns_and_stack_cut_whole_row_blocks():
    """q / k / v of a fused qkv: columns at multiples of 8 are exact pieces, and stacking them gives the whole."""
    qw = quantize_int4(torch.randn(48, 256))
    parts = [INT4.columns(qw, 0, 16), INT4.columns(qw, 16, 40), INT4.columns(qw, 40, 48)]
    dense = dequantize_int4(qw)
    for part, (start, end) in zip(parts, [(0, 16), (16, 40), (40, 48)]):
        assert part.shape == (end - start, 256) and torch.equal(dequantize_int4(part), dense[start:end])
    whole = INT4.stack(parts)
    assert all(torch.equal(getattr(whole, t), getattr(qw, t)) for t in ("packed", "scales", "zeros"))
    with pytest.raises(ValueError, match="multiples of 8, got 4..16"):
        INT4.columns(qw, 4, 16)


def test_an_int4_lm_head_on_the_trained_demo_model():
    """The shipped demo target (bf16), its lm_head alone quantised (the method, then the twin's matmul): on
    the first 1,024 held-out tokens (two windows of its 512-token context), top-1 agreement >= 0.9 and
    perplexity within 2% (measured over the whole held-out text: 0.945 and +0.28%, README)."""
    root = importlib.resources.files("olmo2_fast") / "demo_models"
    model = OLMo2.from_pretrained(str(root / "target"), device="cpu", backend="torch", dtype="bfloat16")
    ids = torch.tensor(model.tokenizer.encode((root / "heldout.txt").read_text())[:1024]).view(2, 512)
    engine = model.engine
    with torch.no_grad():
        dense = model(ids)[:, :-1].flatten(0, 1).double()
        qw = INT4.quantize(engine.lm_head_weight().detach())
        engine.logits = types.MethodType(lambda self, h: int4_matmul_reference(self.model.norm(h), qw), engine)
        quantised = model(ids)[:, :-1].flatten(0, 1).double()
    targets = ids[:, 1:].flatten()

    def perplexity(logits):
        return torch.exp(torch.nn.functional.cross_entropy(logits, targets)).item()
    agreement = (dense.argmax(-1) == quantised.argmax(-1)).double().mean().item()
    print(f"int4 lm_head on the demo target: top-1 agreement {agreement:.4f}, perplexity "
          f"{perplexity(dense):.3f} -> {perplexity(quantised):.3f}")
    assert agreement >= 0.9
    assert perplexity(quantised) <= 1.02 * perplexity(dense)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_quantised_lm_head_loads_saves_and_reloads_on_both_backends(tmp_path, tied):
    """quantize_lm_head=True: lm_head is the int4 matmul of the dense one's quantisation (a tied model keeps its
    embedding dense for the lookup); the checkpoint it saves holds lm_head.qweight / .scales / .zeros, no dense
    lm_head, and says so in config.json; both backends reload it to the same tensors without quantising again."""
    source = make_checkpoint(tmp_path / "src", seed=12, tie_word_embeddings=tied, **INT4_SHAPE)
    model = OLMo2.from_pretrained(source, device="cpu", backend="torch", quantize="int4", quantize_lm_head=True)
    dense_head = OLMo2.from_pretrained(source, device="cpu", backend="torch", quantize="int4")
    ids = torch.randint(0, 400, (2, 7))
    with torch.no_grad():
        qw = INT4.quantize(dense_head.engine.lm_head_weight().detach())
        got = model(ids)
        dense_head.engine.logits = types.MethodType(lambda self, h: int4_matmul_reference(self.model.norm(h), qw),
                                                    dense_head.engine)
        torch.testing.assert_close(got, dense_head(ids), rtol=0, atol=0)
    assert torch.equal(model.engine.model.embed_tokens.weight, dense_head.engine.model.embed_tokens.weight)

    saved = model.save_pretrained(tmp_path / "int4")
    from safetensors.torch import load_file
    written = load_file(saved / "model.safetensors")
    assert {"lm_head.qweight", "lm_head.scales", "lm_head.zeros"} <= set(written) and "lm_head.weight" not in written
    reloaded = OLMo2.from_pretrained(saved, device="cpu", backend="torch")
    assert checkpoint_quantizes_lm_head(reloaded.config)
    torch.testing.assert_close(reloaded(ids), got, rtol=0, atol=0)
    kernels = OLMo2.from_pretrained(saved, device=DEVICE, backend="triton")
    assert isinstance(kernels.engine.lm_head, Int4Weight)
    _, from_kernels = kernels.engine.checkpoint_tensors()
    assert set(from_kernels) == set(written) and all(torch.equal(from_kernels[k].cpu(), written[k]) for k in written)
    torch.testing.assert_close(kernels(ids.to(DEVICE)).cpu(), got, rtol=1e-4, atol=1e-4)


def test_quantize_lm_head_is_refused_where_it_cannot_apply(tmp_path):
    path = make_checkpoint(tmp_path / "src", seed=13, **INT4_SHAPE)
    with pytest.raises(CheckpointError, match="quantize_lm_head=True quantises lm_head with the projections' method: "
                                              "give quantize= too"):
        OLMo2.from_pretrained(path, device="cpu", backend="torch", quantize_lm_head=True)
    with pytest.raises(ConfigError, match="quantize_lm_head must be True or False, got 'yes'"):
        OLMo2.from_pretrained(path, device="cpu", backend="torch", quantize="int4", quantize_lm_head="yes")
    saved = OLMo2.from_pretrained(path, device="cpu", backend="torch", quantize="int4").save_pretrained(tmp_path / "q")
    for device, backend in (("cpu", "torch"), (DEVICE, "triton")):
        with pytest.raises(CheckpointError, match=r"already quantised \(olmo2_fast_int4\): load it without quantize= "
                                                  "and quantize_lm_head="):
            OLMo2.from_pretrained(saved, device=device, backend=backend, quantize_lm_head=True)
    odd = make_checkpoint(tmp_path / "odd", seed=14, vocab_size=452, **INT4_SHAPE)
    with pytest.raises(CheckpointError, match="vocab_size divisible by 8; this model has vocab_size=452"):
        OLMo2.from_pretrained(odd, device="cpu", backend="torch", quantize="int4", quantize_lm_head=True)
    OLMo2.from_pretrained(odd, device="cpu", backend="torch", quantize="int4")  # its projections alone are fine
