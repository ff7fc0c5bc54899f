"""The plug-in: per-pixel pseudo-label weights from top-k index similarity to class prototypes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .alignment import check_align, resize_features
from .bank import PrototypeBank
from .checks import check_features_labels, check_k
from .similarity import topk_indices, topk_mask


class PseudoLabelWeighter(nn.Module):
    """``W_i = offset + s_i / k``, ``s_i = |topk(f_i) ∩ topk(P_{ŷ_i})|`` (the paper, Eq. for W).

    Args:
        num_classes, feature_dim: ``C`` and ``D``.
        k: number of high-activation channels compared (the paper: 5).
        offset: ``0`` gives the paper's ``W = s/k`` (a pixel sharing nothing with its prototype is dropped);
            ``1`` gives the authors' released code, ``W = 1 + s/k`` (no pixel dropped, similar ones count up to 2x).
        align: features at a lower resolution than the pseudo-labels are brought to the labels' size, never the
            reverse: ``bilinear`` (default, like the authors' code and the logits) or ``nearest`` (each label pixel
            takes the similarity of the feature cell it falls in; cheaper: the top-k runs at the features'
            resolution and only the ``k`` channel-index maps are resized).
        align_corners: of the bilinear resize; follow the segmenter's own (UniMatch's DeepLabV3+ and the authors'
            code: True). The resize runs in float32 whatever the features' dtype.
        require_labelled: a class has a prototype only once its labelled queue holds a feature (the authors' code);
            false (default) = once either queue does.
        memory_per_class, samples_per_class, seed, gather_distributed, validate: passed to :class:`PrototypeBank`.

    A pseudo-label class with no prototype yet, and an ignored pixel, get ``s = 0`` (so ``W = offset``). Weights
    carry no gradient.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        k: int = 5,
        offset: float = 0.0,
        memory_per_class: int = 256,
        samples_per_class: int = 32,
        ignore_index: int = 255,
        align: str = "bilinear",
        seed: int = 0,
        gather_distributed: bool = True,
        validate: bool = True,
        align_corners: bool = True,
        require_labelled: bool = False,
    ) -> None:
        super().__init__()
        check_k(k, feature_dim)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.k = k
        self.offset = float(offset)
        self.ignore_index = ignore_index
        self.align = check_align(align)
        self.align_corners = bool(align_corners)
        self.validate = validate
        self.bank = PrototypeBank(num_classes, feature_dim, memory_per_class, samples_per_class, ignore_index,
                                  seed, align, gather_distributed, validate, align_corners, require_labelled)

    def update_labelled(self, features: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> None:
        """Feed labelled pixels (where ``mask`` holds) to the prototype bank."""
        self.bank.push_labelled(features.detach(), labels, mask)

    def update_unlabelled(self, features: Tensor, pseudo_labels: Tensor, reliable: Tensor) -> None:
        """Feed reliable unlabelled pixels to the prototype bank."""
        self.bank.push_unlabelled(features.detach(), pseudo_labels, reliable)

    @torch.no_grad()
    def similarity(self, features: Tensor, pseudo_labels: Tensor) -> Tensor:
        """``s_i`` as an integer count ``(B, H, W)`` in ``0..k`` at the resolution of ``pseudo_labels``."""
        if self.validate:
            check_features_labels(features, pseudo_labels, self.num_classes, self.ignore_index, "pseudo_labels",
                                  feature_dim=self.feature_dim)
        index = self.channel_index(features, tuple(pseudo_labels.shape[-2:]))
        return self.similarity_from_index(index, pseudo_labels)

    @torch.no_grad()
    def channel_index(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """The top-k channels of every pixel at the labels' ``size``: ``(B, H, W, k)`` long, ties by lower index.

        ``bilinear``: the features are upsampled (channels-last, one image at a time: the upsampled ``(D, H, W)``
        map, the largest tensor of the method, exists for one image only; a batch slice resizes to the bits of the
        whole batch) and ranked at every label pixel. On CPU the upsampled map is written into one buffer kept
        between calls (``D x H x W`` floats, e.g. 105 MB at 321 x 321): a fresh allocation of that size is new
        memory from the OS, and faulting its pages in costs several times the resize itself.
        ``nearest``: ranked at the features' resolution, and the ``k`` index maps are resized.
        Half-precision features (autocast) are widened to float32 first (exactly), so they are resized and ranked
        in float32: a half-precision resize would round nearby channels to ties.
        """
        H, W = size
        if self.align == "bilinear" and tuple(features.shape[-2:]) != (H, W):
            if features.dtype not in (torch.float32, torch.float64):
                features = features.float()
            # channels-last: the resize kernel (and so the bits) depends on the layout, and W must not
            features = features.contiguous(memory_format=torch.channels_last)
            return torch.stack([self._topk_channels(self._upsample(features[i:i + 1], (H, W)))[0]
                                for i in range(features.shape[0])])
        index = self._topk_channels(features)  # (B, h, w, k), in the features' own layout (no copy)
        if tuple(index.shape[1:3]) != (H, W):  # align == "nearest": each label pixel reads its feature cell
            index = F.interpolate(index.permute(0, 3, 1, 2).float(), size=(H, W), mode="nearest")
            index = index.round().long().permute(0, 2, 3, 1)
        return index

    @torch.no_grad()
    def similarity_from_index(self, index: Tensor, pseudo_labels: Tensor) -> Tensor:
        """``s (B, H, W)`` from :meth:`channel_index`'s ``(B, H, W, k)`` and the current prototypes.

        How many of the pixel's top-k channels are among its pseudo-label's prototype's top-k: a gather of ``k``
        entries of a ``(C + 1, D)`` table per pixel (no ``N x D`` mask, no product with every class, no host sync).
        """
        C, D = self.num_classes, self.feature_dim
        protos, has_proto = self.bank.prototypes()
        # row c marks the top-k channels of prototype c (all False without a prototype); the extra row C, all False,
        # is read by ignored pixels and by out-of-range labels, so nothing indexes out of bounds without validation
        table = torch.zeros(C + 1, D, dtype=torch.uint8, device=protos.device)
        table[:C] = topk_mask(protos, self.k, dim=1) & has_proto[:, None]
        labels = pseudo_labels.long()
        cls = torch.where((labels >= 0) & (labels < C), labels, C)
        return table.flatten()[cls[..., None] * D + index].sum(dim=-1, dtype=torch.long)

    def _upsample(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Bilinear resize of one channels-last ``(1, D, h, w)`` image: ``F.interpolate``'s kernel and bits."""
        if image.device.type != "cpu":
            return resize_features(image, size, "bilinear", self.align_corners)
        shape = (1, image.shape[1], *size)
        buffer = getattr(self, "_resize_buffer", None)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != image.dtype:
            buffer = torch.empty(shape, dtype=image.dtype).contiguous(memory_format=torch.channels_last)
            self._resize_buffer = buffer  # a plain attribute: not state, not moved by .to()
        return torch.ops.aten.upsample_bilinear2d.out(image, list(size), self.align_corners, None, None, out=buffer)

    def _topk_channels(self, features: Tensor) -> Tensor:
        """``(B, D, h, w)`` -> ``(B, h, w, k)`` top-k channel indices, ties by the lower index."""
        return topk_indices(features, self.k, dim=1).permute(0, 2, 3, 1)

    @torch.no_grad()
    def weights(self, features: Tensor, pseudo_labels: Tensor) -> Tensor:
        """``(B, H, W)`` float weights ``offset + s / k`` for pseudo-labels ``(B, H, W)`` and features
        ``(B, D, h, w)``."""
        s = self.similarity(features, pseudo_labels)
        dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
        return self.offset + s.to(dtype) / self.k
