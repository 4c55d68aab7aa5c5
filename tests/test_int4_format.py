"""int4 format: pack/unpack, quantise/dequantise (plain PyTorch), checkpoint tensors, accuracy."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import ALL_DTYPES
from olmo2_fast.kernels.int4_format import (
    INT4_BASES, INT4_MAGIC, Int4Weight, dequantize_int4, int4_quantization_error, int4_tensors, pack_int4,
    quantize_int4, unpack_int4, validate_int4_weight,
)


@pytest.mark.parametrize("n, k", [(8, 32), (16, 64), (96, 384), (200, 1024)])
def test_pack_unpack_roundtrip(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (n // 8, k // 32, 8, 4) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), q)
    words = torch.randint(-2**31, 2**31, (n // 8, k // 32, 8, 4), dtype=torch.int32)
    assert torch.equal(pack_int4(unpack_int4(words)), words)


def test_packed_bit_layout():
    """packed[b, u, r, i] holds codes k = 32u + 8i + c of output n = 8b + r, code c in bits (4c + 3) mod 32 up:
    the natural nibble order rotated left by 3 bits."""
    q = torch.zeros(16, 64, dtype=torch.uint8)
    q[0, :8] = torch.arange(1, 9)      # natural 0x87654321, rotated left by 3: 0x3B2A1908 + bit 2 from the 8
    q[9, 40:48] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 15])  # code 7 wraps: bits 31, 0, 1, 2
    q[3, 8:16] = torch.tensor([15, 0, 0, 0, 0, 0, 0, 0])   # code 0: bits 3..6
    packed = pack_int4(q)
    assert packed[0, 0, 0, 0].item() == ((0x87654321 << 3) | (0x87654321 >> 29)) & 0xFFFFFFFF
    assert packed[1, 1, 1, 1].item() == -2**31 + 0b111  # row 9 = block 1 row 1; k 40 = unit 1 word 1
    assert packed[0, 0, 3, 1].item() == 0xF << 3
    assert torch.count_nonzero(packed).item() == 3


def test_the_kernels_views_read_the_codes():
    """What kernels/int4_tiles.py int4_code_values computes, in PyTorch: rotating a word right by (4c + 3 - f)
    mod 32 and OR-ing bits f..f+3 into the float32 magic number reads code c as base + q, base 16 (f = 19) for
    even c and 256 (f = 15) for odd c."""
    q = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    words = pack_int4(q)[0, 0].to(torch.int64) & 0xFFFFFFFF  # [8 rows, 4 words]
    for c in range(8):
        field, magic, base = (19, INT4_MAGIC[0], INT4_BASES[0]) if c % 2 == 0 else (15, INT4_MAGIC[1], INT4_BASES[1])
        rotation = (4 * c + 3 - field) % 32
        view = ((words >> rotation) | (words << (32 - rotation))) & 0xFFFFFFFF
        bits = ((view & (0xF << field)) | magic).to(torch.int32)
        assert torch.equal(bits.view(torch.float32), base + q.view(8, 4, 8)[:, :, c].float()), c


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N % 8 == 0 and K % 32 == 0"):
        pack_int4(torch.zeros(8, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N % 8 == 0 and K % 32 == 0"):
        pack_int4(torch.zeros(12, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(torch.zeros(1, 2, 8, 4, dtype=torch.int64))


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
def test_dequantize_rounds_once_from_the_exact_weight(dtype):
    """dequantize_int4 in float64 is ŵ = (q - 8) s + z exactly (16-bit scales: the products fit), and in the
    dtype it is that value rounded to float32, then to the dtype: within half a dtype ulp (plus a float32
    one) of ŵ, which is what the M = 1 decode GEMV multiplies with."""
    qw = quantize_int4(torch.randn(64, 512).to(dtype))
    exact = dequantize_int4(qw, torch.float64)
    q = unpack_int4(qw.packed).double().view(64, 4, 128)
    s, z = qw.scales.double().T.unsqueeze(-1), qw.zeros.double().T.unsqueeze(-1)
    product = ((q - 8) * s).view(64, 512)
    if dtype != torch.float32:
        assert torch.equal(exact, product + z.expand(-1, -1, 128).reshape(64, 512))
    rounded = dequantize_int4(qw)
    half_ulp = (torch.finfo(dtype).eps * exact.abs() + torch.finfo(dtype).tiny) / 2
    float32_steps = torch.finfo(torch.float32).eps * (product.abs() + z.abs().expand(-1, -1, 128).reshape(64, 512))
    assert ((rounded.double() - exact).abs() <= half_ulp + float32_steps).all()
    assert torch.equal(dequantize_int4(qw, torch.float32).to(dtype), rounded)


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
    w = torch.randn(8, 384).to(dtype)
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
        quantize_int4(torch.randn(8, 200))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(8, 256), group_size=48)
    with pytest.raises(ValueError, match="out_features N=12 is not a multiple of 8"):
        quantize_int4(torch.randn(12, 256))
    with pytest.raises(TypeError, match="2-D"):
        quantize_int4(torch.randn(256))
    with pytest.raises(TypeError, match="2-D"):
        quantize_int4(torch.ones(4, 256, dtype=torch.int32))
    with pytest.raises(TypeError, match="scale dtype"):
        quantize_int4(torch.randn(8, 256), dtype=torch.float64)
    w = torch.randn(8, 256)
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
    with pytest.raises(ValueError, match=r"int32 \[N / 8, K / 32, 8, 4\]"):
        Int4Weight.from_tensors(dict(tensors, qweight=tensors["qweight"].reshape(2, 8, 4, 8)))


def test_validate_names_what_the_kernels_cannot_take():
    qw = quantize_int4(torch.randn(16, 256))
    validate_int4_weight(qw)
    with pytest.raises(TypeError, match="expected an Int4Weight"):
        validate_int4_weight(qw.packed)
    with pytest.raises(ValueError, match="support group size 128"):
        validate_int4_weight(quantize_int4(torch.randn(16, 256), group_size=64))
    with pytest.raises(TypeError, match="share a float32/float16/bfloat16 dtype"):
        validate_int4_weight(Int4Weight(qw.packed, qw.scales, qw.zeros.half(), qw.shape))
    with pytest.raises(ValueError, match=r"zeros must be \[2, 16\]"):
        validate_int4_weight(Int4Weight(qw.packed, qw.scales, qw.zeros[:1], qw.shape))
    with pytest.raises(ValueError, match="int4 zeros is on meta"):
        validate_int4_weight(Int4Weight(qw.packed, qw.scales, qw.zeros.to("meta"), qw.shape))


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
