"""``opt.state`` that notices edits, so that a step never updates tensors the user replaced or
dropped.

The step keeps each bucket's state tensors in cached lists (plan.py [note: step overhead]).
Fine-tuning and pruning code resets optimizer state by editing ``opt.state``: ``opt.state[p].clear()``,
``del opt.state[p]``, ``opt.state[p]["dual"] = new``. torch.optim rebuilds missing state lazily, and
so must we: every mutation of the outer mapping or of a per-param dict bumps one version number,
and a step that sees a new version rebuilds its lists from ``opt.state`` (creating what is
missing). Checking one integer per step costs nothing on the 2000-tensor workload; in-place edits
of a state tensor (``opt.state[p]["dual"].zero_()``) need no notice, the lists hold that tensor.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any


class _Version:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class ParamState(dict):
    """One param's state; any mutation bumps the shared version."""

    __slots__ = ("_version",)

    def __init__(self, version: _Version, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._version = version

    def _bump(self):
        self._version.value += 1

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._bump()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._bump()

    def clear(self):
        super().clear()
        self._bump()

    def pop(self, *args):
        out = super().pop(*args)
        self._bump()
        return out

    def popitem(self):
        out = super().popitem()
        self._bump()
        return out

    def setdefault(self, key, default=None):
        if key not in self:
            self._bump()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._bump()

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce__(self):  # pickles as a plain dict; the owning TrackedState wraps it again
        return (dict, (dict(self),))


class TrackedState(defaultdict):
    """``opt.state``: a defaultdict of ``ParamState`` with a version that every edit bumps."""

    def __init__(self, initial: Any = None):
        super().__init__()
        self._version = _Version()
        for key, value in dict(initial or {}).items():
            super().__setitem__(key, self._wrap(value))

    @property
    def version(self) -> int:
        return self._version.value

    def _wrap(self, value):
        if isinstance(value, ParamState) and value._version is self._version:
            return value
        return ParamState(self._version, value) if isinstance(value, dict) else value

    def __missing__(self, key):
        value = ParamState(self._version)
        super().__setitem__(key, value)
        self._version.value += 1
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, self._wrap(value))
        self._version.value += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self._version.value += 1

    def clear(self):
        super().clear()
        self._version.value += 1

    def pop(self, *args):
        out = super().pop(*args)
        self._version.value += 1
        return out

    def popitem(self):
        out = super().popitem()
        self._version.value += 1
        return out

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default if default is not None else {}
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):  # dict's |= would store the values as they are, unwrapped
        self.update(other)
        return self
