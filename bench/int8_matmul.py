"""Why --quantize int8 is MatMulNBits bits=8 at accuracy_level 4: a decode-shaped matmul (one row) as fp32 MatMul,
MatMulNBits bits=8 at accuracy_level 0 and 4, and dynamic W8A8 (com.microsoft DynamicQuantizeMatMul), 2 threads,
7 rounds taken in turn (50 calls each); per build its median time, the median over rounds of fp32 time / its time,
and the cosine of its product against the fp32 one.

    python bench/int8_matmul.py
"""
import numpy as np, onnx, onnxruntime as ort, time, sys
from onnx import helper as h, TensorProto as T, numpy_helper as nh
rng = np.random.default_rng(0)
def sess(nodes, inits):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, None])], [h.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.inter_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
for K, N in [(512, 2048), (512, 32000), (2048, 8192)]:
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    x = rng.standard_normal((1, K)).astype(np.float32)
    blocks = w.T.reshape(N, K // 32, 32); s = np.abs(blocks).max(-1) / 127
    q = (np.clip(np.rint(blocks / s[..., None]), -127, 127) + 128).astype(np.uint8)
    wc = np.abs(w).max(0) / 127; qc = np.clip(np.rint(w / wc), -127, 127).astype(np.int8)
    cands = {
        "fp32 MatMul": sess([h.make_node("MatMul", ["x", "w"], ["y"])], [nh.from_array(w, "w")]),
        "MatMulNBits8 acc0": sess([h.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=8, block_size=32, accuracy_level=0)], [nh.from_array(q, "q"), nh.from_array(s.astype(np.float32), "s")]),
        "MatMulNBits8 acc4": sess([h.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=8, block_size=32, accuracy_level=4)], [nh.from_array(q, "q"), nh.from_array(s.astype(np.float32), "s")]),
        "DynamicQuantizeMatMul": sess([h.make_node("DynamicQuantizeMatMul", ["x", "qc", "wc"], ["y"], domain="com.microsoft")], [nh.from_array(qc, "qc"), nh.from_array(wc.astype(np.float32), "wc")]),
    }
    ref = x @ w
    times = {k: [] for k in cands}
    for rnd in range(7):
        for k, se in cands.items():
            se.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(50): y = se.run(None, {"x": x})[0]
            times[k].append((time.perf_counter() - t) / 50 * 1e6)
    base = np.array(times["fp32 MatMul"])
    for k in cands:
        y = cands[k].run(None, {"x": x})[0]
        cos = float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref))
        print(f"K={K} N={N} {k:<24} {np.median(times[k]):8.1f} us  fp32/this (median of ratios) {np.median(base/np.array(times[k])):5.2f}  cos {cos:.6f}")
