"""DP-SGD gradients by book-keeping: per-example clipping without a second backward pass.

``client.grad_sample_mode=bookkeeping`` (Bu et al. 2023, "Differentially
private optimization on large model at small cost"). One forward pass keeps
each trainable layer's input; one backward pass asks autograd for the
gradients of the layers' outputs only, so no parameter gradient is formed
there. From the two:

* a ``Linear`` layer's per-example gradient ``g_i a_i^T`` has the norm
  ``||g_i|| ||a_i||`` (ghost norm: the gradient itself is never formed), and
  the clipped sum is one matrix product ``(c * g)^T a``;
* a ``Conv2d`` layer's per-example gradients are formed, by one
  weight-gradient convolution with the batch as groups (for fedpriv's
  convolutions that is cheaper than the ghost norm's ``T^2 (d + p)`` per
  example, ``T`` output positions, against ``T d p``), and summed with the
  clip factors;
* a ``GroupNorm`` layer's per-example gradients are ``C`` numbers each, from
  two moments per group.

On the CPU its step costs 1.2 to 1.7 times a plain step on fedpriv's models,
against 1.8 to 29 for Opacus' modes (``scripts/bench.py``, section 3; the
README's GPUs section has the table).

The step then adds Gaussian noise of standard deviation ``noise_multiplier *
max_grad_norm`` to the sum of the clipped gradients and divides by the
expected batch size: Opacus' ``DPOptimizer`` update, in distribution, with
Opacus' clip factor ``min(1, C / norm)`` (:func:`clip_factors`). The accounting is
DP-SGD's, unchanged; the caller records the steps.

Only models whose trainable layers are all of these three kinds, each called
once per forward pass with no parameter shared, are accepted
(:func:`bookkeeping_unsupported` names the others); a layer called twice would
need the norm of a sum of per-example gradients, which this does not compute,
so it is refused when it happens (:class:`BookKeepingDPSGD`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

BOOKKEEPING_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)
"""The trainable layer types whose per-example gradient norms this module computes."""


def clip_factors(norms_squared: torch.Tensor, *, max_grad_norm: float, scale: float = 1.0) -> torch.Tensor:
    """Per-example factors that scale each gradient to norm at most ``max_grad_norm``, times ``scale``.

    Parameters
    ----------
    norms_squared : torch.Tensor
        Squared per-example gradient norms, shape ``(B,)``; left untouched.
    max_grad_norm : float
        The clipping norm ``C``.
    scale : float, default 1.0
        A factor folded in (the step's ``1 / expected_batch_size``).

    Returns
    -------
    torch.Tensor
        ``scale * min(1, C / norm)``: Opacus' factor without the ``1e-6`` it
        adds to the norm, which changes nothing a float32 can show where a
        gradient is clipped; a zero norm gives ``scale`` (``rsqrt(0)`` is
        infinite). Three operations, since each costs microseconds next to a
        small model's step.
    """
    return torch.rsqrt(norms_squared).mul_(max_grad_norm * scale).clamp_(max=scale)


def conv2d_per_example(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients of a ``Conv2d`` layer (groups 1, zero padding).

    One weight-gradient convolution with the batch as ``B`` groups: on this
    project's CNN on a CPU, oneDNN's kernel for it took 0.65 ms per layer at
    batch 64, where unfolding the input and a batched matrix product took 0.8
    and 3.0 ms.

    Parameters
    ----------
    module : nn.Conv2d
        The layer (its kernel size, dilation, padding and stride are read).
    a : torch.Tensor
        Its input, ``(B, C_in, H, W)``.
    g : torch.Tensor
        The loss's gradient with respect to its output, ``(B, C_out, H_out, W_out)``.

    Returns
    -------
    torch.Tensor
        ``(B, C_out, C_in * k_h * k_w)``: each example's gradient of the
        weight, flattened the way ``weight.view(C_out, -1)`` is.
    """
    batch, c_out = g.shape[:2]
    c_in = a.shape[1]
    per_example = torch.nn.grad.conv2d_weight(
        a.reshape(1, batch * c_in, *a.shape[2:]),
        (batch * c_out, c_in, *module.kernel_size),
        g.reshape(1, batch * c_out, *g.shape[2:]),
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=batch,
    )
    return per_example.view(batch, c_out, -1)


def group_norm_per_example(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of a ``GroupNorm`` layer's affine weight and bias.

    The weight's is ``sum(g * (a - mean) * rstd)`` over a channel's
    positions, computed as ``rstd * (sum(g a) - mean sum(g))`` from the
    group's first two moments: no tensor the size of the activations is
    allocated (on a CPU such temporaries cost page faults every step).

    Parameters
    ----------
    module : nn.GroupNorm
        The layer.
    a : torch.Tensor
        Its input, ``(B, C, ...)``.
    g : torch.Tensor
        The loss's gradient with respect to its output, same shape.

    Returns
    -------
    weight, bias : torch.Tensor
        ``(B, C)`` each.
    """
    batch, channels, groups = a.shape[0], a.shape[1], module.num_groups
    by_group = a.reshape(batch, groups, -1)
    count = by_group.shape[2]
    mean = by_group.sum(2).div_(count)
    variance = torch.linalg.vecdot(by_group, by_group).div_(count).sub_(mean.square()).clamp_(min=0.0)
    rstd = variance.add_(module.eps).rsqrt_()
    per_group = channels // groups
    g_flat, a_flat = g.reshape(batch, channels, -1), a.reshape(batch, channels, -1)
    bias = g_flat.sum(2)
    weight = torch.linalg.vecdot(g_flat, a_flat).sub_(mean.repeat_interleave(per_group, 1) * bias)
    return weight.mul_(rstd.repeat_interleave(per_group, 1)), bias


def bookkeeping_unsupported(model: nn.Module) -> list[str]:
    """The layers of ``model`` that keep it from training with book-keeping.

    Parameters
    ----------
    model : nn.Module
        The model to train.

    Returns
    -------
    list of str
        ``name (Type): why`` for every module with trainable parameters of its
        own that is not a ``Linear``, a ``Conv2d`` with one group and zero
        padding given as numbers, or a ``GroupNorm``, for every parameter
        shared by two modules and for every BatchNorm. Empty when the model
        is supported.
    """
    problems, owners = [], {}
    for name, module in model.named_modules():
        label = f"{name or 'model'} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Trainable or not, it mixes the examples of a batch: no per-example gradient exists.
            problems.append(f"{label}: BatchNorm mixes the examples of a batch")
            continue
        own = [param for param in module.parameters(recurse=False) if param.requires_grad]
        if not own:
            continue
        for param in own:
            if id(param) in owners:
                problems.append(f"{label}: shares a parameter with {owners[id(param)]}")
            owners[id(param)] = label
        if not isinstance(module, BOOKKEEPING_LAYERS):
            problems.append(f"{label}: not a Linear, Conv2d or GroupNorm layer")
        elif isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            problems.append(f"{label}: only groups=1 and numeric zero padding are supported")
    return problems


class BookKeepingDPSGD:
    """Noisy, clipped, averaged DP-SGD gradients of a model, by book-keeping.

    Hooks on the model's trainable layers keep their inputs and outputs while
    :meth:`gradients` runs its forward pass; :meth:`close` removes them. The
    gradients live in one buffer, reused every step (parameters' ``.grad``
    are views of it), where the noise is drawn in one call.

    Parameters
    ----------
    model : nn.Module
        The model; :func:`bookkeeping_unsupported` must find nothing.
    max_grad_norm : float
        Per-example clipping norm ``C``, ``> 0``.
    noise_multiplier : float
        Noise standard deviation over ``C``, ``>= 0``.
    expected_batch_size : float
        The divisor of the noisy sum (the public expected batch size), ``> 0``.
    generator : torch.Generator
        Source of the noise, on the model's device.

    Raises
    ------
    ValueError
        If the model has layers this cannot train, naming them, or a setting
        is out of range, naming it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        generator: torch.Generator,
    ) -> None:
        problems = bookkeeping_unsupported(model)
        if problems:
            raise ValueError(f"grad_sample_mode=bookkeeping cannot train this model: {'; '.join(problems)}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be > 0")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier={noise_multiplier!r}: must be >= 0")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size={expected_batch_size!r}: must be > 0")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.noise_std = float(noise_multiplier) * self.max_grad_norm / self.expected_batch_size
        self.generator = generator
        self.params = [param for param in model.parameters() if param.requires_grad]
        if not self.params:
            raise ValueError("grad_sample_mode=bookkeeping: the model has no trainable parameters")
        first = self.params[0]
        self._buffer = torch.empty(sum(p.numel() for p in self.params), device=first.device, dtype=first.dtype)
        pieces = self._buffer.split([p.numel() for p in self.params])
        self._grads = [piece.view(p.shape) for piece, p in zip(pieces, self.params, strict=True)]
        grad_of = {id(p): grad for p, grad in zip(self.params, self._grads, strict=True)}
        # Per hooked layer, the function that adds its squared per-example
        # norms and its terms of the clipped sum (bound once, not looked up per step).
        self._layers: dict[nn.Module, Callable] = {}
        for module in model.modules():
            if not isinstance(module, BOOKKEEPING_LAYERS):
                continue
            weight, bias = (
                grad_of.get(id(param)) if isinstance(param, torch.Tensor) else None
                for param in (module.weight, module.bias)
            )
            if weight is not None or bias is not None:
                self._layers[module] = _layer_terms(module, weight=weight, bias=bias)
        self._one = torch.ones((), device=first.device, dtype=first.dtype)
        self._calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = [module.register_forward_hook(self._keep) for module in self._layers]

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self._calls.append((module, inputs[0], output))

    def close(self) -> None:
        """Remove the hooks; the model is then as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set every trainable parameter's ``.grad`` to the DP-SGD gradient of the batch ``(x, y)``.

        That is ``(sum_i clip(grad_i) + N(0, (z C)^2)) / expected_batch_size``
        of the cross-entropy loss, each example's gradient scaled by
        :func:`clip_factors`. An empty batch gives the noise alone.

        Raises
        ------
        ValueError
            If a layer ran more than once in the forward pass, or a ``Linear``
            layer got an input that is not one vector per example.
        """
        if self.noise_std:
            self._buffer.normal_(0.0, self.noise_std, generator=self.generator)
        else:
            self._buffer.zero_()
        if len(y):
            self._add_clipped(x, y)
        if self.params[0].grad is not self._grads[0]:
            for param, grad in zip(self.params, self._grads, strict=True):
                param.grad = grad

    def _add_clipped(self, x: torch.Tensor, y: torch.Tensor) -> None:
        layers = self._calls = []
        try:
            loss = F.cross_entropy(self.model(x), y, reduction="sum")
        finally:
            self._calls = []
        _check_calls(layers)
        output_grads = torch.autograd.grad(
            loss, [output for _, _, output in layers], grad_outputs=self._one, allow_unused=True
        )
        with torch.no_grad():
            norms_squared, terms = None, []
            for (module, a, _), g in zip(layers, output_grads, strict=True):
                if g is not None:
                    layer_norms = self._layers[module](a, g, terms)
                    norms_squared = layer_norms if norms_squared is None else norms_squared.add_(layer_norms)
            if norms_squared is None:
                return
            factors = clip_factors(
                norms_squared, max_grad_norm=self.max_grad_norm, scale=1.0 / self.expected_batch_size
            )
            for add in terms:
                add(factors)


def _check_calls(layers: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> None:
    """Refuse a forward pass that per-example norms by layer would get wrong."""
    if len({id(module) for module, _, _ in layers}) < len(layers):
        twice = next(
            type(module).__name__ for i, (module, _, _) in enumerate(layers) if any(module is m for m, _, _ in layers[:i])
        )
        raise ValueError(
            f"grad_sample_mode=bookkeeping: layer {twice} ran more than once in one forward pass; "
            "its per-example gradient norms would be wrong. Use grad_sample_mode=hooks"
        )


def _layer_terms(module: nn.Module, *, weight: torch.Tensor | None, bias: torch.Tensor | None) -> Callable:
    """The per-step function of one layer whose weight and bias gradients are the views ``weight`` and ``bias``.

    Called with the layer's input ``a``, the gradient ``g`` of the loss with
    respect to its output and a list, it returns the layer's squared
    per-example gradient norms ``(B,)`` and appends to the list the
    functions that add its clipped sum, given the clip factors, to the views.
    """
    if isinstance(module, nn.Linear):

        def linear(a: torch.Tensor, g: torch.Tensor, terms: list) -> torch.Tensor:
            if a.dim() != 2:
                raise ValueError(
                    f"grad_sample_mode=bookkeeping: a Linear layer got input of shape {tuple(a.shape)}; "
                    "only (batch, features) is supported. Use grad_sample_mode=hooks"
                )
            g_squared, g_t = torch.linalg.vecdot(g, g), g.t()
            if weight is not None:
                terms.append(lambda factors: weight.addmm_(g_t * factors, a))
            if bias is not None:
                terms.append(lambda factors: bias.addmv_(g_t, factors))
            if weight is None:
                return g_squared
            if bias is None:
                return g_squared * torch.linalg.vecdot(a, a)
            return torch.addcmul(g_squared, g_squared, torch.linalg.vecdot(a, a))

        return linear

    def per_example(a: torch.Tensor, g: torch.Tensor, terms: list) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            values = (
                conv2d_per_example(module, a, g) if weight is not None else None,
                g.flatten(2).sum(2) if bias is not None else None,
            )
        else:
            values = group_norm_per_example(module, a, g)
        norms = None
        for grad, per in zip((weight, bias), values, strict=True):
            if grad is not None:
                per_t = per.flatten(1).t()
                squared = torch.linalg.vecdot(per_t, per_t, dim=0)
                norms = squared if norms is None else norms.add_(squared)
                terms.append(lambda factors, flat=grad.view(-1), per_t=per_t: flat.addmv_(per_t, factors))
        return norms

    return per_example
