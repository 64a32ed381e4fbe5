"""RDP accounting on privacy curves: value objects, events, and the accountant interface.

State-free maths: a :class:`PrivacyCurve` is what a ledger stores (via ``to_dict``), the
:class:`RdpAccountant` turns budgets into reservations and checks them, and privacy events are
frozen value objects in the style of ``dp_accounting.dp_event`` — composition is data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from fedllm.privacy.rdp import _MIN_ORDER_FOR_CONVERSION as MIN_ORDER_FOR_CONVERSION
from fedllm.privacy.rdp import (
    DEFAULT_ORDERS,
    eps_from_rdp,
    gaussian_rdp,
    laplace_rdp,
    pure_dp_rdp,
    rho_for_epsilon,
    subsampled_gaussian_rdp,
    zcdp_rdp,
)

__all__ = [
    "BudgetExceededError",
    "ComposedEvent",
    "GaussianEvent",
    "LaplaceEvent",
    "OrdersMismatchError",
    "PrivacyCurve",
    "PrivacyEvent",
    "PureDpEvent",
    "RdpAccountant",
    "SelfComposedEvent",
    "SubsampledGaussianEvent",
    "UnsupportedEventError",
    "ZcdpEvent",
    "ZcdpFilter",
    "window_start",
]


class UnsupportedEventError(ValueError):
    """The accountant has no RDP analysis for this event."""


class BudgetExceededError(ValueError):
    """A reservation would take the spent privacy over its limit."""


class OrdersMismatchError(ValueError):
    """Two curves over different Rényi orders were combined or compared."""


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True, slots=True)
class PrivacyCurve:
    """An RDP curve: the mechanism is (α, values[i])-RDP for every α = orders[i].

    Composition is pointwise addition (``+``, ``sum``); ``n * curve`` self-composes n times.
    Values are ≥ 0 and may be ``inf`` (no guarantee at that order); orders are ≥ 1.
    """

    orders: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        orders = tuple(float(a) for a in self.orders)
        values = tuple(float(v) for v in self.values)
        if not orders:
            raise ValueError("a privacy curve needs at least one order")
        if len(orders) != len(values):
            raise ValueError(f"orders ({len(orders)}) and values ({len(values)}) differ in length")
        if any(not (a >= 1 and math.isfinite(a)) for a in orders):
            raise ValueError("orders must be finite and >= 1")
        if any(not v >= 0 for v in values):  # also rejects NaN
            raise ValueError("RDP values must be >= 0 (and not NaN)")
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "values", values)

    @classmethod
    def zero(cls, orders: Sequence[float] = DEFAULT_ORDERS) -> PrivacyCurve:
        """Nothing spent."""
        return cls(tuple(orders), (0.0,) * len(orders))

    @classmethod
    def from_rho(cls, rho: float, orders: Sequence[float] = DEFAULT_ORDERS) -> PrivacyCurve:
        """ρ-zCDP: values ρ·α."""
        return cls(tuple(orders), tuple(zcdp_rdp(orders=orders, rho=rho)))

    @classmethod
    def from_array(
        cls, *, orders: Sequence[float], values: Sequence[float] | np.ndarray
    ) -> PrivacyCurve:
        """From any RDP array aligned with ``orders`` (e.g. a mechanism's ``.rdp(orders)``)."""
        return cls(tuple(orders), tuple(float(v) for v in values))

    def _check_orders(self, other: PrivacyCurve) -> None:
        if self.orders != other.orders:
            raise OrdersMismatchError("privacy curves are over different Rényi orders")

    def __add__(self, other: object) -> PrivacyCurve:
        if not isinstance(other, PrivacyCurve):
            return NotImplemented
        self._check_orders(other)
        return PrivacyCurve(
            self.orders, tuple(a + b for a, b in zip(self.values, other.values, strict=True))
        )

    def __radd__(self, other: object) -> PrivacyCurve:
        if other == 0:  # lets sum(curves) work
            return self
        return NotImplemented

    def __mul__(self, count: object) -> PrivacyCurve:
        if isinstance(count, bool) or not isinstance(count, int):
            return NotImplemented
        if count < 0:
            raise ValueError("a curve can only be self-composed a non-negative number of times")
        if count == 0:
            return PrivacyCurve.zero(self.orders)
        return PrivacyCurve(self.orders, tuple(count * v for v in self.values))

    __rmul__ = __mul__

    def as_array(self) -> np.ndarray:
        return np.array(self.values, dtype=np.float64)

    def epsilon(self, *, delta: float) -> float:
        """ε at δ by the improved conversion (:func:`fedllm.privacy.rdp.eps_from_rdp`)."""
        return eps_from_rdp(orders=self.orders, rdp=self.values, delta=delta)[0]

    def epsilon_and_order(self, *, delta: float) -> tuple[float, float]:
        return eps_from_rdp(orders=self.orders, rdp=self.values, delta=delta)

    def dominates(self, other: PrivacyCurve) -> bool:
        """True if this curve is ≥ ``other`` at every order (so it is a valid bound for anything
        ``other`` bounds, e.g. a reservation covering an actual spend). Raises
        :class:`OrdersMismatchError` if the orders differ."""
        self._check_orders(other)
        return all(a >= b for a, b in zip(self.values, other.values, strict=True))

    def rho_upper(self) -> float:
        """max_α values/α: the smallest ρ with ρ·α ≥ this curve at every order."""
        return max(v / a for a, v in zip(self.orders, self.values, strict=True))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form for the ledger; ``from_dict`` reverses it exactly."""
        return {"orders": list(self.orders), "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyCurve:
        """Inverse of ``to_dict``. Raises ``ValueError`` on a missing key, a non-list, a length
        mismatch or an invalid value; unknown extra keys are ignored (forward compatibility)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a mapping, got {type(d).__name__}")
        missing = {"orders", "values"} - set(d)
        if missing:
            raise ValueError(f"privacy curve dict is missing keys: {sorted(missing)}")
        orders, values = d["orders"], d["values"]
        for name, seq in (("orders", orders), ("values", values)):
            if isinstance(seq, str | bytes) or not isinstance(seq, Sequence):
                raise ValueError(f"{name} must be a list of numbers")
            if any(isinstance(x, bool) or not isinstance(x, int | float) for x in seq):
                raise ValueError(f"{name} must contain only numbers")
        return cls(tuple(orders), tuple(values))


# --------------------------------------------------------------------------- events


class PrivacyEvent:
    """Base of the privacy events :meth:`RdpAccountant.curve_for` understands."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class GaussianEvent(PrivacyEvent):
    """Gaussian (or discrete Gaussian, integer Δ) noise, σ/Δ = ``noise_multiplier``:
    RDP α/(2·noise_multiplier²)."""

    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class LaplaceEvent(PrivacyEvent):
    """Laplace noise of scale b on an L1-sensitivity-Δ query, ``noise_multiplier`` = b/Δ
    (dp-accounting's ``LaplaceDpEvent`` parameter): ε = 1/noise_multiplier, RDP by Mironov
    2017 Prop. 6."""

    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class PureDpEvent(PrivacyEvent):
    """Any ε-DP mechanism (exponential mechanism, sparse vector): RDP min(ε, α·ε²/2)."""

    epsilon: float


@dataclass(frozen=True, slots=True)
class ZcdpEvent(PrivacyEvent):
    """Any ρ-zCDP mechanism: RDP ρ·α."""

    rho: float


@dataclass(frozen=True, slots=True)
class SubsampledGaussianEvent(PrivacyEvent):
    """Poisson subsampling at rate q, then the Gaussian with σ/Δ = ``noise_multiplier``
    (add/remove-one neighbours; Mironov–Talwar–Zhang 2019)."""

    sampling_probability: float
    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class ComposedEvent(PrivacyEvent):
    """Sequential composition of ``events``: RDP curves add."""

    events: tuple[PrivacyEvent, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))


@dataclass(frozen=True, slots=True)
class SelfComposedEvent(PrivacyEvent):
    """``event`` repeated ``count`` times: RDP curve × count."""

    event: PrivacyEvent
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count must be a non-negative int; got {self.count!r}")


# --------------------------------------------------------------------------- accountant


@functools.lru_cache(maxsize=4096)
def _cached_rho(epsilon: float, delta: float, orders: tuple[float, ...]) -> float:
    return rho_for_epsilon(epsilon=epsilon, delta=delta, orders=orders)


class RdpAccountant:
    """RDP accountant over a fixed set of orders. Holds no spend: it maps budgets and events
    to :class:`PrivacyCurve` values and checks curves against limits; callers keep the state
    (a ledger of curves). Every query reserves a zCDP curve ρ·α (see :meth:`query_curve`)."""

    __slots__ = ("_orders",)

    def __init__(self, *, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        curve = PrivacyCurve.zero(orders)  # validates
        self._orders: tuple[float, ...] = curve.orders

    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    def zero(self) -> PrivacyCurve:
        return PrivacyCurve.zero(self._orders)

    def _own(self, curve: PrivacyCurve) -> PrivacyCurve:
        if curve.orders != self._orders:
            raise OrdersMismatchError("curve is over different orders than this accountant")
        return curve

    def query_curve(self, *, epsilon: float, delta: float) -> PrivacyCurve:
        """The reservation for one query with budget (ε, δ): the curve ρ·α with ρ the largest
        such that it converts to ≤ ε at δ (:func:`fedllm.privacy.rdp.rho_for_epsilon`).
        Nodes run zCDP/Gaussian-type mechanisms, so a spend ρ'·α with ρ' ≤ ρ fits inside it.
        A zero budget reserves nothing (the zero curve), although a tiny ρ > 0 would still
        convert to ε = 0 through δ."""
        return PrivacyCurve.from_rho(self.query_rho(epsilon=epsilon, delta=delta), self._orders)

    def query_rho(self, *, epsilon: float, delta: float) -> float:
        """The ρ of :meth:`query_curve` (what a node may spend for the query)."""
        if epsilon == 0:
            rho_for_epsilon(epsilon=0.0, delta=delta, orders=self._orders)  # validates δ
            return 0.0
        return _cached_rho(float(epsilon), float(delta), self._orders)

    def compose(self, *curves: PrivacyCurve) -> PrivacyCurve:
        total = self.zero()
        for c in curves:
            total = total + self._own(c)
        return total

    def epsilon(self, curve: PrivacyCurve, *, delta: float) -> float:
        return self._own(curve).epsilon(delta=delta)

    def would_exceed(
        self, *, spent: PrivacyCurve, extra: PrivacyCurve, limit_epsilon: float, delta: float
    ) -> bool:
        """True if spent + extra converts to more than ``limit_epsilon`` at δ."""
        return self.compose(spent, extra).epsilon(delta=delta) > limit_epsilon

    def check(
        self, *, spent: PrivacyCurve, extra: PrivacyCurve, limit_epsilon: float, delta: float
    ) -> PrivacyCurve:
        """spent + extra, or :class:`BudgetExceededError` if that exceeds the limit."""
        total = self.compose(spent, extra)
        eps = total.epsilon(delta=delta)
        if eps > limit_epsilon:
            raise BudgetExceededError(f"epsilon {eps:.6g} would exceed limit {limit_epsilon:.6g}")
        return total

    def remaining(self, *, spent: PrivacyCurve, limit_epsilon: float, delta: float) -> float:
        """Largest ε' ∈ [0, limit] (to ~1e-12 relative) such that
        ``not would_exceed(spent=spent, extra=query_curve(ε'), ...)``; 0.0 if none."""
        self._own(spent)
        orders, spent_values = np.array(self._orders), spent.as_array()

        def fits(eps: float) -> bool:  # == not would_exceed(spent, query_curve(eps)), vectorised
            rdp = spent_values + self.query_rho(epsilon=eps, delta=delta) * orders
            return eps_from_rdp(orders=orders, rdp=rdp, delta=delta)[0] <= limit_epsilon

        if not (limit_epsilon > 0 and math.isfinite(limit_epsilon)) or not fits(0.0):
            return 0.0
        lo, hi = 0.0, float(limit_epsilon)
        if fits(hi):
            return hi
        for _ in range(100):
            mid = (lo + hi) / 2
            if not lo < mid < hi or hi - lo <= 1e-12 * hi:
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    # -- events

    def supports(self, event: object) -> bool:
        """Whether :meth:`curve_for` has an analysis for ``event`` (checked before any maths)."""
        if isinstance(event, ComposedEvent):
            return all(self.supports(e) for e in event.events)
        if isinstance(event, SelfComposedEvent):
            return self.supports(event.event)
        return isinstance(
            event, GaussianEvent | LaplaceEvent | PureDpEvent | ZcdpEvent | SubsampledGaussianEvent
        )

    def curve_for(self, event: object) -> PrivacyCurve:
        """The RDP curve of ``event``; :class:`UnsupportedEventError` for anything unknown."""
        if not self.supports(event):
            raise UnsupportedEventError(f"no RDP analysis for {event!r}")
        return PrivacyCurve.from_array(orders=self._orders, values=self._rdp(event))

    def _rdp(self, event: object) -> np.ndarray:
        o = self._orders
        if isinstance(event, GaussianEvent):
            return gaussian_rdp(orders=o, noise_multiplier=event.noise_multiplier)
        if isinstance(event, LaplaceEvent):
            return laplace_rdp(orders=o, scale=event.noise_multiplier)
        if isinstance(event, PureDpEvent):
            return pure_dp_rdp(orders=o, epsilon=event.epsilon)
        if isinstance(event, ZcdpEvent):
            return zcdp_rdp(orders=o, rho=event.rho)
        if isinstance(event, SubsampledGaussianEvent):
            return subsampled_gaussian_rdp(
                orders=o, q=event.sampling_probability, noise_multiplier=event.noise_multiplier
            )
        if isinstance(event, ComposedEvent):
            return sum((self._rdp(e) for e in event.events), np.zeros(len(o)))
        if isinstance(event, SelfComposedEvent):
            inner = self._rdp(event.event)
            return np.zeros_like(inner) if event.count == 0 else event.count * inner
        raise UnsupportedEventError(f"no RDP analysis for {event!r}")  # pragma: no cover


#: ρ is stored and summed as an integer number of these units (femto-ρ): exact, no float drift.
RHO_UNITS_PER_RHO = 10**15
_MAX_UNITS = 2**63 - 1  # a BIGINT column


@functools.lru_cache(maxsize=16)
def _conversion_terms(
    delta: float, orders: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The order-only terms of :func:`eps_from_rdp` at δ: (α, log1p(−1/α), log(δα)/(α−1),
    usable order mask), computed once per (δ, grid)."""
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return a, np.log1p(-1.0 / a), np.log(delta * a) / (a - 1.0), a > MIN_ORDER_FOR_CONVERSION


@functools.lru_cache(maxsize=4096)
def _eps_of_rho(rho: float, delta: float, orders: tuple[float, ...]) -> float:
    """``eps_from_rdp`` of the curve ρ·α (ρ ≥ 0, 0 < δ < 1), with its order-only terms taken
    from :func:`_conversion_terms`: the same floating-point operations in the same order, so
    the same ε bit for bit (tested), at a fraction of the cost (a budget decision makes four)."""
    a, log1p_term, delta_term, usable = _conversion_terms(delta, orders)
    r = rho * a
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kl = delta**2 + np.expm1(-r) > 0
        improved = r + log1p_term - delta_term
    eps = np.where(kl, 0.0, np.where(usable, improved, np.inf))
    return max(0.0, float(eps[int(np.argmin(eps))]))


@dataclass(frozen=True, slots=True)
class ZcdpFilter:
    """Admission by a zCDP privacy filter over integer ρ units (proof: privacy_accounting.md).

    Every release is charged a ρ: a zCDP/Gaussian-type curve ρ·α exactly, any other curve by the
    tightest ρ that dominates it on the order grid (:meth:`PrivacyCurve.rho_upper`). An account
    with limit ε at δ admits a new charge iff Σρ_i + ρ_new ≤ ρ(limit), where ρ(limit) is the
    largest ρ whose curve ρ·α converts to ≤ ε at δ (:func:`rho_for_epsilon`). Charges round up
    and limits round down to whole units (1e-15 ρ), so integer sums are exact and conservative.
    """

    delta: float
    orders: tuple[float, ...] = field(default=DEFAULT_ORDERS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "orders", PrivacyCurve.zero(self.orders).orders)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1); got {self.delta}")

    @staticmethod
    def units_up(rho: float) -> int:
        """ρ as whole units, rounded up (a charge never shrinks)."""
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be finite and >= 0; got {rho}")
        units = math.ceil(Fraction(rho) * RHO_UNITS_PER_RHO)
        if units > _MAX_UNITS:
            raise ValueError(f"rho {rho} is too large to account")
        return units

    @staticmethod
    def units_down(rho: float) -> int:
        """ρ as whole units, rounded down (a limit never grows)."""
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be finite and >= 0; got {rho}")
        return min(math.floor(Fraction(rho) * RHO_UNITS_PER_RHO), _MAX_UNITS)

    @staticmethod
    def rho(units: int) -> float:
        return units / RHO_UNITS_PER_RHO

    def limit_units(self, limit_epsilon: float) -> int:
        """ρ(limit) in units: the largest ρ·α curve that converts to ≤ ``limit_epsilon``."""
        if limit_epsilon <= 0:
            return 0
        return self.units_down(_cached_rho(float(limit_epsilon), self.delta, self.orders))

    def query_units(self, epsilon: float) -> int:
        """The reservation of a query with budget ε: ρ(ε) in units, rounded up. A query at
        ε = 0 reserves nothing."""
        if epsilon <= 0:
            return 0
        return self.units_up(_cached_rho(float(epsilon), self.delta, self.orders))

    def charge_units(self, curve: PrivacyCurve) -> int:
        """The ρ charged for a realised curve: the tightest ρ with ρ·α ≥ curve on the grid."""
        if curve.orders != self.orders:
            raise OrdersMismatchError("curve is over different orders than this filter")
        return self.units_up(curve.rho_upper())

    def admits(self, *, charged: int, extra: int, limit_epsilon: float) -> bool:
        """The filter's rule: Σρ_i + ρ_new ≤ ρ(limit), in exact integers."""
        return charged + extra <= self.limit_units(limit_epsilon)

    def epsilon(self, units: int) -> float:
        """ε at δ of the composed charges Σρ_i (curve Σρ_i·α)."""
        return _eps_of_rho(self.rho(units), self.delta, self.orders) if units > 0 else 0.0

    def remaining_epsilon(self, *, charged: int, limit_epsilon: float) -> float:
        """The largest ε' a query may still ask for, to ~1e-10 relative: closed form
        ε(ρ(limit) − Σρ_i), taken a hair (1e-10 relative + 2 units) below the free ρ so that
        the query's own rounded-up reservation still fits. O(1): one conversion."""
        free = self.limit_units(limit_epsilon) - charged
        safe = free - 2 - free // 10**10
        if safe <= 0:
            return 0.0
        return min(self.epsilon(safe), float(limit_epsilon))


def window_start(*, now_s: float, window_seconds: int) -> int:
    """Start (epoch seconds, aligned to the Unix epoch, i.e. UTC midnight for 86400) of the
    budget window containing ``now_s``. Daily refresh: ``window_seconds=86400``."""
    if isinstance(window_seconds, bool) or not isinstance(window_seconds, int):
        raise TypeError("window_seconds must be an int")
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be > 0; got {window_seconds}")
    if not math.isfinite(now_s):
        raise ValueError(f"now_s must be finite; got {now_s}")
    return (math.floor(now_s) // window_seconds) * window_seconds
