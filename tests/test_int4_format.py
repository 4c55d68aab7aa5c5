"""int4 format: pack/unpack, quantise/dequantise (plain PyTorch), checkpoint tensors, accuracy."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import ALL_DTYPES
from olmo2_fast.kernels.int4_format import (
    Int4Weight, dequantize_int4, int4_quantization_error, int4_tensors, pack_int4, quantize_int4, unpack_int4,
)


@pytest.mark.parametrize("n, k", [(1, 8), (5, 64), (96, 384), (200, 1024)])
def test_pack_unpack_roundtrip(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (k // 8, n) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), q)
    words = torch.randint(-2**31, 2**31, (k // 8, n), dtype=torch.int32)
    assert torch.equal(pack_int4(unpack_int4(words)), words)


def test_packed_bit_layout():
    """Word (r, n) holds codes k = 8r..8r+7 of output n, code k-8r in bits 4(k-8r)..4(k-8r)+3."""
    q = torch.zeros(2, 16, dtype=torch.uint8)
    q[0, :8] = torch.arange(1, 9)  # 0x87654321: bit 31 set, stored as a negative int32
    q[1, 8:] = torch.tensor([15, 0, 0, 0, 0, 0, 0, 0])
    packed = pack_int4(q)
    assert packed[0, 0].item() == 0x87654321 - 2**32
    assert packed[1, 1].item() == 0xF and packed[1, 0].item() == 0 and packed[0, 1].item() == 0


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="K % 8"):
        pack_int4(torch.zeros(4, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(torch.zeros(4, 12, dtype=torch.int64))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dequant_error_within_half_a_step(dtype):
    """|w - dequant(quant(w))| <= s/2 per element, up to the rounding of the stored s, z and result."""
    n, k, group = 48, 512, 128
    w = (torch.randn(n, k) * torch.logspace(-3, 1, n).unsqueeze(1) + torch.randn(n, 1) * 0.1).to(dtype)
    qw = quantize_int4(w)
    assert qw.scales.shape == (k // group, n) and qw.zeros.shape == (k // group, n) and qw.dtype == dtype
    wq = dequantize_int4(qw)
    assert wq.shape == w.shape and wq.dtype == dtype
    s = qw.scales.float().T.repeat_interleave(group, dim=1)
    z = qw.zeros.float().T.repeat_interleave(group, dim=1)
    eps = torch.finfo(dtype).eps
    bound = s / 2 + eps * (w.float().abs() + z.abs() + 8 * s)
    err = (wq.float() - w.float()).abs()
    assert (err <= bound).all(), f"worst error / step = {(err / s).max().item():.3f}"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_representable_weights_are_exact(dtype):
    """Weights already on a 4-bit grid (each group spanning codes 0..15) come back bit-exact."""
    n, k, group = 16, 256, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    q[:, ::group], q[:, 1::group] = 0, 15
    scales = 2.0 ** -torch.randint(2, 9, (k // group, n)).float()
    zeros = torch.randint(-20, 20, (k // group, n)).float() * scales
    qw = Int4Weight(pack_int4(q), scales.to(dtype), zeros.to(dtype), (n, k))
    w = dequantize_int4(qw)
    again = quantize_int4(w)
    assert torch.equal(again.packed, qw.packed)
    assert torch.equal(again.scales, qw.scales) and torch.equal(again.zeros, qw.zeros)
    assert torch.equal(dequantize_int4(again), w)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_constant_groups_have_zero_scale_and_no_nan(dtype):
    w = torch.randn(4, 384).to(dtype)
    w[0, :128] = 0.0
    w[1, 128:256] = -3.25
    w[2] = 7.0
    qw = quantize_int4(w)
    wq = dequantize_int4(qw)
    assert torch.isfinite(wq).all()
    assert qw.scales[0, 0] == 0 and qw.scales[1, 1] == 0 and (qw.scales[:, 2] == 0).all()
    assert torch.equal(wq[0, :128], w[0, :128]) and torch.equal(wq[1, 128:256], w[1, 128:256]) and torch.equal(wq[2], w[2])


def test_scale_dtype_can_differ_from_the_weight():
    w = torch.randn(8, 256)
    qw = quantize_int4(w, dtype=torch.bfloat16)
    assert qw.dtype == torch.bfloat16 and dequantize_int4(qw).dtype == torch.bfloat16


def test_quantize_bad_inputs():
    with pytest.raises(ValueError, match="not a multiple of the int4 group size 128"):
        quantize_int4(torch.randn(4, 200))
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_int4(torch.randn(4, 256), group_size=12)
    with pytest.raises(TypeError, match="2-D"):
        quantize_int4(torch.randn(256))
    with pytest.raises(TypeError, match="2-D"):
        quantize_int4(torch.ones(4, 256, dtype=torch.int32))
    with pytest.raises(TypeError, match="scale dtype"):
        quantize_int4(torch.randn(4, 256), dtype=torch.float64)
    w = torch.randn(4, 256)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int4(w)


def test_checkpoint_tensors_roundtrip_through_safetensors(tmp_path):
    qw = quantize_int4(torch.randn(96, 384, dtype=torch.bfloat16))
    prefix = "model.layers.0.mlp.down_proj."
    tensors = int4_tensors(qw, prefix)
    assert sorted(tensors) == [prefix + "qweight", prefix + "scales", prefix + "zeros"]
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = Int4Weight.from_tensors(load_file(tmp_path / "w.safetensors"), prefix)
    assert loaded.shape == (96, 384) and loaded.group_size == 128 and loaded.dtype == torch.bfloat16
    assert torch.equal(dequantize_int4(loaded), dequantize_int4(qw))


def test_from_tensors_rejects_bad_checkpoints():
    tensors = int4_tensors(quantize_int4(torch.randn(16, 256)))
    with pytest.raises(ValueError, match="missing"):
        Int4Weight.from_tensors({k: v for k, v in tensors.items() if k != "zeros"})
    with pytest.raises(ValueError, match="scales shape"):
        Int4Weight.from_tensors(dict(tensors, scales=tensors["scales"][:, :8]))
    with pytest.raises(ValueError, match="zeros"):
        Int4Weight.from_tensors(dict(tensors, zeros=tensors["zeros"].half()))
    with pytest.raises(ValueError, match="int32"):
        Int4Weight.from_tensors(dict(tensors, qweight=tensors["qweight"].long()))


def test_to_device():
    qw = quantize_int4(torch.randn(16, 256)).to("meta")
    assert qw.device.type == "meta" and qw.scales.device.type == "meta" and qw.zeros.device.type == "meta"
    assert qw.shape == (16, 256) and qw.dtype == torch.float32


def test_gaussian_accuracy():
    """Relative Frobenius error on N(0, 1) weights: ~0.100, the min-max step / sqrt(12) that
    a group of 128 Gaussian values gives (range ~ 5.2 sigma, step ~ 0.35 sigma)."""
    torch.manual_seed(0)
    errors = {dtype: int4_quantization_error(torch.randn(1024, 4096).to(dtype)) for dtype in ALL_DTYPES}
    print("int4 g128 relative Frobenius error:", {str(d): round(e, 4) for d, e in errors.items()})
    for err in errors.values():
        assert 0.095 < err < 0.105
