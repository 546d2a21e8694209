"""A GPU stand-in on the CPU, for tests: tensors that say they live on another device while their values stay on the
CPU, and a dispatch mode that fails every operation mixing them with CPU tensors the way CUDA refuses to.

    with FakeDevice() as dev:       # inside: every torch operation is checked
        move(pipe)                  # the pipeline's weights and buffers now report device `dev.device` ("meta")
        pipe(...)                   # runs with real values (frames equal a CPU run); a CPU tensor of more than
                                    # zero dimensions meeting a device tensor raises MixedDevices naming the op

What CUDA allows and so does this: 0-dim CPU tensors as scalars in any op; `copy_` and `.to()` across devices;
CPU index tensors into a device tensor; `.item()` / `.cpu()` / `.tolist()` (they read back to the CPU). What it
refuses like CUDA: a CPU tensor (dim > 0) with a device tensor in one op, device index tensors into a CPU tensor,
a CPU generator drawing directly on the device, and `.numpy()` of a device tensor.

Why "meta": it is a device every CPU build of torch has, so `torch.zeros(..., device=x.device)` and `.to(device)`
in the code under test reach this mode instead of failing on a missing CUDA runtime; no real meta tensor is made
while the mode is active (their values would be lost).

Shapes are the code's own; nothing here knows about diffusers.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

# Ops that legitimately take operands on two devices (as on CUDA): copies between devices.
CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
# Indexing a device tensor with CPU index tensors is fine on CUDA (the indices are moved); the reverse is not.
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class MixedDevices(RuntimeError):
    """An operation met a CPU tensor and a device tensor, which CUDA would refuse."""


class OnDevice(torch.Tensor):
    """A tensor on DEVICE whose values are a CPU tensor (`.cpu_value`)."""

    @staticmethod
    def __new__(cls, value: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, value.shape, strides=value.stride(),
                                                   storage_offset=value.storage_offset(), dtype=value.dtype,
                                                   layout=value.layout, device=DEVICE,
                                                   requires_grad=value.requires_grad)

    def __init__(self, value: torch.Tensor):
        assert value.device.type == "cpu", value.device
        self.cpu_value = value

    @classmethod
    def of(cls, value: torch.Tensor) -> "OnDevice":
        """A wrapper made as a normal tensor even inside torch.inference_mode (the engine renders there): views made
        in it then share their base's version counter as real views do."""
        with torch.inference_mode(False):
            return cls(value)

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"OnDevice({self.cpu_value!r})"

    def numpy(self, *args, **kwargs):  # CUDA: "can't convert cuda:0 device type tensor to numpy"
        raise TypeError("can't convert a device tensor to numpy; use .cpu() first")

    def tolist(self):
        return self.cpu().tolist()

    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, new):  # `p.data = q` (transformers' embedding resize, casts): the values follow the metadata
        torch._C.TensorBase.data.__set__(self, new)
        self.cpu_value = new.cpu_value

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_device(t) -> bool:
    return isinstance(t, OnDevice)


def _check(func, args, kwargs, to_device: bool) -> None:
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    on = [t for t in tensors if _is_device(t)]
    gen = kwargs.get("generator")
    if to_device and gen is not None and gen.device.type == "cpu":
        raise MixedDevices(f"{func}: a CPU generator cannot draw on the device (draw on the CPU, then move)")
    lost = [t for t in tensors if not _is_device(t) and t.device.type == DEVICE.type]
    if lost:  # made where this mode could not see it: a gap in this stand-in, not in the code under test
        raise RuntimeError(f"{func}: a real {DEVICE.type} tensor (no values) reached the fake device")
    if not on or func in CROSS_DEVICE:
        return
    if func in INDEXING:
        if not _is_device(args[0]):
            raise MixedDevices(f"{func}: device index tensors into a CPU tensor")
        rest = [t for t in tree_flatten((args[2:], kwargs))[0] if isinstance(t, torch.Tensor)]  # values
        cpu = [t for t in rest if not _is_device(t) and t.dim() > 0]
    else:
        cpu = [t for t in tensors if not _is_device(t) and t.dim() > 0]
    if cpu:
        raise MixedDevices(f"{func}: device tensors {[tuple(t.shape) for t in on][:3]} met CPU tensors "
                           f"{[tuple(t.shape) for t in cpu][:3]}")


def _run(func, args, kwargs):
    """Check the operands, run the op on the CPU values, and put the results on the device when it ran there."""
    flat, _ = tree_flatten((args, kwargs))
    devices = {torch.device(d).type for d in flat if isinstance(d, torch.device)}  # device arguments, positional too
    to_device = DEVICE.type in devices
    to_cpu = bool(devices) and not to_device
    _check(func, args, kwargs, to_device)
    on_device = to_device or (not to_cpu and any(_is_device(t) for t in flat))
    cpu = torch.device("cpu")

    def plain(x):
        if _is_device(x):
            return x.cpu_value
        return cpu if isinstance(x, torch.device) and x.type == DEVICE.type else x

    cargs, ckwargs = tree_map(plain, args), tree_map(plain, kwargs)
    out = func(*cargs, **ckwargs)
    if func is aten._local_scalar_dense.default or not on_device:
        return out
    return _wrap_results(func, args, kwargs, out)


def _wrap_results(func, args, kwargs, out):
    """The op's results as device tensors; results that are a mutated argument (in-place, out=) are that argument
    itself, as torch requires. A view's result wraps a view of the CPU values, so writes through it reach them."""
    schema = func._schema
    written = {}  # alias set -> the argument object it names
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            for name in a.alias_info.before_set:
                written[name] = value
    single = len(schema.returns) == 1  # one return, which may itself be a list (chunk, split)
    results = []
    for r, o in zip(schema.returns, (out,) if single else out):
        if r.alias_info is not None and r.alias_info.is_write and written:
            results.append(written[next(iter(r.alias_info.before_set))])
        else:
            results.append(tree_map(lambda t: OnDevice.of(t) if isinstance(t, torch.Tensor) else t, o))
    if not schema.returns:
        return out
    return results[0] if single else type(out)(results)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


# Python-level constructors that copy data onto a device below the dispatcher's Python key: made on the CPU here,
# then wrapped.
_CONSTRUCTORS = {torch.tensor, torch.as_tensor, torch.asarray}


_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _list_to_tensor(index):
    """A Python list inside an index as a CPU tensor: torch would build it on the indexed tensor's device below the
    Python key (a real meta tensor here); CUDA takes CPU index tensors just as well."""
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(_list_to_tensor(i) for i in index)
    return index


class _Constructors(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEXING and _is_device(args[0]):
            return func(args[0], _list_to_tensor(args[1]), *args[2:], **kwargs)
        dev = kwargs.get("device")
        if func in _CONSTRUCTORS and dev is not None and torch.device(dev).type == DEVICE.type:
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
            if _is_device(data):
                return func(*args, **kwargs)
            return OnDevice.of(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


class FakeDevice:
    """The context: while active, device-creating ops make OnDevice tensors and mixed operands raise MixedDevices."""

    device = DEVICE

    def __enter__(self):
        self._modes = [_Constructors(), _Dispatch()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def move(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module's parameters and buffers on the fake device, values kept (in place, like `module.to`)."""
    return module._apply(lambda t: t if _is_device(t) else OnDevice.of(t.detach()))


def move_pipeline(pipe):
    """Every torch module of a diffusers pipeline onto the fake device."""
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            move(c)
    return pipe
