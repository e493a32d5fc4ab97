"""Encoders prepared for CPU inference, and stage timing.

:func:`optimize_encoder` freezes a model's encoder into a TorchScript graph:
freezing folds batch norm into the convolutions, and ``optimize_for_inference``
moves them onto oneDNN kernels. On a 2-core AMD EPYC (AVX2) with torch 2.14
this made the EfficientNet-Lite0 stage-3 encoder about 1.6-1.9x faster in CPU
time on 512-2048 px inputs (``benchmarks/bench_classify.py`` measures it in the
engine). torch 2.14 marks TorchScript deprecated in favour of
``torch.compile``, which on that machine had not finished compiling the
encoder after 15 minutes, so the TorchScript path stays with a fallback to the
eager encoder.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Largest difference allowed between graph and eager features, relative to
# the largest eager feature. Float reordering in the fused kernels gives about
# 1e-6 of it; a wrong graph gives differences of order one.
GRAPH_TOLERANCE = 1e-3


@contextlib.contextmanager
def stage_timer(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall-clock seconds the block takes to ``seconds[stage]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started


def optimize_encoder(encoder: nn.Module, sample_px: int, channels_last: bool, enabled: bool = True) -> nn.Module:
    """Return a frozen TorchScript graph of ``encoder``, or ``encoder`` itself when that fails or differs.

    Parameters
    ----------
    encoder
        A :class:`nuclass_qupath.model.backbones.FeatureEncoder` in eval mode.
    sample_px
        Side of the square input traced. The graph is then checked against the
        eager encoder on an input of another size, so an input-size dependence
        frozen into the graph (such as "same" padding computed in Python)
        falls back to the eager encoder.
    channels_last
        Trace and check with NHWC inputs, as the engine feeds them.
    enabled
        False returns ``encoder`` unchanged.
    """
    if not enabled:
        return encoder
    stride = int(getattr(encoder, "stride", 16))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    sample = (torch.rand(1, 3, sample_px, sample_px, generator=generator) * 4 - 2).contiguous(memory_format=memory_format)
    check = (torch.rand(2, 3, sample_px + stride, sample_px + 3 * stride, generator=generator) * 4 - 2).contiguous(
        memory_format=memory_format
    )

    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            # torch.jit warns that it is deprecated, and the tracer warns about
            # Python values it records; the check below covers what matters.
            warnings.simplefilter("ignore")
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(encoder, sample, check_trace=False).eval()))
            expected = encoder(check)
            actual = graph(check)
    except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
        logger.warning("TorchScript graph of the %s encoder failed (%s), so it runs eagerly", _name(encoder), exc)
        return encoder

    scale = float(expected.abs().max()) or 1.0
    difference = float((expected - actual).abs().max()) if expected.shape == actual.shape else float("inf")
    if difference > GRAPH_TOLERANCE * scale:
        logger.warning(
            "TorchScript graph of the %s encoder differs from it by %.3g (largest feature %.3g), so it runs eagerly",
            _name(encoder), difference, scale,
        )
        return encoder
    logger.info(
        "froze the %s encoder into a TorchScript graph in %.1f s (largest difference %.2g)",
        _name(encoder), time.perf_counter() - started, difference,
    )
    return graph


def _name(encoder: nn.Module) -> str:
    return str(getattr(encoder, "name", type(encoder).__name__))


# Largest difference in any class probability allowed between bf16 autocast
# and fp32 on the check input. bf16 keeps 8 bits of mantissa, which moved the
# bundled model's probabilities by 0.012 on the check input. More than the
# tolerance means a layer does not tolerate bf16. On real tissue the
# differences are larger (up to 0.29 over the 3896 cells of CMU-1), so passing
# the check does not mean bf16 gives the same classes as fp32.
BF16_TOLERANCE = 0.05


def bf16_difference(model: nn.Module, local_px: int, context_px: int, channels_last: bool) -> float:
    """Return the largest class-probability difference between bf16 autocast and fp32 on a fixed input.

    The input is smooth random noise, two cells per path, ``local_px`` and
    ``context_px`` pixels a side; the same seed gives the same input, so the
    check is reproducible.
    """
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def image(size: int) -> torch.Tensor:
        coarse = torch.rand(2, 3, size // 8 + 1, size // 8 + 1, generator=generator) * 255
        fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        return fine.to(torch.uint8).contiguous(memory_format=memory_format)

    local, context = image(local_px), image(context_px)
    with torch.inference_mode():
        reference = model(local, context).probs.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = model(local, context).probs.float()
    return float((reference - reduced).abs().max())
