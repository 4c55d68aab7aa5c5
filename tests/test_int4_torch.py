"""int4 on the torch backend: the plain-PyTorch path (dequantise and matmul) any CPU runs without
Triton's interpreter, its equality with the reference on dequantised weights, and its checkpoints."""
import torch

from checkpoints import make_checkpoint
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
    _, from_kernels = OLMo2.from_pretrained(source, device="cpu", backend="triton",
                                            quantize="int4").engine.checkpoint_tensors()
    written = {}
    for shard in saved.glob("model-*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(from_kernels)
    assert all(torch.equal(written[k], from_kernels[k]) for k in written)
