"""Vision ops: the patch unfold, LayerNorm, GELU, class token, pixel shuffle of Llama 4's vision
tower, and the early fusion of image features into the text model's input embeddings.

Each op matches the corresponding piece of transformers' `modeling_llama4` (named in its docstring).
"""

from __future__ import annotations

import math

from l4compile.ir.op import ONNX_DTYPES, Op, expect, register
from l4compile.ir.types import TensorType


def _dim_mul(a, b):
    """Product of two dimensions, symbolic when either is ("tiles*16")."""
    return a * b if isinstance(a, int) and isinstance(b, int) else f"{a}*{b}"


@register
class PatchUnfold(Op):
    """Non-overlapping patches: pixels [T, C, H, W] -> [T, (H/p)*(W/p), C*p*p], patches row-major and each
    patch flattened channel-major (torch.nn.Unfold(p, stride=p) then permute, Llama4UnfoldConvolution)."""

    name = "patch_unfold"

    def infer(self, inputs, attrs):
        (x,) = inputs
        p = attrs["patch_size"]
        expect(x.rank == 4 and all(isinstance(d, int) for d in x.shape[1:]), self.name,
               f"pixels must be [tiles, C, H, W] with fixed C, H, W, got {x}")
        _, c, h, w = x.shape
        expect(h % p == 0 and w % p == 0, self.name, f"{h}x{w} pixels do not split into {p}x{p} patches")
        return [x.with_shape((x.shape[0], (h // p) * (w // p), c * p * p))]

    def torch(self, torch, inputs, attrs):
        p = attrs["patch_size"]
        return [torch.nn.functional.unfold(inputs[0], kernel_size=p, stride=p).permute(0, 2, 1)]

    def onnx(self, b, inputs, attrs, types):
        p = attrs["patch_size"]
        _, c, h, w = types[0].shape
        grid = b.node("Reshape", [inputs[0], b.int64s(-1, c, h // p, p, w // p, p)])
        patches = b.node("Transpose", [grid], perm=[0, 2, 4, 1, 3, 5])   # [T, gh, gw, C, p, p]
        return [b.node("Reshape", [patches, b.int64s(-1, (h // p) * (w // p), c * p * p)])]


@register
class LayerNorm(Op):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (torch.nn.LayerNorm)."""

    name = "layer_norm"

    def infer(self, inputs, attrs):
        x, w, bias = inputs
        expect(w.shape == (x.shape[-1],) and bias.shape == w.shape, self.name,
               f"weight {w} and bias {bias} do not match input {x}")
        return [x]

    def torch(self, torch, inputs, attrs):
        x, w, bias = inputs
        return [torch.nn.functional.layer_norm(x, (x.shape[-1],), w, bias, attrs["eps"])]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("LayerNormalization", inputs, axis=-1, epsilon=float(attrs["eps"]))]


@register
class Gelu(Op):
    """The exact (erf) GELU: x * (1 + erf(x / sqrt 2)) / 2 (torch.nn.GELU())."""

    name = "gelu"

    def infer(self, inputs, attrs):
        return [inputs[0]]

    def torch(self, torch, inputs, attrs):
        return [torch.nn.functional.gelu(inputs[0])]

    def onnx(self, b, inputs, attrs, types):
        (x,) = inputs
        dtype = types[0].dtype
        erf = b.node("Erf", [b.node("Mul", [x, b.scalar(1 / math.sqrt(2), dtype)])])
        return [b.node("Mul", [b.node("Mul", [x, b.node("Add", [erf, b.scalar(1.0, dtype)])]), b.scalar(0.5, dtype)])]


@register
class AppendToken(Op):
    """One learned token after each sequence: x [T, N, H], token [H] -> [T, N+1, H] (the class token,
    which Llama4VisionModel appends last)."""

    name = "append_token"

    def infer(self, inputs, attrs):
        x, token = inputs
        expect(x.rank == 3 and token.shape == (x.shape[-1],), self.name, f"token {token} does not match {x}")
        n = x.shape[1] + 1 if isinstance(x.shape[1], int) else f"{x.shape[1]}+1"
        return [x.with_shape((x.shape[0], n, x.shape[2]))]

    def torch(self, torch, inputs, attrs):
        x, token = inputs
        return [torch.cat([x, token.expand(x.shape[0], 1, x.shape[-1])], dim=1)]

    def onnx(self, b, inputs, attrs, types):
        x, token = inputs
        tiles = b.node("Slice", [b.node("Shape", [x]), b.int64s(0), b.int64s(1)])
        shape = b.node("Concat", [tiles, b.int64s(1, types[0].shape[-1])], axis=0)
        return [b.node("Concat", [x, b.node("Expand", [token, shape])], axis=1)]


@register
class DropLastToken(Op):
    """x[:, :-1]: [T, N, H] -> [T, N-1, H] (the class token leaves after the encoder)."""

    name = "drop_last_token"

    def infer(self, inputs, attrs):
        (x,) = inputs
        expect(x.rank == 3 and isinstance(x.shape[1], int), self.name, f"expected [T, N, H] with fixed N, got {x}")
        return [x.with_shape((x.shape[0], x.shape[1] - 1, x.shape[2]))]

    def torch(self, torch, inputs, attrs):
        return [inputs[0][:, :-1]]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("Slice", [inputs[0], b.int64s(0), b.int64s(types[0].shape[1] - 1), b.int64s(1)])]


def _shuffle_sizes(n: int, c: int, ratio: float) -> tuple[int, int, int]:
    side = math.isqrt(n)
    return side, round(side * ratio), round(c / ratio)


@register
class PixelShuffle(Op):
    """Fold neighbouring patches into channels: [T, s*s, C] -> [T, (s*r)^2, C/r^2] (transformers' pixel_shuffle,
    its two reshape-and-swap steps reproduced exactly, so the channel order matches the adapter's weights)."""

    name = "pixel_shuffle"

    def infer(self, inputs, attrs):
        (x,) = inputs
        r = attrs["ratio"]
        expect(x.rank == 3 and isinstance(x.shape[1], int) and isinstance(x.shape[2], int), self.name,
               f"expected [T, N, C] with fixed N, C, got {x}")
        n, c = x.shape[1:]
        side, small, wide = _shuffle_sizes(n, c, r)
        expect(side * side == n and abs(side * r - small) < 1e-9 and abs(c / r - wide) < 1e-9, self.name,
               f"{n} patches of {c} channels cannot be shuffled by {r}")
        return [x.with_shape((x.shape[0], small * small, round(c / r ** 2)))]

    def torch(self, torch, inputs, attrs):
        (x,) = inputs
        r = attrs["ratio"]
        t, n, c = x.shape
        side, small, wide = _shuffle_sizes(n, c, r)
        x = x.reshape(t, side, small, wide).permute(0, 2, 1, 3)
        x = x.reshape(t, small, small, round(c / r ** 2)).permute(0, 2, 1, 3)
        return [x.reshape(t, -1, x.shape[-1])]

    def onnx(self, b, inputs, attrs, types):
        r = attrs["ratio"]
        n, c = types[0].shape[1:]
        side, small, wide = _shuffle_sizes(n, c, r)
        x = b.node("Transpose", [b.node("Reshape", [inputs[0], b.int64s(-1, side, small, wide)])], perm=[0, 2, 1, 3])
        x = b.node("Reshape", [x, b.int64s(-1, small, small, round(c / r ** 2))])
        x = b.node("Transpose", [x], perm=[0, 2, 1, 3])
        return [b.node("Reshape", [x, b.int64s(-1, small * small, round(c / r ** 2))])]


@register
class FlattenTiles(Op):
    """[T, N, D] -> [T*N, D]: every tile's tokens in one list, tile by tile."""

    name = "flatten_tiles"

    def infer(self, inputs, attrs):
        (x,) = inputs
        expect(x.rank == 3 and isinstance(x.shape[2], int), self.name, f"expected [T, N, D], got {x}")
        return [x.with_shape((_dim_mul(x.shape[0], x.shape[1]), x.shape[2]))]

    def torch(self, torch, inputs, attrs):
        return [inputs[0].reshape(-1, inputs[0].shape[-1])]

    def onnx(self, b, inputs, attrs, types):
        return [b.node("Reshape", [inputs[0], b.int64s(-1, types[0].shape[2])])]


@register
class MergeImageFeatures(Op):
    """Early fusion: embeddings [B, S, H] whose token (ids [B, S]) is `image_token` are replaced, in row-major
    order, by the rows of features [N, H] (transformers: inputs_embeds.masked_scatter(input_ids == image_token_id,
    projected features)). Image tokens past the N-th keep their embedding: with N = 0 (decode steps) an image
    token the model generates is embedded as text, as transformers does once pixel_values are consumed."""

    name = "merge_image_features"

    def infer(self, inputs, attrs):
        embeds, ids, features = inputs
        expect(ids.dtype == "int64" and ids.shape == embeds.shape[:2], self.name, f"ids {ids} vs embeddings {embeds}")
        expect(features.rank == 2 and features.shape[1] == embeds.shape[2] and features.dtype == embeds.dtype,
               self.name, f"features {features} do not match embeddings {embeds}")
        return [embeds]

    def torch(self, torch, inputs, attrs):
        embeds, ids, features = inputs
        is_image = ids == attrs["image_token"]
        order = is_image.flatten().cumsum(0).reshape(ids.shape) - 1
        mask = (is_image & (order < features.shape[0])).unsqueeze(-1).expand_as(embeds)
        return [embeds.masked_scatter(mask, features.to(embeds.dtype))]

    def onnx(self, b, inputs, attrs, types):
        embeds, ids, features = inputs
        dtype = ONNX_DTYPES[types[0].dtype]
        is_image = b.node("Equal", [ids, b.const(attrs["image_token"], "int64")])        # [B, S]
        # index of each image token among all of them, row-major (CumSum in float32: TensorRT's CumSum is float-only)
        flat = b.node("Reshape", [b.node("Cast", [is_image], to=1), b.int64s(-1)])
        order = b.node("Sub", [b.node("Cast", [b.node("CumSum", [flat, b.const(0, "int64")])], to=7), b.const(1, "int64")])
        order = b.node("Reshape", [order, b.node("Shape", [ids])])
        count = b.node("Slice", [b.node("Shape", [features]), b.int64s(0), b.int64s(1)])
        count = b.node("Reshape", [count, b.int64s()])
        replaced = b.node("And", [is_image, b.node("Less", [order, count])])
        index = b.node("Where", [replaced, order, count])            # row `count` is the zero row added below
        zero_row = b.node("Cast", [b.const([[0.0] * types[2].shape[1]], "float32")], to=dtype)
        rows = b.node("Gather", [b.node("Concat", [features, zero_row], axis=0), index], axis=0)   # [B, S, H]
        return [b.node("Where", [b.node("Unsqueeze", [replaced, b.int64s(-1)]), rows, embeds])]
