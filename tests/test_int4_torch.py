"""int4 on the torch backend: the plain-PyTorch path (dequantise and matmul) any CPU runs without
Triton's interpreter, its equality with the reference on dequantised weights, and its checkpoints
(those of the previous packed layout too)."""
import json

import pytest
import torch

from checkpoints import make_checkpoint
from harness import DEVICE
from olmo2_fast import OLMo2
from olmo2_fast.kernels.int4_format import dequantize_int4, quantize_int4

INT4_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


def test_torch_backend_int4_equals_the_reference_on_dequantised_weights(tmp_path):
    path = make_checkpoint(tmp_path, seed=8, **INT4_SHAPE)
    int4 = OLMo2.from_pretrained(path, device="cpu", backend="torch", quantize="int4")
    ref = OLMo2.from_pretrained(path, device="cpu", backend="torch")
    with torch.no_grad():
        for layer in ref.engine.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(dequantize_int4(quantize_int4(lin.weight)))
    ids = torch.randint(0, 400, (2, 11))
    torch.testing.assert_close(int4(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert int4.generate("The capital", max_new_tokens=6) == ref.generate("The capital", max_new_tokens=6)


def test_int4_checkpoints_move_between_backends(tmp_path):
    source = make_checkpoint(tmp_path / "src", seed=9, **INT4_SHAPE)
    from_torch = OLMo2.from_pretrained(source, device="cpu", backend="torch", quantize="int4")
    saved = from_torch.save_pretrained(tmp_path / "int4", num_shards=2)
    reloaded = OLMo2.from_pretrained(saved, device="cpu", backend="torch")
    ids = torch.randint(0, 400, (1, 9))
    torch.testing.assert_close(reloaded(ids), from_torch(ids), rtol=0, atol=0)
    assert reloaded.config.quantization == "olmo2_fast_int4"
    # The packed layout is one format: the torch backend writes what the kernels read, tensor for tensor.
    from safetensors.torch import load_file
    _, from_kernels = OLMo2.from_pretrained(source, device=DEVICE, backend="triton",
                                            quantize="int4").engine.checkpoint_tensors()
    written = {}
    for shard in saved.glob("model-*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(from_kernels)
    assert all(torch.equal(written[k], from_kernels[k].cpu()) for k in written)


def _legacy_qweight(packed: torch.Tensor) -> torch.Tensor:
    """The layout before "int32-n8k32-rotl3": [K / 8, N] int32, codes k = 8r..8r+7 of output n in word
    (r, n), code k - 8r in bits 4(k - 8r)..4(k - 8r)+3."""
    from olmo2_fast.kernels.int4_format import unpack_int4
    codes = unpack_int4(packed).to(torch.int64)  # [N, K]
    n, k = codes.shape
    words = (codes.T.reshape(k // 8, 8, n) << (4 * torch.arange(8).view(1, 8, 1))).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


@pytest.mark.parametrize("layout", ["int32-k8-n", None], ids=["int32-k8-n", "no-layout-entry"])
def test_checkpoints_in_the_previous_layout_load_repacked(tmp_path, layout):
    """int4 checkpoints saved before the rotated row-block packing (layout "int32-k8-n", or with no layout in
    config.json) load on both backends, repacked at load to the same codes: logits bit for bit; saving them
    again writes the current layout."""
    from safetensors.torch import load_file, save_file
    from olmo2_fast.quantization import INT4
    source = make_checkpoint(tmp_path / "src", seed=10, **INT4_SHAPE)
    model = OLMo2.from_pretrained(source, device="cpu", backend="torch", quantize="int4")
    saved = model.save_pretrained(tmp_path / "int4")
    for shard in saved.glob("model*.safetensors"):
        tensors = load_file(shard)
        save_file({name: _legacy_qweight(t) if name.endswith(".qweight") else t for name, t in tensors.items()}, shard,
                  metadata={"format": "pt"})
    config = json.loads((saved / "config.json").read_text())
    if layout is None:
        del config["quantization_config"]["layout"]
    else:
        config["quantization_config"]["layout"] = layout
    (saved / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 400, (1, 9))
    old = OLMo2.from_pretrained(saved, device="cpu", backend="torch")
    torch.testing.assert_close(old(ids), model(ids), rtol=0, atol=0)
    again = old.save_pretrained(tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["quantization_config"]["layout"] == INT4.layout
    on_kernels = OLMo2.from_pretrained(saved, device=DEVICE, backend="triton")
    torch.testing.assert_close(on_kernels(ids.to(DEVICE)).cpu(), model(ids), rtol=1e-4, atol=1e-4)
