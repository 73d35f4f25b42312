"""CTAugment, Control Theory Augment (Berthelot et al., ReMixMatch, ICLR 2020; google-research/remixmatch
libml/ctaugment.py and cta/lib/train.py): batched on the training device, every image its own ops and magnitudes.

Each op has one or two parameters, each quantised into bins (17; posterize 8, rescale's filter 6) with a weight
(`rates`, starting at 1). A training view applies `depth` (2) ops drawn uniformly; each parameter's value is drawn as
the reference does: the weights become p = (rate + 1 − decay) / max, zeroed below the threshold (0.80, the flag
`ath` of cta/lib/train.py), a segment between two neighbouring bins is drawn with probability ∝ the sum of its two
ends' p, and the value is uniform inside it, in [0, 1]. The largest weight always passes the threshold, so some
segment can always be drawn. A probe view draws its values uniformly; after the network classifies the probe,
every bin its values fell in moves towards the probe's score 1 − ½·Σ|p − onehot(y)|: rate ← decay · rate +
(1 − decay) · score (decay 0.99), image by image in batch order, op by op.

Differences from the reference: images are float tensors (N, C, H, W) in [0, 1]; translate moves up to 30% of the
size and rescale crops up to 25% of each side (the reference's PIL code moves and crops by fractions of a pixel, a
slip FixMatch's copy fixes); rescale's six PIL filters are bilinear, bicubic or nearest sampling; geometric ops
fill with black, as PIL does."""
from __future__ import annotations

from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from .augment import blend, color_enhance, contrast_enhance, warp
from .randaugment import autocontrast, geometric_matrix

NUM_BINS = 17
# (op, bins of each parameter): the reference's 19 ops and their bins (libml/ctaugment.py, @register(...))
CTA_OPS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("autocontrast", (17,)), ("blur", (17,)), ("brightness", (17,)), ("color", (17,)), ("contrast", (17,)),
    ("cutout", (17,)), ("equalize", (17,)), ("invert", (17,)), ("identity", ()), ("posterize", (8,)),
    ("rescale", (17, 6)), ("rotate", (17,)), ("sharpness", (17,)), ("shear_x", (17,)), ("shear_y", (17,)),
    ("smooth", (17,)), ("solarize", (17,)), ("translate_x", (17,)), ("translate_y", (17,)),
)
OP_NAMES = tuple(name for name, _ in CTA_OPS)
MAX_PARAMS = 2


@dataclass
class CTAChoice:
    """Per image the ops and their parameter values: ops (N, depth) indices into CTA_OPS, values (N, depth, 2) in
    [0, 1] (a parameter an op lacks keeps a value that is ignored)."""

    ops: Tensor
    values: Tensor


# ------------------------------------------------------------------------------------------------ ops
def _enhance_factor(level: Tensor) -> Tensor:
    """PIL ImageEnhance factor of the reference: 0.1 + 1.9 · level, (N,)."""
    return 0.1 + 1.9 * level


def _with_level(x: Tensor, y: Tensor, level: Tensor) -> Tensor:
    """Image.blend(x, y, level) = (1 − level) · x + level · y per sample, clamped to [0, 1]."""
    return blend(y, x, level)


def _filtered(x: Tensor, kernel: list[list[float]]) -> Tensor:
    """x (N, C, H, W) through a normalised 2-D PIL filter kernel, edge pixels replicated."""
    weights = torch.tensor(kernel, dtype=x.dtype, device=x.device)
    weights = (weights / weights.sum()).expand(x.shape[1], 1, *weights.shape)
    pad = weights.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), weights, groups=x.shape[1]).clamp(0, 1)


_BLUR = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]  # ImageFilter.BLUR
_SMOOTH = [[1, 1, 1], [1, 5, 1], [1, 1, 1]]  # ImageFilter.SMOOTH


def _signed(level: Tensor) -> tuple[Tensor, Tensor]:
    """level in [0, 1] -> (|2·level − 1|, its sign ±1): the reference's (2·level − 1) as magnitude and direction."""
    centred = 2 * level - 1
    return centred.abs(), torch.where(centred < 0, -1.0, 1.0)


def _affine(x: Tensor, matrix: Tensor, mode: str = "bilinear") -> Tensor:
    """x (N, C, H, W) sampled through per-sample affine maps (N, 2, 3) in normalised coordinates, black fill."""
    return warp(x, matrix, "zeros", mode=mode).clamp(0, 1)


def _geometric(kind: str, scale: float = 1.0):
    """A geometric op of randaugment.py's `geometric_matrix`, magnitude |2·level − 1| · scale."""
    def op(x: Tensor, level: Tensor, _: Tensor) -> Tensor:
        magnitude, sign = _signed(level)
        return _affine(x, geometric_matrix(kind, magnitude * scale, sign))

    return op


def _cutout_level(x: Tensor, level: Tensor, _: Tensor) -> Tensor:
    """A grey (0.5) square of side ≈ level · 0.499 · size (at least 1 px) at a uniformly random centre."""
    n, _, h, w = x.shape
    side = 1 + torch.floor(level * min(h, w) * 0.499)
    cy, cx = torch.rand(n, device=x.device) * h, torch.rand(n, device=x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    inside = ((ys - cy.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2) & \
             ((xs - cx.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2)
    return x.masked_fill(inside.unsqueeze(1), 0.5)


_RESCALE_MODES = ("bilinear", "bicubic", "bilinear", "bilinear", "bilinear", "nearest")  # PIL ANTIALIAS .. NEAREST


def _rescale(x: Tensor, level: Tensor, method: Tensor) -> Tensor:
    """Crop level · 25% off every side and resize back; the filter one of six (method · 5.99) as the reference."""
    out = x.clone()
    index = (method * 5.99).long()
    matrix = torch.zeros(x.shape[0], 2, 3, device=x.device)
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1 - 2 * 0.25 * level
    for mode in set(_RESCALE_MODES):
        rows = torch.isin(index, torch.tensor([i for i, m in enumerate(_RESCALE_MODES) if m == mode],
                                              device=x.device)).nonzero().flatten()
        if rows.numel():
            out.index_copy_(0, rows, _affine(x.index_select(0, rows), matrix.index_select(0, rows), mode))
    return out


def _solarize(x: Tensor, level: Tensor, _: Tensor) -> Tensor:
    """Invert the pixels at or above int(level · 255.999) / 255 (ImageOps.solarize)."""
    threshold = (torch.floor(level * 255.999) / 255).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 1.0 - x, x)


def _posterize(x: Tensor, level: Tensor, _: Tensor) -> Tensor:
    """Keep 1 + int(level · 7.999) bits (ImageOps.posterize)."""
    return kornia.enhance.posterize(x, 1 + torch.floor(level * 7.999))


OP_FUNCTIONS = {  # name -> f(x (N, C, H, W) in [0, 1], value of parameter 1 (N,), of parameter 2 (N,)) -> same
    "autocontrast": lambda x, v, _: _with_level(x, autocontrast(x, v), v),
    "blur": lambda x, v, _: _with_level(x, _filtered(x, _BLUR), v),
    "brightness": lambda x, v, _: (x * _enhance_factor(v).view(-1, 1, 1, 1)).clamp(0, 1),
    "color": lambda x, v, _: color_enhance(x, _enhance_factor(v)),
    "contrast": lambda x, v, _: contrast_enhance(x, _enhance_factor(v)),
    "cutout": _cutout_level,
    "equalize": lambda x, v, _: _with_level(x, kornia.enhance.equalize(x), v),
    "invert": lambda x, v, _: _with_level(x, 1.0 - x, v),
    "identity": lambda x, v, _: x,
    "posterize": _posterize,
    "rescale": _rescale,
    "rotate": _geometric("rotate", scale=45 / 30),  # (2·level − 1) · 45°; geometric_matrix's unit is 30°
    "sharpness": lambda x, v, _: kornia.enhance.sharpness(x, _enhance_factor(v)).clamp(0, 1),
    "shear_x": _geometric("shear_x"),
    "shear_y": _geometric("shear_y"),
    "smooth": lambda x, v, _: _with_level(x, _filtered(x, _SMOOTH), v),
    "solarize": _solarize,
    "translate_x": _geometric("translate_x"),  # up to 30% of the size
    "translate_y": _geometric("translate_y"),
}
assert tuple(OP_FUNCTIONS) == OP_NAMES


# ------------------------------------------------------------------------------------------------ the policy
class CTAugment(nn.Module):
    """The bin weights of every op's parameters (buffer `rates` (ops, 2, 17); bins an op lacks stay at 1 and are
    never drawn) and the draws, application and update of CTAugment. Defaults: the reference's flags (depth 2,
    threshold 0.80, decay 0.99)."""

    def __init__(self, depth: int = 2, threshold: float = 0.8, decay: float = 0.99) -> None:
        super().__init__()
        self.depth, self.threshold, self.decay = depth, threshold, decay
        counts = torch.zeros(len(CTA_OPS), MAX_PARAMS, dtype=torch.long)
        for i, (_, bins) in enumerate(CTA_OPS):
            counts[i, :len(bins)] = torch.tensor(bins, dtype=torch.long)
        self.register_buffer("bin_counts", counts, persistent=False)
        self.register_buffer("rates", torch.ones(len(CTA_OPS), MAX_PARAMS, NUM_BINS))

    def _valid_bins(self) -> Tensor:
        """bool (ops, 2, 17): the bins each parameter has."""
        return torch.arange(NUM_BINS, device=self.rates.device) < self.bin_counts.unsqueeze(-1)

    def bin_probabilities(self) -> Tensor:
        """The reference's rate_to_p: (rate + 1 − decay) / max over the parameter's bins, zero below the threshold
        and on bins the parameter lacks. -> (ops, 2, 17); a parameter's largest weight is always 1."""
        valid = self._valid_bins()
        p = torch.where(valid, self.rates + (1 - self.decay), torch.zeros_like(self.rates))
        p = p / p.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.where(p < self.threshold, torch.zeros_like(p), p)

    def segment_weights(self) -> Tensor:
        """(ops, 2, 16): weight of the segment between bins j and j + 1, p_j + p_(j+1) (zero past the last bin);
        a parameter an op lacks gets uniform weights (its value is never used)."""
        p = self.bin_probabilities()
        segments = p[..., 1:] + p[..., :-1]
        segments = torch.where(self._valid_bins()[..., 1:], segments, torch.zeros_like(segments))
        return torch.where(segments.sum(-1, keepdim=True) > 0, segments, torch.ones_like(segments))

    def sample(self, n: int) -> CTAChoice:
        """A training policy for n images: `depth` ops drawn uniformly per image, each parameter's segment drawn ∝
        its weight and its value uniform inside: (segment + u) / (bins − 1)."""
        device = self.rates.device
        ops = torch.randint(len(CTA_OPS), (n, self.depth), device=device)
        weights = self.segment_weights()[ops]  # (n, depth, 2, 16)
        segment = torch.multinomial(weights.reshape(-1, NUM_BINS - 1), 1).view(n, self.depth, MAX_PARAMS)
        spans = (self.bin_counts[ops] - 1).clamp_min(1).float()
        values = (segment + torch.rand(n, self.depth, MAX_PARAMS, device=device)) / spans
        return CTAChoice(ops, values.clamp(0, 1))

    def probe(self, n: int) -> CTAChoice:
        """A probe policy for n images: `depth` ops drawn uniformly, every parameter value uniform in [0, 1)."""
        device = self.rates.device
        ops = torch.randint(len(CTA_OPS), (n, self.depth), device=device)
        return CTAChoice(ops, torch.rand(n, self.depth, MAX_PARAMS, device=device))

    @staticmethod
    def apply(x: Tensor, choice: CTAChoice) -> Tensor:
        """x float (N, C, H, W) in [0, 1] through each image's ops in order (choice.ops (N, depth)); each op runs
        once per round on the rows that drew it. -> float (N, C, H, W) in [0, 1]."""
        out = x.clone()
        for d in range(choice.ops.shape[1]):
            for index, name in enumerate(OP_NAMES):
                rows = (choice.ops[:, d] == index).nonzero().flatten()
                if rows.numel() == 0 or name == "identity":
                    continue
                values = choice.values[rows, d]
                result = OP_FUNCTIONS[name](out.index_select(0, rows), values[:, 0], values[:, 1])
                out.index_copy_(0, rows, result.clamp(0, 1))
        return out

    def bins_of(self, choice: CTAChoice) -> tuple[Tensor, Tensor]:
        """The flat indices into `rates` of the bins choice's values fall in, int(value · bins · 0.999), in the
        reference's update order (image, op, parameter), and which of them exist. -> (flat (M,), used (M,))."""
        counts = self.bin_counts[choice.ops]  # (N, depth, 2)
        bins = (choice.values * counts * 0.999).long()
        params = torch.arange(MAX_PARAMS, device=bins.device).expand_as(bins)
        flat = (choice.ops.unsqueeze(-1) * MAX_PARAMS + params) * NUM_BINS + bins
        return flat.flatten(), (counts > 0).flatten()

    @torch.no_grad()
    def update(self, choice: CTAChoice, probs: Tensor, labels: Tensor) -> Tensor:
        """Move the bins of probe `choice` towards each image's score 1 − ½·Σ|probs − onehot(labels)|, as the
        reference's update_rates applied image by image: rate ← decay · rate + (1 − decay) · score (a bin hit m
        times in a batch gets the m updates in order). probs (N, K), labels (N,). -> scores (N,)."""
        scores = 1 - 0.5 * (probs.float() - F.one_hot(labels, probs.shape[1]).float()).abs().sum(dim=1)
        flat, used = self.bins_of(choice)
        per_bin = scores.repeat_interleave(self.depth * MAX_PARAMS)[used].double()
        flat = flat[used]
        hits = F.one_hot(flat, self.rates.numel()).double()  # (M, bins), row t: update t's bin
        later = hits.flip(0).cumsum(0).flip(0) - hits  # updates after t on each bin
        after = (later * hits).sum(dim=1)  # (M,) updates after t on t's own bin
        decay = torch.tensor(self.decay, dtype=torch.float64, device=flat.device)
        added = torch.zeros(self.rates.numel(), dtype=torch.float64, device=flat.device)
        added.index_add_(0, flat, (1 - decay) * decay ** after * per_bin)
        kept = decay ** hits.sum(dim=0)
        rates = self.rates.flatten().double() * kept + added
        self.rates.copy_(rates.view_as(self.rates).to(self.rates.dtype))
        return scores

    @torch.no_grad()
    def update_gathered(self, choice: CTAChoice, probs: Tensor, labels: Tensor) -> Tensor:
        """`update` with every rank's probes (choice, probs (B, K), labels (B,)) gathered in rank order: under
        torchrun all ranks apply the same updates in the same order, so their weights stay identical (one process:
        `update`). -> the scores (world · B,)."""
        gathered = CTAChoice(dist.gather_no_grad(choice.ops), dist.gather_no_grad(choice.values))
        return self.update(gathered, dist.gather_no_grad(probs.float()), dist.gather_no_grad(labels))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, threshold={self.threshold}, decay={self.decay}"

