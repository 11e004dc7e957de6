"""The bridge between a nested Hydra config and Flower's flat ``run_config``.

Flower apps only see ``context.run_config``: a flat mapping of dotted keys to
``bool``/``int``/``float``/``str``. ``flatten`` turns the resolved Hydra config
into that form and ``unflatten`` turns it back, so simulation and deployment
rebuild every object through the same :func:`build_component` call.

Encoding rules (each reversible):

* keys: ``snake_case`` becomes ``kebab-case`` (Flower's convention), except
  Hydra's own ``_target_`` and ``_partial_`` keys, which are kept as they are;
* lists become JSON strings (Flower rejects list values);
* ``None`` values are left out, so constructors fall back to their defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_HYDRA_KEYS = frozenset({"_target_", "_partial_"})
Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A user's configuration is invalid; the message names the key and value."""


def _encode_key(key: str) -> str:
    if key in _HYDRA_KEYS:
        return key
    if "-" in key or "." in key:
        raise ConfigError(f"{key}: config keys may not contain '-' or '.'")
    return key.replace("_", "-")


def _decode_key(key: str) -> str:
    return key if key in _HYDRA_KEYS else key.replace("-", "_")


def flatten(config: Mapping[str, Any], *, prefix: str = "") -> dict[str, Scalar]:
    """Flatten a nested, resolved config into Flower run-config form.

    Parameters
    ----------
    config : Mapping[str, Any]
        Nested mapping of plain Python values (resolve OmegaConf first).
    prefix : str
        Dotted prefix for the keys (used in recursion).

    Returns
    -------
    dict[str, bool | int | float | str]
        Dotted kebab-case keys mapped to scalars; lists are JSON strings.
    """
    flat: dict[str, Scalar] = {}
    for key, value in config.items():
        dotted = f"{prefix}{_encode_key(str(key))}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{dotted}."))
        elif isinstance(value, list | tuple):
            flat[dotted] = json.dumps(list(value))
        elif isinstance(value, bool | int | float | str):
            flat[dotted] = value
        else:
            raise ConfigError(
                f"{dotted}={value!r}: unsupported config value type {type(value).__name__}"
            )
    return flat


def _decode_value(value: Scalar) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


def unflatten(run_config: Mapping[str, Scalar]) -> dict[str, Any]:
    """Rebuild the nested config that :func:`flatten` encoded.

    Parameters
    ----------
    run_config : Mapping[str, bool | int | float | str]
        A Flower ``context.run_config`` (it is not modified).

    Returns
    -------
    dict[str, Any]
        Nested snake_case config with JSON lists decoded.
    """
    nested: dict[str, Any] = {}
    for dotted, value in run_config.items():
        parts = [_decode_key(part) for part in dotted.split(".")]
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _decode_value(value)
    return nested


def build_component(node: Mapping[str, Any], *, key: str, **kwargs: Any) -> Any:
    """Instantiate one config group node (a Hydra ``_target_`` node).

    Parameters
    ----------
    node : Mapping[str, Any]
        The group's config, with ``_target_`` and constructor arguments.
    key : str
        The group's name, used in error messages.
    **kwargs
        Extra constructor arguments supplied at run time.

    Returns
    -------
    Any
        The constructed object (a ``functools.partial`` for ``_partial_`` nodes).

    Raises
    ------
    ConfigError
        When the node has no target, names an unknown parameter, or the
        constructor rejects a value. The message names the key and value.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if "_target_" not in node:
        raise ConfigError(f"{key}: missing _target_")
    try:
        return instantiate(dict(node), **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from cause
        if isinstance(cause, TypeError):
            raise ConfigError(f"{key} ({node['_target_']}): {cause}") from cause
        raise ConfigError(f"{key}: {exc}") from exc
