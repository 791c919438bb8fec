"""The tensors an op touches: bytes a kernel reads or writes, and outputs of meta ops made from shapes.

Tensors on the meta device carry no data, so their ops are not run: an op's outputs are made from the
shapes it gave the first time it saw inputs of the same shapes (every layer repeats them).
"""

from __future__ import annotations

import math

import torch


def tensors(*groups) -> list[torch.Tensor]:
    """The tensors among the values of ``groups`` (aten arguments: tensors, or lists of them)."""
    out = []
    for group in groups:
        for x in group.values() if isinstance(group, dict) else group:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (list, tuple)):
                out += [y for y in x if isinstance(y, torch.Tensor)]
    return out


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write ``t``: a dimension broadcast with stride 0 counts once."""
    if t.is_contiguous():
        return t.numel() * t.element_size()
    if t.numel() == 0:
        return 0
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride) * t.element_size()


class _Shape:
    __slots__ = ("shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = tuple(t.shape), t.stride(), t.dtype


def _shapes(result):
    if isinstance(result, torch.Tensor):
        return _Shape(result)
    if isinstance(result, (list, tuple)):
        return type(result)(_shapes(x) for x in result)
    return result


def _meta_like(spec):
    """A result rebuilt from its recorded shapes: a tensor, or a tuple/list of results and constants."""
    if isinstance(spec, _Shape):
        return torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="meta")
    if isinstance(spec, (list, tuple)):
        return type(spec)(_meta_like(x) for x in spec)
    return spec


def _signature(values) -> tuple:
    return tuple(
        (v.shape, v.stride(), v.dtype, v.device.type)
        if isinstance(v, torch.Tensor)
        else _signature(v)
        if isinstance(v, (list, tuple))
        else v
        for v in values
    )


class MetaShapes:
    """Outputs of ops on meta tensors, made from the shapes the op gave for the same input shapes."""

    def __init__(self):
        self._shapes: dict = {}  # (op, input signature) -> output shapes

    def run(self, func, args, kwargs) -> tuple[object, tuple | None]:
        """``func``'s result and the key of its input shapes (None: an unhashable argument)."""
        try:
            key = (func, _signature(args), _signature(kwargs.values()), tuple(kwargs))
            shapes = self._shapes.get(key)
        except TypeError:  # an unhashable argument: run the op
            key, shapes = None, None
        if shapes is not None:
            return _meta_like(shapes), key
        out = func(*args, **kwargs)
        if key is not None:
            self._shapes[key] = _shapes(out)
        return out, key
