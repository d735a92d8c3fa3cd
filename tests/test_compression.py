"""3LC, Cast and NoCompression codecs against a NumPy float64 reference of the same format.

The 3LC bodies are read out of the codec's payloads; checks of hand-made or truncated bodies,
below the payload API, are in the native test binary (tests/native/test_threelc.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pybrain_mpi  # noqa: F401  (loads the native core)
from pybrain_mpi.compression import Cast, NoCompression, Payload, ThreeLC, ThreeLCState
from pybrain_mpi.compression.payload import HEADER_BYTES
from pybrain_mpi.errors import PbmError

FLT_MAX = np.finfo(np.float32).max
POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int64)


# --- reference ---------------------------------------------------------------------------
# Float64 arithmetic rounded to float32 wherever the codec computes in float32 (sums and
# products of two float32 values are exact in float64, so one final rounding reproduces
# IEEE float32 arithmetic bit for bit).

def ref_quantize(acc: np.ndarray, sparsity: float):
    """(trits q, scale M, new residual) of 3LC step 2 for a float32 accumulation buffer."""
    largest = float(np.abs(acc.astype(np.float64)).max()) if acc.size else 0.0
    if largest == 0.0:
        return np.zeros(acc.size, np.int64), np.float32(0), acc.copy()
    scale = np.float32(min(largest * float(np.float32(sparsity)), float(FLT_MAX)))
    threshold = np.float32(float(scale) * 0.5)
    a = acc.astype(np.float64)
    q = (a >= threshold).astype(np.int64) - (a <= -float(threshold)).astype(np.int64)
    residual = (a - q * float(scale)).astype(np.float32)
    return q, scale, residual


def ref_quartic(q: np.ndarray) -> np.ndarray:
    """Step 3: groups of 5 trits (padded with zero trits) -> bytes 0..242."""
    trits = np.ones(-(-q.size // 5) * 5, np.int64)
    trits[: q.size] = q + 1
    return (trits.reshape(-1, 5) @ POW3).astype(np.uint8)


def ref_zero_run(quartic: np.ndarray) -> bytes:
    """Step 4: greedy runs of 121-bytes -> 255 per 14, then 241 + r (r >= 2) or 121."""
    out = bytearray()
    run = 0

    def flush():
        full, rest = divmod(run, 14)
        out.extend([255] * full)
        if rest == 1:
            out.append(121)
        elif rest >= 2:
            out.append(241 + rest)

    for byte in quartic.tolist():
        if byte == 121:
            run += 1
        else:
            flush()
            run = 0
            out.append(byte)
    flush()
    return bytes(out)


def ref_decode(body: bytes, scale: float, count: int) -> np.ndarray:
    """Exact inverse: the trits q (int) of `count` elements."""
    groups = []
    for byte in body:
        if byte > 242:
            groups.extend([121] * (byte - 241))
        else:
            groups.append(byte)
    digits = (np.array(groups, np.int64)[:, None] // POW3) % 3
    return (digits.reshape(-1) - 1)[:count]


def ref_encode(grad32: np.ndarray, residual: np.ndarray, sparsity: float):
    acc = (residual.astype(np.float64) + grad32.astype(np.float64)).astype(np.float32)
    q, scale, new_residual = ref_quantize(acc, sparsity)
    return ref_zero_run(ref_quartic(q)), scale, new_residual, acc


class Body(bytes):
    """A 3LC body as the native codec wrote it, with the payload it came in."""

    payload: Payload


def native_encode(grad, residual: np.ndarray, sparsity: float):
    """(body, scale M) of the codec's encoding of grad + residual; `residual` is updated in
    place, as the error-feedback state is."""
    codec = ThreeLC(sparsity)
    state = codec.new_state(grad, "g")
    state.residual[:] = residual
    payload = codec.encode(grad, state)
    residual[:] = state.residual
    body = Body(bytes(payload)[HEADER_BYTES:])
    body.payload = payload
    return body, np.float32(payload.scale)


def native_decode(body: Body, scale: float, count: int, out: np.ndarray, add: bool = False):
    """Decodes a body from native_encode (through its payload) into out."""
    assert body.payload.scale == np.float32(scale) and body.payload.count == count
    ThreeLC().decode(body.payload, out, add=add, name="g")
    return out


def gradient_like(rng, n):
    """Heavy-tailed values like gradients (Student t, 3 dof) at a gradient-like scale."""
    return (rng.standard_t(3, n) * 1e-3).astype(np.float32)


def trit_input(q):
    """A float32 tensor that quantizes to exactly the trits q (M = 1 at s = 1)."""
    return q.astype(np.float32)


# --- quartic and zero-run coding -----------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6, 9, 10, 11, 69, 70, 71, 333, 4099, 20011])
def test_random_trits_round_trip_and_match_reference_bytes(count):
    rng = np.random.default_rng(count)
    q = rng.integers(-1, 2, count)
    q[rng.integers(count)] = 1  # at least one nonzero, so M = 1
    residual = np.zeros(count, np.float32)
    body, scale = native_encode(trit_input(q), residual, 1.0)
    assert scale == 1.0
    assert body == ref_zero_run(ref_quartic(q))
    np.testing.assert_array_equal(ref_decode(body, scale, count), q)
    np.testing.assert_array_equal(native_decode(body, scale, count, np.empty(count, np.float32)), q)


@pytest.mark.parametrize("run_groups", [1, 2, 13, 14, 15, 27, 28, 29, 100, 1000])
@pytest.mark.parametrize("where", ["start", "middle", "tail"])
@pytest.mark.parametrize("tail", [0, 1, 3, 4])
def test_long_zero_runs_round_trip_at_start_middle_and_tail(run_groups, where, tail):
    rng = np.random.default_rng(run_groups * 7 + tail)
    dense = rng.choice([-1, 1], 5 * 20)
    zeros = np.zeros(5 * run_groups, np.int64)
    parts = {"start": [zeros, dense], "middle": [dense[:50], zeros, dense[50:]],
             "tail": [dense, zeros]}[where]
    q = np.concatenate(parts + [np.zeros(tail, np.int64)])
    body, scale = native_encode(trit_input(q), np.zeros(q.size, np.float32), 1.0)
    assert body == ref_zero_run(ref_quartic(q))
    assert max(body) >= 243 or run_groups == 1
    np.testing.assert_array_equal(native_decode(body, scale, q.size, np.empty(q.size, np.float32)), q)


def test_runs_longer_than_14_split_into_255_then_remainder():
    q = np.concatenate([[1, 0, 0, 0, 0], np.zeros(5 * 30, np.int64), [-1, 0, 0, 0, 0]])
    body, _ = native_encode(trit_input(q), np.zeros(q.size, np.float32), 1.0)
    first = ref_quartic(q[:5])[0]
    last = ref_quartic(q[-5:])[0]
    # group 0 is nonzero, then 30 zero groups (255, 255, 243), then the last group
    assert list(body) == [first, 255, 255, 243, last]


@pytest.mark.parametrize("pattern", ["dense", "sparse", "runs", "zeros"])
@pytest.mark.parametrize("count", [65_536, 300_007])
def test_large_decodes_stream_through_windows_exactly(pattern, count):
    """Outputs of >= 64Ki float32 decode window by window with streaming stores: every
    element, across window edges and runs that straddle them, equals the reference."""
    rng = np.random.default_rng(count)
    if pattern == "dense":
        q = rng.integers(-1, 2, count)
    elif pattern == "sparse":
        q = np.where(rng.random(count) < 0.02, rng.choice([-1, 1], count), 0)
    elif pattern == "runs":  # zero runs of random lengths (up to ~3 windows) between dense bursts
        q = np.zeros(count, np.int64)
        at = 0
        while at < count:
            at += int(rng.integers(0, 16_000))
            burst = int(rng.integers(1, 400))
            q[at:at + burst] = rng.choice([-1, 1], len(q[at:at + burst]))
            at += burst
    else:
        q = np.zeros(count, np.int64)
    q[-1] = 1  # M = 1 (and the short last group is nonzero)
    body, scale = native_encode(trit_input(q), np.zeros(count, np.float32), 1.0)
    assert scale == 1.0
    out = native_decode(body, scale, count, np.full(count, np.nan, np.float32))
    np.testing.assert_array_equal(out, q)
    # misaligned output (not on a 16-byte boundary): the head is stored plainly
    buffer = np.full(count + 3, np.nan, np.float32)
    out = native_decode(body, scale, count, buffer[1:count + 1])
    np.testing.assert_array_equal(out, q)
    assert np.isnan(buffer[0]) and np.isnan(buffer[count + 1:]).all()
    # a truncated body is refused with totals of the whole tensor: tests/native/test_threelc.cpp


@pytest.mark.parametrize("count", [0, 1, 4, 5, 7, 71, 5000])
def test_all_zero_tensor_encodes_to_runs_with_scale_zero(count):
    body, scale = native_encode(np.zeros(count, np.float32), np.zeros(count, np.float32), 1.0)
    assert scale == 0.0
    assert body == ref_zero_run(np.full(-(-count // 5), 121, np.uint8))
    assert len(body) <= count // 70 + 2
    out = native_decode(body, scale, count, np.full(count, 7.0, np.float32))
    np.testing.assert_array_equal(out, 0.0)


# test_decoder_accepts_any_split_of_a_zero_run: a hand-made body, in tests/native/test_threelc.cpp


# --- the codec: residual identity, reference bytes, dtypes ---------------------------------

@pytest.mark.parametrize("sparsity", [1.0, 1.5, 1.9])
@pytest.mark.parametrize("count", [1, 17, 1000, 100_003])
def test_encode_matches_reference_bytes_scale_and_residual(sparsity, count):
    rng = np.random.default_rng(count)
    residual = (gradient_like(rng, count) * 0.3).astype(np.float32)
    grad = gradient_like(rng, count)
    ref_body, ref_scale, ref_residual, _ = ref_encode(grad, residual, sparsity)
    body, scale = native_encode(grad, residual, sparsity)
    assert scale == ref_scale
    assert body == ref_body
    np.testing.assert_array_equal(residual, ref_residual)


@pytest.mark.parametrize("sparsity", [1.0, 1.9])
def test_decoded_plus_residual_equals_accumulated_input(sparsity):
    rng = np.random.default_rng(3)
    codec = ThreeLC(sparsity)
    grad = torch.from_numpy(gradient_like(rng, 50_000))
    state = codec.new_state(grad, "w")
    state.residual[:] = gradient_like(rng, 50_000)
    before = state.residual.astype(np.float64).copy()
    payload = codec.encode(grad, state)
    decoded = codec.decode(payload, torch.empty(50_000)).numpy()
    # decoded = q*M and residual = acc - q*M exactly, so they sum to acc = fl32(r + g)
    accumulated = (before + grad.numpy().astype(np.float64))
    total = decoded.astype(np.float64) + state.residual
    np.testing.assert_array_equal(total.astype(np.float32), accumulated.astype(np.float32))
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(total, accumulated, rtol=eps, atol=0)


def test_residual_stays_bounded_and_transmitted_sum_tracks_input_sum():
    rng = np.random.default_rng(11)
    n, steps = 20_000, 200
    codec = ThreeLC(1.5)
    state = codec.new_state(np.zeros(n, np.float32))
    # a persistent per-element drift plus noise, like the gradient of a slowly moving model
    drift = gradient_like(rng, n) * 0.2
    sent = np.zeros(n, np.float64)
    inputs = np.zeros(n, np.float64)
    decoded = np.empty(n, np.float32)
    for _ in range(steps):
        grad = (drift + gradient_like(rng, n)).astype(np.float32)
        payload = codec.encode(grad, state)
        codec.decode(payload, decoded)
        sent += decoded
        inputs += grad
        # after each step |residual| <= M/2 = s * max|acc| / 2 <= s * max|residual + grad|
        assert np.abs(state.residual).max() <= payload.scale / 2
    # nothing is lost, only delayed: the difference is exactly the residual (up to rounding)
    np.testing.assert_allclose(sent + state.residual, inputs, atol=steps * 4e-8 * np.abs(inputs).max())
    # and the residual is small next to what was sent in total
    assert np.abs(state.residual).max() < 0.05 * np.abs(inputs).max()
    assert state.steps == steps


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_reference_on_their_float32_values(torch_dtype):
    rng = np.random.default_rng(5)
    values = gradient_like(rng, 30_001)
    values[:6] = [6e-8, -6e-8, 1e-6, 0.0, -0.0, 3e-5]  # float16 subnormals among them
    grad = torch.from_numpy(values).to(torch_dtype)
    residual = gradient_like(rng, values.size) * 0.1
    ref_body, ref_scale, ref_residual, _ = ref_encode(grad.float().numpy(), residual, 1.0)
    body, scale = native_encode(grad, residual, 1.0)
    assert (body, scale) == (ref_body, ref_scale)
    np.testing.assert_array_equal(residual, ref_residual)


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("add", [False, True])
def test_decode_into_half_precision_rounds_once_from_float32(torch_dtype, add):
    rng = np.random.default_rng(6)
    codec = ThreeLC()
    grad = gradient_like(rng, 10_007)
    payload = codec.encode(grad, codec.new_state(grad))
    q = ref_decode(bytes(payload)[HEADER_BYTES:], payload.scale, grad.size)
    start = torch.from_numpy(gradient_like(rng, grad.size)).to(torch_dtype)
    out = start.clone()
    codec.decode(payload, out, add=add)
    values = (q * payload.scale).astype(np.float32)
    expected = (start.float().numpy() + values) if add else values
    expected = torch.from_numpy(np.where(q == 0, start.float().numpy(), expected) if add else expected)
    assert torch.equal(out, expected.to(torch_dtype))


def test_decode_add_leaves_zero_trit_elements_bit_identical():
    rng = np.random.default_rng(8)
    codec = ThreeLC(1.9)
    grad = gradient_like(rng, 5000)
    payload = codec.encode(grad, codec.new_state(grad))
    out = np.full(5000, -0.0, np.float32)
    codec.decode(payload, out, add=True)
    q = ref_decode(bytes(payload)[32:], payload.scale, 5000)
    assert np.all(np.signbit(out[q == 0]))  # -0.0 stayed -0.0
    np.testing.assert_array_equal(out[q != 0], (q[q != 0] * payload.scale).astype(np.float32))


def test_non_contiguous_tensors_encode_and_decode_in_place():
    rng = np.random.default_rng(9)
    codec = ThreeLC()
    grad = torch.from_numpy(gradient_like(rng, 64 * 32)).reshape(64, 32).t()  # not contiguous
    state = codec.new_state(grad)
    payload = codec.encode(grad, state)
    out = torch.zeros(32, 64).t()
    codec.decode(payload, out.t().contiguous().t())  # a copy; the next line is the real check
    view = torch.zeros(64, 32).t()
    codec.decode(payload, view)
    q = ref_decode(bytes(payload)[32:], payload.scale, grad.numel())
    assert torch.equal(view.contiguous().reshape(-1), torch.from_numpy((q * payload.scale).astype(np.float32)))


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [0, 64], ids=["per-tensor", "block64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_raises_naming_tensor_and_keeps_residual(bad, block):
    codec = ThreeLC(block=block)
    grad = np.ones(1000, np.float32)
    grad[417] = bad
    state = codec.new_state(grad, name="encoder.conv1.weight")
    state.residual[:] = 0.25
    with pytest.raises(PbmError, match=r"encoder\.conv1\.weight.*element 417"):
        codec.encode(grad, state)
    np.testing.assert_array_equal(state.residual, 0.25)


def test_overflowing_accumulation_raises():
    codec = ThreeLC()
    grad = np.full(10, 3e38, np.float32)
    state = codec.new_state(grad, "w")
    state.residual[:] = 3e38
    with pytest.raises(PbmError, match="overflows float32"):
        codec.encode(grad, state)


def test_sparsity_outside_one_to_two_is_rejected():
    for bad in (0.5, 2.0, float("nan")):
        with pytest.raises(ValueError, match=r"\[1, 2\)"):
            ThreeLC(bad)


def test_state_of_another_tensor_is_rejected():
    codec = ThreeLC()
    state = codec.new_state(np.zeros(10, np.float32), "a")
    with pytest.raises(ValueError, match="one state per tensor"):
        codec.encode(np.zeros(11, np.float32), state)
    with pytest.raises(TypeError, match="new_state"):
        codec.encode(np.zeros(10, np.float32))


def _payload(count=1000, seed=0):
    rng = np.random.default_rng(seed)
    grad = gradient_like(rng, count)
    codec = ThreeLC()
    return codec, bytearray(bytes(codec.encode(grad, codec.new_state(grad))))


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-1], "announces"),
    (lambda b: b[:20], "fewer than the 32-byte header"),
    (lambda b: b + b"\0", "announces"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + b"\x09" + b[5:], "version"),
    (lambda b: b[:40] + bytes([b[40] ^ 0x10]) + b[41:], "checksum"),
    (lambda b: b[:8] + bytes([b[8] ^ 1]) + b[9:], "checksum"),
])
def test_malformed_payloads_raise_clear_errors(damage, message):
    codec, data = _payload()
    with pytest.raises(PbmError, match=message):
        codec.decode(bytes(damage(data)), np.empty(1000, np.float32), name="fc.bias")


def test_payload_decoded_into_wrong_size_or_by_other_codec_raises():
    codec, data = _payload()
    with pytest.raises(PbmError, match="1000 elements but the output has 999"):
        codec.decode(bytes(data), np.empty(999, np.float32))
    with pytest.raises(ValueError, match="made by ThreeLC"):
        Cast("bf16").decode(bytes(data), np.empty(1000, np.float32))


# test_malformed_bodies_raise_clear_errors: hand-made bodies, in tests/native/test_threelc.cpp


# --- payload object, Cast, NoCompression ---------------------------------------------------

def test_payload_is_bytes_like_and_survives_a_byte_round_trip():
    rng = np.random.default_rng(1)
    codec = ThreeLC()
    grad = gradient_like(rng, 4096)
    payload = codec.encode(grad, codec.new_state(grad))
    raw = bytes(payload)
    assert payload.nbytes == len(raw) == len(payload) == 32 + payload.body_nbytes
    again = Payload(raw)
    assert again == payload and again.count == 4096 and again.scale == payload.scale
    assert again.codec_name == "ThreeLC" and again.dtype == "float32"
    out1, out2 = np.empty(4096, np.float32), np.empty(4096, np.float32)
    np.testing.assert_array_equal(codec.decode(raw, out1), codec.decode(memoryview(raw), out2))
    assert payload.compression_ratio == pytest.approx(4096 * 4 / payload.nbytes)


def test_empty_tensor_round_trips_with_every_codec():
    for codec in (ThreeLC(), Cast("bf16"), Cast("fp16"), NoCompression()):
        empty = np.zeros(0, np.float32)
        payload = codec.encode(empty, codec.new_state(empty))
        assert payload.nbytes == 32 and payload.count == 0
        assert codec.decode(payload, np.zeros(0, np.float32)).size == 0


@pytest.mark.parametrize("wire,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16])
def test_cast_rounds_like_torch_and_decodes_exactly(wire, torch_dtype, source):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(gradient_like(rng, 9999) * 100).to(source)
    x[:4] = torch.tensor([1e-7, -3e-8, 0.0, 65000.0])
    codec = Cast(wire)
    payload = codec.encode(x)
    assert payload.nbytes == 32 + 2 * x.numel()
    expected = x.float().to(torch_dtype)
    out = codec.decode(payload, torch.empty(x.numel(), dtype=torch_dtype))
    assert torch.equal(out, expected)
    base = torch.from_numpy(gradient_like(rng, x.numel()))
    summed = codec.decode(payload, base.clone(), add=True)
    assert torch.equal(summed, base + expected.float())


def test_cast_overflow_and_nan_raise_naming_tensor():
    x = np.ones(100, np.float32)
    x[50] = 1e5
    with pytest.raises(PbmError, match=r"'head'.*element 50.*overflows float16"):
        Cast("fp16").encode(x, name="head")
    Cast("bf16").encode(x)  # bf16 has float32's range
    x[50] = np.nan
    with pytest.raises(PbmError, match="element 50"):
        Cast("bf16").encode(x, name="head")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_no_compression_round_trips_exactly(dtype):
    rng = np.random.default_rng(4)
    x = gradient_like(rng, 777).astype(dtype)
    codec = NoCompression()
    payload = codec.encode(x)
    assert payload.nbytes == 32 + x.nbytes
    np.testing.assert_array_equal(codec.decode(payload, np.empty_like(x)), x)
    np.testing.assert_array_equal(codec.decode(payload, np.ones(777, np.float64), add=True),
                                  1.0 + x.astype(np.float64))


def test_state_reset_clears_residual():
    codec = ThreeLC()
    grad = np.linspace(-1, 1, 101, dtype=np.float32)
    state = codec.new_state(grad, "b")
    codec.encode(grad, state)
    assert np.abs(state.residual).max() > 0 and isinstance(state, ThreeLCState)
    state.reset()
    assert not state.residual.any() and state.steps == 0


# --- block scaling: one scale per block of B elements ---------------------------------------

def ref_block_encode(grad32: np.ndarray, residual: np.ndarray, sparsity: float, block: int):
    """(body bytes, scales, new residual) of ThreeLC(block=B): step 2 per block (the
    reference ref_quantize on each), the scales as float32 little-endian ahead of the trit
    stream of the whole tensor."""
    acc = (residual.astype(np.float64) + grad32.astype(np.float64)).astype(np.float32)
    q = np.zeros(acc.size, np.int64)
    new_residual = acc.copy()
    scales = []
    for b in range(0, acc.size, block):
        qb, scale, rb = ref_quantize(acc[b:b + block], sparsity)
        q[b:b + block], new_residual[b:b + block] = qb, rb
        scales.append(scale)
    scales = np.array(scales, np.float32)
    return scales.astype("<f4").tobytes() + ref_zero_run(ref_quartic(q)), scales, new_residual, q, acc


def block_gradient(rng, n, block):
    """Gradient-like values whose blocks differ by orders of magnitude (what block scaling
    is for), with one all-zero block when there are at least three."""
    g = gradient_like(rng, n) * np.float32(10.0) ** rng.integers(-4, 2, size=max(1, -(-n // block))).repeat(block)[:n]
    if n >= 3 * block:
        g[block:2 * block] = 0
    return g.astype(np.float32)


@pytest.mark.parametrize("block", [1, 5, 64, 100, 4096])
@pytest.mark.parametrize("count", [1, 63, 64, 65, 1000, 5003, 70_001])
def test_block_encode_and_decode_match_float64_reference(count, block):
    rng = np.random.default_rng(count * 31 + block)
    codec = ThreeLC(1.0, block=block)
    grad = block_gradient(rng, count, block)
    residual = (gradient_like(rng, count) * np.float32(0.1)).astype(np.float32)
    state = codec.new_state(grad, "g")
    state.residual[:] = residual
    payload = codec.encode(grad, state)
    body, scales, new_residual, q, acc = ref_block_encode(grad, residual, 1.0, block)
    assert payload.codec_name == "ThreeLCBlock" and payload.block == block and payload.scale == 0
    assert bytes(payload)[HEADER_BYTES:] == body
    assert payload.nbytes == HEADER_BYTES + len(body)
    np.testing.assert_array_equal(state.residual, new_residual)
    # the trit stream decodes (reference decoder) to the reference trits
    np.testing.assert_array_equal(ref_decode(body[4 * scales.size:], 1.0, count), q)
    expected = (q * np.repeat(scales.astype(np.float64), block)[:count]).astype(np.float32)
    out = np.full(count, np.nan, np.float32)
    codec.decode(payload, out)
    np.testing.assert_array_equal(out, expected)
    # error feedback: decoded + residual is the accumulated input exactly (Sterbenz, per block)
    np.testing.assert_array_equal(out.astype(np.float64) + state.residual.astype(np.float64), acc.astype(np.float64))
    # add: zero trits leave the output bit-for-bit alone (-0.0 stays -0.0)
    base = np.full(count, -0.0, np.float32)
    codec.decode(payload, base, add=True)
    np.testing.assert_array_equal(base, expected)
    assert (np.signbit(base) == ((q < 0) | (q == 0))).all()


def test_block_with_all_zero_blocks_and_zero_tensor():
    codec = ThreeLC(1.0, block=64)
    grad = np.zeros(200, np.float32)
    grad[70] = 3.0  # block 1 only
    state = codec.new_state(grad)
    payload = codec.encode(grad, state)
    scales = np.frombuffer(bytes(payload)[HEADER_BYTES:HEADER_BYTES + 16], "<f4")
    np.testing.assert_array_equal(scales, [0, 3, 0, 0])
    out = np.full(200, np.nan, np.float32)
    codec.decode(payload, out)
    np.testing.assert_array_equal(out, grad)
    assert not np.signbit(out).any()  # zeros are +0.0
    np.testing.assert_array_equal(state.residual, 0)
    zero = np.zeros(130, np.float32)
    payload = codec.encode(zero, codec.new_state(zero))
    assert bytes(payload)[HEADER_BYTES:] == bytes(12) + ref_zero_run(ref_quartic(np.zeros(130, np.int64)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_sixteen_bit_gradients_and_outputs_round_once(dtype):
    rng = np.random.default_rng(4)
    grad32 = block_gradient(rng, 1001, 64)
    grad = torch.from_numpy(grad32).to(dtype)
    codec = ThreeLC(1.0, block=64)
    state = codec.new_state(grad)
    payload = codec.encode(grad, state)
    body, scales, new_residual, q, _ = ref_block_encode(grad.float().numpy(), np.zeros(1001, np.float32), 1.0, 64)
    assert bytes(payload)[HEADER_BYTES:] == body
    np.testing.assert_array_equal(state.residual, new_residual)
    expected = (q * np.repeat(scales.astype(np.float64), 64)[:1001]).astype(np.float32)
    out = torch.full((1001,), float("nan"), dtype=dtype)
    codec.decode(payload, out)
    assert torch.equal(out, torch.from_numpy(expected).to(dtype))
    summed = torch.full((1001,), 0.5, dtype=dtype)
    codec.decode(payload, summed, add=True)
    assert torch.equal(summed, torch.from_numpy((expected.astype(np.float32) + np.float32(0.5))).to(dtype))


def test_block_size_is_validated_and_per_tensor_mode_stays_available():
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="block"):
            ThreeLC(block=bad)
    grad = gradient_like(np.random.default_rng(0), 500)
    per_tensor = ThreeLC(1.0, block=0)
    payload = per_tensor.encode(grad, per_tensor.new_state(grad))
    assert payload.codec_name == "ThreeLC" and payload.block == 0
    body, scale, _, _ = ref_encode(grad, np.zeros(500, np.float32), 1.0)
    assert bytes(payload)[HEADER_BYTES:] == body and payload.scale == scale
    # either ThreeLC decodes either payload: the payload names its own format
    out = np.zeros(500, np.float32)
    ThreeLC(block=64).decode(payload, out)
    np.testing.assert_array_equal(out, (ref_decode(body, scale, 500) * np.float64(scale)).astype(np.float32))


def test_block_payload_size_bound_and_ratio():
    # at B = 64 the scales cost 4/64 byte per element: payload <= 32 + n/16 + n/5 (+ rounding)
    n = 100_000
    grad = gradient_like(np.random.default_rng(2), n)
    codec = ThreeLC(1.0, block=64)
    payload = codec.encode(grad, codec.new_state(grad))
    assert payload.nbytes <= HEADER_BYTES + 4 * (-(-n // 64)) + -(-n // 5)
    assert payload.compression_ratio > 4 * n / (HEADER_BYTES + 4 * (-(-n // 64)) + -(-n // 5)) - 1e-9


def test_payload_of_another_format_version_is_refused_naming_both():
    grad = np.ones(100, np.float32)
    codec = ThreeLC(block=64)
    data = bytearray(bytes(codec.encode(grad, codec.new_state(grad))))
    data[4] = 1  # a version-1 peer's payload
    with pytest.raises(PbmError, match="version 1, this build reads 2"):
        Payload(bytes(data))
