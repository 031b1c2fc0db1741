"""What differs between the megatron-core versions this package supports, behind named helpers.

The rest of the package calls these and never compares version numbers itself. Each helper works on the structure
it is given (a spec entry's type, a field's presence) where it can, and on the installed version only where the
structure cannot tell.

==============================================  ====================================================================
difference                                      helper
==============================================  ====================================================================
layer-spec entries: the local spec's dense MLP  :func:`spec_submodules`, :func:`replace_submodules` (either form)
and MoE entries are ``ModuleSpec`` up to 0.17,
``functools.partial(builder, submodules=...)``
from 0.18 on
==============================================  ====================================================================
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

__all__ = ["spec_submodules", "replace_submodules"]


def spec_submodules(spec: Any) -> Any:
    """The submodules dataclass of a layer-spec entry: ``spec.submodules`` of a ``ModuleSpec``, or the
    ``submodules`` keyword of a ``functools.partial`` (megatron-core >= 0.18's MLP / MoE builders).

    Raises:
        TypeError: an entry of neither form, or a partial without a ``submodules`` keyword (named).
    """
    if isinstance(spec, functools.partial):
        if "submodules" not in spec.keywords:
            raise TypeError(f"layer-spec entry {spec!r} is a functools.partial without a 'submodules' keyword")
        return spec.keywords["submodules"]
    if hasattr(spec, "submodules") and dataclasses.is_dataclass(spec):
        return spec.submodules
    raise TypeError(f"layer-spec entry {spec!r} ({type(spec).__name__}) is neither a ModuleSpec nor a "
                    "functools.partial with 'submodules'")


def replace_submodules(spec: Any, **submodules: Any) -> Any:
    """A copy of a layer-spec entry with some of its submodules replaced (the entry's form is kept).

    Args:
        spec: a ``ModuleSpec`` or a ``functools.partial(builder, submodules=<dataclass>, ...)``.
        submodules: fields of its submodules dataclass to replace.

    Raises:
        TypeError: see :func:`spec_submodules`; a field the submodules dataclass lacks (``dataclasses.replace``).
    """
    new = dataclasses.replace(spec_submodules(spec), **submodules)
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": new})
    return dataclasses.replace(spec, submodules=new)
