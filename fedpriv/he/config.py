"""``secure=ckks``: the CKKS parameters, validated once (TenSEAL is an optional extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedpriv.checks import check_choice, check_int, check_real, check_text, fail

TENSEAL_MISSING = "secure=ckks needs TenSEAL: pip install -e '.[he]'"
POLY_MODULUS_DEGREES = (4096, 8192, 16384, 32768)
PROBE = (1.0, -1.0, 1000.0, 1e-3)
"""Values that must survive encryption and decryption for a parameter set to be accepted."""


def import_tenseal() -> Any:
    """TenSEAL, or a ``ValueError`` with the one line that says how to install it."""
    try:
        import tenseal
    except ImportError as exc:
        raise ValueError(TENSEAL_MISSING) from exc
    return tenseal


@dataclass(frozen=True)
class CKKS:
    """``secure=ckks``: clients encrypt their weighted models; the server adds ciphertexts.

    The clients share one CKKS secret key; the server holds only the public
    context, keeps the global model encrypted and never sees an update or a
    model in the clear (:mod:`strategies.he_server`).

    Parameters
    ----------
    poly_modulus_degree : int
        Ring dimension: one ciphertext holds half as many values.
    coeff_mod_bit_sizes : list of int
        Bit sizes of the coefficient modulus primes (TenSEAL's).
    global_scale : float
        The CKKS scale: values are encoded times this (a power of 2).
    key_dir : str
        Folder of ``public-context.tenseal`` (the server's) and
        ``secret-context.tenseal`` (the clients'); empty: ``he-keys`` in the
        run's output folder, made by ``scripts/run.py``. A SuperNode's node
        config ``he-key-dir`` overrides it for that node's clients.
    eval_fraction : float
        Share of each client's partition held out for federated evaluation
        (the server cannot evaluate a model it cannot read).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: list[int] = field(default_factory=lambda: [60, 40, 40, 60])
    global_scale: float = 2.0**40
    key_dir: str = ""
    eval_fraction: float = 0.2

    name = "ckks"
    enabled = True

    def __post_init__(self) -> None:
        """Check every value, then that TenSEAL accepts the set and a probe vector survives it."""
        check_choice("secure.poly_modulus_degree", self.poly_modulus_degree, POLY_MODULUS_DEGREES)
        sizes = self.coeff_mod_bit_sizes
        if isinstance(sizes, str) or not isinstance(sizes, Sequence) or not sizes:
            raise fail("secure.coeff_mod_bit_sizes", sizes, "must be a non-empty list of bit sizes")
        for size in sizes:
            check_int("secure.coeff_mod_bit_sizes", size, minimum=1, maximum=60)
        # Hydra hands over a ListConfig: keep a plain list.
        object.__setattr__(self, "coeff_mod_bit_sizes", [int(size) for size in sizes])
        scale = check_real("secure.global_scale", self.global_scale, above=1.0, maximum=2.0**60)
        if not math.log2(scale).is_integer():
            raise fail("secure.global_scale", self.global_scale, "must be a power of 2")
        check_text("secure.key_dir", self.key_dir)
        check_real("secure.eval_fraction", self.eval_fraction, above=0.0, maximum=0.5)
        self.make_context()

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    def make_context(self) -> Any:
        """A fresh private TenSEAL context with these parameters (it holds a new secret key).

        Raises
        ------
        ValueError
            When TenSEAL is missing, refuses the parameters, or a probe vector
            does not come back from encryption within 1e-3.
        """
        ts = import_tenseal()
        try:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
            )
            context.global_scale = self.global_scale
            decrypted = ts.ckks_vector(context, list(PROBE)).decrypt()
        except (ValueError, RuntimeError) as exc:
            raise fail(
                "secure.coeff_mod_bit_sizes",
                list(self.coeff_mod_bit_sizes),
                f"TenSEAL refuses it with poly_modulus_degree={self.poly_modulus_degree}: {exc}",
            ) from exc
        if any(not abs(a - b) < 1e-3 for a, b in zip(decrypted, PROBE, strict=True)):
            raise fail(
                "secure.global_scale",
                self.global_scale,
                f"values do not survive encryption with coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes)} "
                "(a small scale loses precision; the scale must also fit inside the middle primes)",
            )
        return context
