"""Many speakers' LoRA adapters on one quantised base, and batches whose rows use different adapters.

A personalised model serves many speakers at once: every speaker's adapter is loaded into the one
model under its own peft adapter name, and in a batch row ``i`` uses the adapter ``names[i]``
(``None`` or ``"__base__"``: the base alone). Two implementations give the same sums:

* ``batched`` (default): each LoRA layer's A and B matrices of all loaded adapters are stacked once;
  a batch gathers its rows' matrices and applies them with two ``bmm`` calls per layer, whatever the
  number of speakers in the batch. A pointwise convolution is such a matrix over channels.
* ``peft``: peft's own mixed-adapter forward (``adapter_names`` injected by forward pre-hooks, as
  peft's ``_enable_peft_forward_hooks`` does); it loops over the distinct adapters of the batch in
  every layer, so its cost grows with the number of speakers (see docs/PERFORMANCE.md).

Adapters trained with ``batchnorm: speaker`` bring their own BatchNorm statistics; in either
implementation each row is then normalised with its own speaker's (rows without: the base's).

``folded`` is the single-speaker fast path: the adapter's product ``B @ A * scale`` is added once to
a dequantised copy of each base weight (``W_eff = W_deq + B A s``, the same arithmetic as the
unmerged sum), so a decoding step runs one dense matmul per layer. The NF4 weights are never
touched (merging into them would re-quantise), and the copy replaces the layer's dequantisation
cache, so it costs no more memory than the cache.

Peft keys adapters by name inside parameter names and filters state dicts with ``.{name}.``
substrings, so speaker ids such as ``0`` or ``19`` would collide with layer indices: each speaker
gets an internal adapter name (``spk_<id>``).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from pqm_ext.lora.batchnorm import RowStatistics, put_statistics
from pqm_ext.lora.config import AdapterConfig
from pqm_ext.lora.inject import add_adapter
from pqm_ext.lora.io import adapter_config_of, load_adapter_weights
from pqm_ext.lora.quant_conv import is_pointwise_conv1d
from pqm_ext.quant.cache import DequantCacheMixin, as_input_dtype
from pqm_ext.quant.layers import QuantConv

IMPLS = ("batched", "peft")
BASE = "__base__"


def lora_layers(model: torch.nn.Module) -> List[Tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def internal_name(name: str) -> str:
    return "spk_" + re.sub(r"[^A-Za-z0-9_]", "_", str(name))


class RowAdapters:
    """The adapters of the current batch rows (from ``MixedAdapters.rows``); ``select`` keeps a
    subset of rows (e.g. when finished utterances leave a decoding batch)."""

    def __init__(self, owner: "MixedAdapters", names: Sequence[Optional[str]], impl: str,
                 batchnorm: Optional[RowStatistics] = None):
        self.owner, self.impl = owner, impl
        self.names: List[Optional[str]] = list(names)
        self._peft_names: List[str] = []
        self._gathered: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}
        self.batchnorm = batchnorm
        self._update()

    def select(self, index: Sequence[int]) -> None:
        self.names = [self.names[i] for i in index]
        self._update()

    def _update(self) -> None:
        o = self.owner
        self._peft_names[:] = [BASE if n in (None, BASE) else o.internal[n] for n in self.names]
        idx = torch.tensor([o.slot(n) for n in self.names], dtype=torch.long)
        if self.batchnorm is not None:
            self.batchnorm.slots = idx
        if self.impl == "batched":
            self._gathered = {}
            for key, (a, b, s, pointwise) in o.stacks().items():
                i = idx.to(a.device)
                # x (rows, T, in) @ A^T (rows, in, r) @ B^T (rows, r, out) * s (rows, 1, 1)
                self._gathered[key] = (a[i].transpose(1, 2), b[i].transpose(1, 2), s[i].view(-1, 1, 1), pointwise)

    def _batched_forward(self, layer: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        at, bt, s, pointwise = self._gathered[id(layer)]
        if x.size(0) != at.size(0):
            raise ValueError(f"a batch of {x.size(0)} rows reached a LoRA layer set up for {at.size(0)} rows "
                             "(adapter names must be given per row of the batch)")
        if pointwise:  # a pointwise convolution's x is (rows, channels, T): channels last, and back
            delta = torch.bmm(torch.bmm(x.transpose(1, 2).to(at.dtype), at), bt) * s
            return result + delta.transpose(1, 2).to(result.dtype)
        xr = x.reshape(x.size(0), -1, x.size(-1)).to(at.dtype)
        delta = torch.bmm(torch.bmm(xr, at), bt) * s
        return result + delta.reshape(result.shape).to(result.dtype)


class MixedAdapters:
    """Speaker adapters loaded side by side into ``model`` (peft adapter per speaker)."""

    def __init__(self, model: torch.nn.Module, impl: str = "batched"):
        if impl not in IMPLS:
            raise ValueError(f"mixed-adapter implementation {impl!r} is not one of {IMPLS}")
        self.model, self.impl = model, impl
        self.internal: Dict[str, str] = {}
        self.infos: Dict[str, Dict] = {}
        self.statistics: Dict[str, Dict[str, torch.Tensor]] = {}  # BatchNorm statistics of speaker adapters
        self.active: Optional[str] = None  # the speaker ``use`` made active
        self._stacks: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]] = None

    @property
    def names(self) -> List[str]:
        return list(self.internal)

    def add(self, name: str, adapter_dir: Union[str, Path, None] = None, cfg: Optional[AdapterConfig] = None,
            check_base: bool = True) -> Dict:
        """Add adapter ``name`` (config from ``adapter_dir`` unless given) and load its weights. An adapter
        that cannot be loaded leaves no trace (a new name is removed again); one loaded again under the
        active speaker's name is what that speaker decodes with from now on, statistics included."""
        if cfg is None:
            if adapter_dir is None:
                raise ValueError("give an adapter directory or a config")
            cfg = adapter_config_of(adapter_dir)
        key = internal_name(name)
        new = name not in self.internal
        if new:
            if key in self.internal.values():
                raise ValueError(f"speaker ids {name!r} and another one map to the same adapter name {key!r}")
            add_adapter(self.model, cfg, key)  # peft makes the adapter it injects the active one...
            self.internal[name] = key
            if self.active is not None:  # ...but one speaker at a time, the speaker ``use`` chose stays
                self.use(self.active)
        info, stats = {}, {}
        if adapter_dir is not None:
            try:  # the file is checked in full before any weight is loaded
                info, stats = load_adapter_weights(self.model, adapter_dir, key, check_base=check_base)
            except BaseException:
                if new:
                    self._remove(name)
                raise
        if stats:
            self.statistics[name] = stats
        else:
            self.statistics.pop(name, None)
        self.infos[name] = info
        self._stacks = None
        if name == self.active:
            put_statistics(self.model, self.statistics.get(name))
        return info

    def _remove(self, name: str) -> None:
        key = self.internal.pop(name)
        for _, m in lora_layers(self.model):
            if key in m.lora_A:
                m.delete_adapter(key)

    def slot(self, name: Optional[str]) -> int:
        """Row index into the stacks; the last slot is all zeros (the base alone)."""
        if name in (None, BASE):
            return len(self.internal)
        if name not in self.internal:
            raise KeyError(f"no adapter loaded for {name!r} (loaded: {self.names[:5]}...)")
        return list(self.internal).index(name)

    def stacks(self) -> Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
        """Per LoRA layer: A (n+1, r, in), B (n+1, out, r), scale (n+1,), ranks padded with zeros; and whether
        the layer is a pointwise convolution (decided here once, not at every forward)."""
        if self._stacks is None:
            self._stacks = {}
            keys = list(self.internal.values())
            for lname, layer in lora_layers(self.model):
                base = layer.get_base_layer()
                pointwise = is_pointwise_conv1d(base)
                if not (isinstance(base, torch.nn.Linear) or pointwise):
                    raise TypeError(f"{lname}: batched mixed adapters support linear layers and pointwise "
                                    "convolutions only (use impl='peft')")
                present = [k for k in keys if k in layer.lora_A]
                if len(present) != len(keys):
                    raise ValueError(f"{lname}: adapters {sorted(set(keys) - set(present))[:3]} do not cover this "
                                     "layer (all speakers' adapters must target the same layers)")
                ref = layer.lora_A[keys[0]].weight
                r = max(layer.lora_A[k].weight.shape[0] for k in keys)
                a = ref.new_zeros(len(keys) + 1, r, ref.shape[1])
                b = ref.new_zeros(len(keys) + 1, layer.lora_B[keys[0]].weight.shape[0], r)
                s = ref.new_zeros(len(keys) + 1)
                for i, k in enumerate(keys):
                    ri = layer.lora_A[k].weight.shape[0]
                    a[i, :ri] = _matrix(layer.lora_A[k].weight)
                    b[i, :, :ri] = _matrix(layer.lora_B[k].weight)
                    s[i] = layer.scaling[k]
                self._stacks[id(layer)] = (a, b, s, pointwise)
        return self._stacks

    @contextlib.contextmanager
    def rows(self, names: Sequence[Optional[str]], impl: Optional[str] = None) -> Iterator[RowAdapters]:
        """Inside the block, row ``i`` of every batch uses adapter ``names[i]`` (``impl``: override
        this handle's implementation for the block)."""
        impl = impl or self.impl
        if impl not in IMPLS:
            raise ValueError(f"mixed-adapter implementation {impl!r} is not one of {IMPLS}")
        if self.model.training:
            raise ValueError("mixed adapter batches are for inference: call model.eval() first")
        batchnorm = None
        if self.statistics:  # some speaker brings its own BatchNorm statistics: normalise row by row
            batchnorm = RowStatistics(self.model, [self.statistics.get(n) for n in self.names] + [None])
        else:  # every row uses the base's, whichever speaker ``use`` left in the model
            put_statistics(self.model, None)
        state = RowAdapters(self, names, impl, batchnorm)
        layers = [m for _, m in lora_layers(self.model)]
        handles = []
        try:
            if state.batchnorm is not None:
                state.batchnorm.patch()
            if impl == "peft":
                def hook(_module, args, kwargs):
                    kwargs["adapter_names"] = state._peft_names
                    return args, kwargs

                handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
            else:
                for m in layers:
                    m.forward = _bound(state._batched_forward, m)
            yield state
        finally:
            if state.batchnorm is not None:
                state.batchnorm.unpatch()
            for h in handles:
                h.remove()
            if impl == "batched":
                for m in layers:
                    m.__dict__.pop("forward", None)

    def use(self, name: str) -> None:
        """Make ``name`` the active adapter of every LoRA layer (per-speaker switching without reloading)."""
        key = self.internal[name]
        for _, m in lora_layers(self.model):
            m.set_adapter(key)
            for p in m.parameters():
                p.requires_grad_(False)
        put_statistics(self.model, self.statistics.get(name))
        self.active = name


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A LoRA factor as a matrix: a linear weight as it is, a 1x1 convolution kernel without its kernel axis."""
    return weight.detach().reshape(weight.shape[0], weight.shape[1])


def _bound(fn, layer):
    def forward(x, *args, **kwargs):
        return fn(layer, x, *args, **kwargs)
    return forward


def load_adapters(model: torch.nn.Module, adapters: Mapping[str, Union[str, Path]], impl: str = "batched",
                  check_base: bool = True) -> MixedAdapters:
    """Load ``{speaker: adapter_dir}`` into ``model``; returns the handle for mixed batches."""
    mixed = MixedAdapters(model, impl=impl)
    for name, d in adapters.items():
        mixed.add(name, d, check_base=check_base)
    return mixed


@contextlib.contextmanager
def folded(model: torch.nn.Module, adapter: Optional[str] = None) -> Iterator[int]:
    """Inside the block every LoRA layer computes ``x @ (W + B A s)^T`` with one dense weight.

    ``adapter``: the peft adapter name to fold (default: each layer's active adapter). ``W`` is the
    dequantised base weight (NF4/int layers) or the float weight; the layer's dequantisation cache
    is dropped while the folded copy exists (``layer.folded_weight``, in the cache's dtype), so memory
    stays that of the cache. Yields the number of folded layers.
    """
    layers = lora_layers(model)
    n = 0
    try:
        with torch.no_grad():
            for _, layer in layers:
                name = adapter or layer.active_adapters[0]
                if name not in layer.lora_A:
                    continue
                base = layer.get_base_layer()
                store = base.store if isinstance(base, QuantConv) else base
                conv = is_pointwise_conv1d(base)
                if isinstance(store, DequantCacheMixin):
                    w = store.dequantize_weight()
                    store.drop_dequant_cache()
                elif isinstance(base, torch.nn.Linear) or conv:
                    w = base.weight.detach().clone()
                else:
                    raise TypeError(f"cannot fold LoRA into a {type(base).__name__}")
                w += layer.get_delta_weight(name).to(w.dtype).reshape(w.shape)
                # Keep the copy in the cache's dtype (fp16 on a GPU), rounded once after the sum: the
                # 4-bit state dequantises to the dtype it was quantised from (float32), and a float32
                # copy would double the memory and be cast to fp16 again by autocast at every call.
                cache_dtype = getattr(store, "dequant_cache_dtype", None)
                layer.folded_weight = w if cache_dtype is None else w.to(cache_dtype)
                layer.forward = _folded_forward(layer.folded_weight, base.bias, conv)
                n += 1
        yield n
    finally:
        for _, layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("folded_weight", None)


def _folded_forward(weight: torch.Tensor, bias: Optional[torch.Tensor], pointwise_conv: bool = False):
    op = F.conv1d if pointwise_conv else F.linear

    def forward(x, *args, **kwargs):
        return op(x, as_input_dtype(weight, x), as_input_dtype(bias, x))
    return forward
