# batchgen's slot attention: causal attention over a slot KV cache, for any mix of rows.
#
# The cache is head-major per slot, [slots, H, maxlen, D] for K and for V, so one (row, head)
# reads its own keys and values as one contiguous stream. A call carries the new tokens of
# several rows (ragged: a decode row has one, a prompt chunk many); row b writes its tokens'
# K/V at (slots[b], :, starts[b] + i) and each of its queries attends over [0, starts[b] + i].
# Work is split over the cores by (row, head), each thread taking an equal share of the keys
# to read. The cache holds float32 or float16 (the maths is float32 either way: halving the
# bytes each step reads is what float16 buys); head_dim 8, 16, 32, 64 or 128; maxlen <= 4096.
import extensibility
from extensibility import InputTensor, OutputTensor
from extensibility import _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from std.math import exp
from std.memory import alloc

comptime W = 16  # float32 lanes of one AVX-512 vector
comptime QB = 4  # queries of one prompt chunk attended together (keys read once per block)
comptime MAX_LEN = 4096

comptime Ptr = Pointer[Float32, MutAnyOrigin]
comptime CachePtr[dtype: DType] = Pointer[Scalar[dtype], MutAnyOrigin]
comptime Scratch = Pointer[Float32, MutUntrackedOrigin]


def score_keys[D: Int, cache: DType](
    qv: SIMD[DType.float32, D], k_cache: CachePtr[cache], scores: Scratch,
    base: Int, lo: Int, hi: Int, m_in: Float32,
) -> Float32:
    """scores[t] = q . key t for t in [lo, hi), keys of the slot at `base`; the max so far."""
    var m = m_in
    var t = lo
    # Four keys at a time: four independent dot products in flight.
    while t + 4 <= hi:
        var kt = base + t * D
        var s0 = (qv * k_cache.unsafe_load[width=D](kt).cast[DType.float32]()).reduce_add()
        var s1 = (qv * k_cache.unsafe_load[width=D](kt + D).cast[DType.float32]()).reduce_add()
        var s2 = (qv * k_cache.unsafe_load[width=D](kt + 2 * D).cast[DType.float32]()).reduce_add()
        var s3 = (qv * k_cache.unsafe_load[width=D](kt + 3 * D).cast[DType.float32]()).reduce_add()
        scores.unsafe_store(t, SIMD[DType.float32, 4](s0, s1, s2, s3))
        m = max(m, max(max(s0, s1), max(s2, s3)))
        t += 4
    while t < hi:
        var s = (qv * k_cache.unsafe_load[width=D](base + t * D).cast[DType.float32]()).reduce_add()
        scores.unsafe_store(t, s)
        m = max(m, s)
        t += 1
    return m


def sum_values[D: Int, cache: DType](
    v_cache: CachePtr[cache], scores: Scratch, base: Int, lo: Int, hi: Int
) -> SIMD[DType.float32, D]:
    """The sum of scores[t] * value t for t in [lo, hi), values of the slot at `base`."""
    var o0 = SIMD[DType.float32, D](0)
    var o1 = SIMD[DType.float32, D](0)
    var t = lo
    while t + 2 <= hi:
        var vt = base + t * D
        var p0 = SIMD[DType.float32, D](scores.unsafe_load(t))
        var p1 = SIMD[DType.float32, D](scores.unsafe_load(t + 1))
        o0 = p0.fma(v_cache.unsafe_load[width=D](vt).cast[DType.float32](), o0)
        o1 = p1.fma(v_cache.unsafe_load[width=D](vt + D).cast[DType.float32](), o1)
        t += 2
    if t < hi:
        var p = SIMD[DType.float32, D](scores.unsafe_load(t))
        o0 = p.fma(v_cache.unsafe_load[width=D](base + t * D).cast[DType.float32](), o0)
    return o0 + o1


def attend_one[D: Int, cache: DType](
    q: Ptr, k_cache: CachePtr[cache], v_cache: CachePtr[cache], dst: Ptr, scores: Scratch,
    at: Int, base: Int, pbase: Int, plen: Int, length: Int, scale: Float32,
):
    """One query (offset `at` in q and dst) over keys [0, length): those before `plen` in the
    slot at `pbase` (a prefix another row holds), the rest in the slot at `base`."""
    var qv = q.unsafe_load[width=D](at) * scale
    var split = min(plen, length)
    var m = score_keys[D, cache](qv, k_cache, scores, pbase, 0, split, Float32.MIN)
    m = score_keys[D, cache](qv, k_cache, scores, base, split, length, m)
    var denom = softmax_numerators(scores, length, m)
    var shared = sum_values[D, cache](v_cache, scores, pbase, 0, split)
    var own = sum_values[D, cache](v_cache, scores, base, split, length)
    dst.unsafe_store(at, (shared + own) * (1.0 / denom))


def softmax_numerators(scores: Scratch, length: Int, m: Float32) -> Float32:
    """Turn scores [0, length) into exp(score - m) in place; return their sum."""
    var total = SIMD[DType.float32, W](0)
    var t = 0
    while t + W <= length:
        var e = exp(scores.unsafe_load[width=W](t) - m)
        scores.unsafe_store(t, e)
        total += e
        t += W
    var denom = total.reduce_add()
    while t < length:
        var e = exp(scores.unsafe_load(t) - m)
        scores.unsafe_store(t, e)
        denom += e
        t += 1
    return denom


def attend_block[D: Int, cache: DType](
    q: Ptr, keys_t: Scratch, stride_t: Int, v_cache: CachePtr[cache], dst: Ptr, scores: Scratch,
    at: Int, step: Int, base: Int, pbase: Int, plen: Int, first_length: Int, scale: Float32,
):
    """QB consecutive queries of one row: query j at `at + j * step` attends over keys
    [0, first_length + j). `keys_t` holds those keys transposed, [D, stride_t], so a vector
    of W keys meets a broadcast query element in one FMA, as in a matrix product."""
    var last = first_length + QB - 1
    var padded = (last + W - 1) // W * W
    var q0 = q.unsafe_load[width=D](at) * scale
    var q1 = q.unsafe_load[width=D](at + step) * scale
    var q2 = q.unsafe_load[width=D](at + 2 * step) * scale
    var q3 = q.unsafe_load[width=D](at + 3 * step) * scale
    var t0 = 0
    while t0 < padded:
        var a0 = SIMD[DType.float32, W](0)
        var a1 = SIMD[DType.float32, W](0)
        var a2 = SIMD[DType.float32, W](0)
        var a3 = SIMD[DType.float32, W](0)
        comptime for d in range(D):
            var kv = keys_t.unsafe_load[width=W](d * stride_t + t0)
            a0 = SIMD[DType.float32, W](q0[d]).fma(kv, a0)
            a1 = SIMD[DType.float32, W](q1[d]).fma(kv, a1)
            a2 = SIMD[DType.float32, W](q2[d]).fma(kv, a2)
            a3 = SIMD[DType.float32, W](q3[d]).fma(kv, a3)
        scores.unsafe_store(t0, a0)
        scores.unsafe_store(MAX_LEN + t0, a1)
        scores.unsafe_store(2 * MAX_LEN + t0, a2)
        scores.unsafe_store(3 * MAX_LEN + t0, a3)
        t0 += W
    var denoms = SIMD[DType.float32, QB](0)
    comptime for j in range(QB):
        var row = scores.unsafe_offset(j * MAX_LEN)
        var length = first_length + j
        var m = Float32.MIN
        for t in range(length):
            m = max(m, row.unsafe_load(t))
        denoms[j] = softmax_numerators(row, length, m)
        for t in range(length, last):  # keys past this query's own: no weight
            row.unsafe_store(t, Float32(0))
    var o0 = SIMD[DType.float32, D](0)
    var o1 = SIMD[DType.float32, D](0)
    var o2 = SIMD[DType.float32, D](0)
    var o3 = SIMD[DType.float32, D](0)
    for t in range(last):
        var v = v_cache.unsafe_load[width=D]((pbase if t < plen else base) + t * D).cast[
            DType.float32
        ]()
        o0 = SIMD[DType.float32, D](scores.unsafe_load(t)).fma(v, o0)
        o1 = SIMD[DType.float32, D](scores.unsafe_load(MAX_LEN + t)).fma(v, o1)
        o2 = SIMD[DType.float32, D](scores.unsafe_load(2 * MAX_LEN + t)).fma(v, o2)
        o3 = SIMD[DType.float32, D](scores.unsafe_load(3 * MAX_LEN + t)).fma(v, o3)
    dst.unsafe_store(at, o0 * (1.0 / denoms[0]))
    dst.unsafe_store(at + step, o1 * (1.0 / denoms[1]))
    dst.unsafe_store(at + 2 * step, o2 * (1.0 / denoms[2]))
    dst.unsafe_store(at + 3 * step, o3 * (1.0 / denoms[3]))


def attend_item[D: Int, cache: DType](
    q: Ptr, k_new: Ptr, v_new: Ptr, k_cache: CachePtr[cache], v_cache: CachePtr[cache], dst: Ptr,
    scores: Scratch, keys_t: Scratch,
    first: Int, n: Int, step: Int, base: Int, pbase: Int, plen: Int, start: Int, scale: Float32,
):
    """All n new tokens of one (row, head): token i is at `first + i * step` in q, k_new,
    v_new and dst, and goes to position start + i of the slot at `base`; keys and values
    before `plen` (<= start) are read from the slot at `pbase`."""
    # The row's new keys and values go in first: its queries read them.
    for i in range(n):
        var at = base + (start + i) * D
        k_cache.unsafe_store(at, k_new.unsafe_load[width=D](first + i * step).cast[cache]())
        v_cache.unsafe_store(at, v_new.unsafe_load[width=D](first + i * step).cast[cache]())
    var i = 0
    if n >= QB:
        # Transpose the keys once for the whole chunk: [length, D] -> [D, stride].
        var length = start + n
        var stride = (length + W - 1) // W * W
        for t in range(length):
            var at = (pbase if t < plen else base) + t * D
            var key = k_cache.unsafe_load[width=D](at).cast[DType.float32]()
            comptime for d in range(D):
                keys_t.unsafe_store(d * stride + t, key[d])
        for t in range(length, stride):
            comptime for d in range(D):
                keys_t.unsafe_store(d * stride + t, Float32(0))
        while i + QB <= n:
            attend_block[D, cache](
                q, keys_t, stride, v_cache, dst, scores,
                first + i * step, step, base, pbase, plen, start + i + 1, scale,
            )
            i += QB
    while i < n:
        attend_one[D, cache](
            q, k_cache, v_cache, dst, scores, first + i * step, base, pbase, plen, start + i + 1,
            scale,
        )
        i += 1


@extensibility.register("slot_attention")
struct SlotAttention:
    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],  # [T, H, D]
        q: InputTensor[dtype=DType.float32, rank=3, ...],  # [T, H, D]
        k_new: InputTensor[dtype=DType.float32, rank=3, ...],  # [T, H, D]
        v_new: InputTensor[dtype=DType.float32, rank=3, ...],  # [T, H, D]
        k_cache: MutableInputTensor[rank=4, ...],  # [S, H, maxlen, D], float32 or float16
        v_cache: MutableInputTensor[dtype=k_cache.dtype, rank=4, ...],  # [S, H, maxlen, D]
        row_offsets: InputTensor[dtype=DType.uint32, rank=1, ...],  # [B + 1]
        slots: InputTensor[dtype=DType.int64, rank=1, ...],  # [B]
        starts: InputTensor[dtype=DType.int64, rank=1, ...],  # [B]: tokens cached before
        # Row b reads positions [0, prefix_lens[b]) from slot prefix_slots[b]: a prefix that
        # another row's slot holds, shared rather than copied.
        prefix_slots: InputTensor[dtype=DType.int64, rank=1, ...],  # [B]
        prefix_lens: InputTensor[dtype=DType.int64, rank=1, ...],  # [B], <= starts[b]
        ctx: DeviceContext,
    ) raises:
        var B = slots.dim_size(0)
        var H = q.dim_size(1)
        var D = q.dim_size(2)
        var ML = k_cache.dim_size(2)
        if ML > MAX_LEN:
            raise Error("slot_attention: the cache's maxlen is above 4096")
        if D != 8 and D != 16 and D != 32 and D != 64 and D != 128:
            raise Error("slot_attention: head_dim must be 8, 16, 32, 64 or 128")
        var qp = q.unsafe_ptr()
        var knp = k_new.unsafe_ptr()
        var vnp = v_new.unsafe_ptr()
        var kcp = k_cache.unsafe_ptr()
        var vcp = v_cache.unsafe_ptr()
        var offp = row_offsets.unsafe_ptr()
        var sp = slots.unsafe_ptr()
        var stp = starts.unsafe_ptr()
        var psp = prefix_slots.unsafe_ptr()
        var plp = prefix_lens.unsafe_ptr()
        var op = output.unsafe_ptr()
        var scale = Float32(1.0) / Float32(D).__pow__(0.5)
        # An item is one (row, head); it costs the keys its queries read.
        var cost_total = 0
        var blocked = False
        for b in range(B):
            var n = Int(offp.unsafe_load(b + 1)) - Int(offp.unsafe_load(b))
            var s = Int(stp.unsafe_load(b))
            if s + n > ML:
                raise Error("slot_attention: a row runs past its slot")
            if Int(plp.unsafe_load(b)) > s:
                raise Error("slot_attention: a row's shared prefix runs past its cached tokens")
            cost_total += H * (n * s + n * (n + 1) // 2)
            blocked = blocked or n >= QB
        var nthreads = max(1, min(B * H, parallelism_level(None)))

        def task(task_id: Int) {var B, var H, var D, var ML, var qp, var knp, var vnp, var kcp, var vcp, var offp, var sp, var stp, var psp, var plp, var op, var scale, var nthreads, var cost_total, var blocked, imm}:
            var lo = task_id * cost_total // nthreads
            var hi = (task_id + 1) * cost_total // nthreads
            var scores = alloc[Float32](QB * MAX_LEN)
            var keys_t = alloc[Float32](D * MAX_LEN if blocked else 1)
            var acc = 0
            for item in range(B * H):
                var b = item // H
                var h = item % H
                var first_token = Int(offp.unsafe_load(b))
                var n = Int(offp.unsafe_load(b + 1)) - first_token
                var start = Int(stp.unsafe_load(b))
                var begin = acc
                acc += n * start + n * (n + 1) // 2
                if begin < lo or begin >= hi or n == 0:
                    continue
                var base = ((Int(sp.unsafe_load(b)) * H + h) * ML) * D
                var pbase = ((Int(psp.unsafe_load(b)) * H + h) * ML) * D
                var plen = Int(plp.unsafe_load(b))
                var first = (first_token * H + h) * D
                var step = H * D
                if D == 64:
                    attend_item[64, k_cache.dtype](qp, knp, vnp, kcp, vcp, op, scores, keys_t, first, n, step, base, pbase, plen, start, scale)
                elif D == 8:
                    attend_item[8, k_cache.dtype](qp, knp, vnp, kcp, vcp, op, scores, keys_t, first, n, step, base, pbase, plen, start, scale)
                elif D == 16:
                    attend_item[16, k_cache.dtype](qp, knp, vnp, kcp, vcp, op, scores, keys_t, first, n, step, base, pbase, plen, start, scale)
                elif D == 32:
                    attend_item[32, k_cache.dtype](qp, knp, vnp, kcp, vcp, op, scores, keys_t, first, n, step, base, pbase, plen, start, scale)
                else:
                    attend_item[128, k_cache.dtype](qp, knp, vnp, kcp, vcp, op, scores, keys_t, first, n, step, base, pbase, plen, start, scale)
            scores.unsafe_free()
            keys_t.unsafe_free()

        sync_parallelize(task, nthreads)
