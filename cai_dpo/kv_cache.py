"""Key/value-cache internals of the local :class:`~cai_dpo.engine.Engine`.

The engine's public calls (``generate``, ``score_options``, ``logprob``) run the model's
forward pass with a transformers key/value cache; what they do with that cache lives here,
apart from the interface, because it leans on how transformers builds its cache types:

- :class:`SharedPrefixes` — prefix-cache reuse: the cache of a token prefix that every row
  of a batch shares (an explicit ``prefix``, a chat template's system prompt, a judge's
  instructions) is computed once, extended from the longest prefix already cached, and
  cloned and expanded to the batch's rows (broadcast views, so the first update copies it
  once); below :data:`MIN_SHARED_TOKENS` recomputing the prefix per row costs less.
- :func:`grow_in_place` — a class swap on transformers' ``DynamicLayer``: its layers
  concatenate the whole cache for every decoded token, a copy that grows with the
  sequence; swapped to a subclass, they append into reserved room instead.
- :func:`cache_argument` and :func:`returned_cache` — the forward pass's cache argument and
  result, named ``cache`` in newer transformers and ``past_key_values`` before.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cai_dpo.engine import Engine

MIN_SHARED_TOKENS = 8  # below this, recomputing a common prefix per row costs less than caching it


def cache_argument(model: Any) -> str:
    """Name of the key/value-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The (extended) key/value cache of a forward pass's output, under either name."""
    new_cache = getattr(out, "cache", None)
    return new_cache if new_cache is not None else out.past_key_values


class SharedPrefixes:
    """Key/value caches of token prefixes shared by a batch, each extended from the longest one already computed."""

    def __init__(self, engine: Engine, capacity: int = 4):
        self.engine = engine
        self.capacity = capacity
        self.entries: list[tuple[tuple[int, ...], Any]] = []

    def prefix(self, tokens: list[int], batch: int) -> tuple[int, Any]:
        """How many of ``tokens`` come from a cache, and that cache for ``batch`` rows.

        ``(0, None)`` when there are fewer than :data:`MIN_SHARED_TOKENS`: the rows compute them.
        """
        if len(tokens) < MIN_SHARED_TOKENS:
            return 0, None
        return len(tokens), self.get(tokens, batch)

    def get(self, tokens: list[int], batch: int) -> Any:
        """A fresh cache of ``tokens`` repeated for ``batch`` rows."""
        expanded = copy.deepcopy(self._single(tuple(tokens)))
        layers = getattr(expanded, "layers", None)
        if layers and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
            for layer in layers:  # broadcast views: the first update copies them once, into the grown cache
                layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
                layer.values = layer.values.expand(batch, *layer.values.shape[1:])
        else:
            expanded.batch_repeat_interleave(batch)
        return expanded

    def _single(self, key: tuple[int, ...]) -> Any:
        import torch

        base: tuple[tuple[int, ...], Any] | None = None
        for entry in self.entries:
            if key[: len(entry[0])] == entry[0] and (base is None or len(entry[0]) > len(base[0])):
                base = entry
        if base is not None and base[0] == key:
            return base[1]
        done = len(base[0]) if base else 0
        cache = copy.deepcopy(base[1]) if base else None
        dev = self.engine.device
        ids = torch.tensor([key[done:]], device=dev)
        mask = torch.ones(1, len(key), dtype=torch.long, device=dev)
        positions = torch.arange(done, len(key), device=dev)[None]
        with torch.inference_mode():
            _, cache = self.engine._forward(ids, mask, positions, cache, 1)
        self.entries = [(key, cache)] + self.entries[: self.capacity - 1]
        return cache


def grow_in_place(cache: Any, spare: int) -> None:
    """Let the cache's plain layers append decoded tokens into reserved room instead of re-concatenating per step."""
    from transformers.cache_utils import DynamicLayer

    growing = _growing_layer_class()
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = growing
            layer.spare, layer.buffers = spare, None


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A key/value cache layer with spare room: appending writes in place.

        The plain layer concatenates the whole cache for every decoded token, a copy that
        grows with the sequence; this one copies once into a buffer ``spare`` tokens longer
        (and again only after the batch shrinks) and hands out views of it.
        """

        spare: int = 64
        buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized or self.keys.numel() == 0:
                return super().update(key_states, value_states, *args, **kwargs)
            n, m = self.keys.shape[-2], key_states.shape[-2]
            bufs = self.buffers
            if (
                bufs is None
                or self.keys.data_ptr() != bufs[0].data_ptr()
                or self.keys.shape[0] != bufs[0].shape[0]
                or n + m > bufs[0].shape[-2]
            ):
                shape = (*self.keys.shape[:-2], n + m + self.spare, self.keys.shape[-1])
                bufs = (self.keys.new_empty(shape), self.values.new_empty(shape))
                bufs[0][..., :n, :] = self.keys
                bufs[1][..., :n, :] = self.values
                self.buffers = bufs
            bufs[0][..., n : n + m, :] = key_states
            bufs[1][..., n : n + m, :] = value_states
            self.keys, self.values = bufs[0][..., : n + m, :], bufs[1][..., : n + m, :]
            return self.keys, self.values

    return GrowingLayer
