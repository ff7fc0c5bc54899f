"""The method as a plug-in, usable in any training loop with no trainer and no framework::

    weighter = PseudoLabelWeighter(num_classes=21, feature_dim=256, k=5)
    weighter.update_labelled(features_l, labels_l, qualify_mask)      # labelled pixels
    weighter.update_unlabelled(features_u, pseudo_labels, reliable)   # reliable unlabelled pixels
    w = weighter.weights(features_u, pseudo_labels)                   # (B, H, W) in [offset, offset + 1]
    loss_u = weighted_cross_entropy(logits_s, pseudo_labels, w, mask)
"""

from .bank import PrototypeBank
from .controls import confidence_weights, shuffle_within_classes
from .loss import weighted_cross_entropy
from .reliable import box_mask_from_detections, confident_pixels, detector_reliable, labelled_qualify_mask
from .similarity import topk_index_similarity, topk_indices, topk_mask
from .weighter import PseudoLabelWeighter

__all__ = [
    "PrototypeBank",
    "PseudoLabelWeighter",
    "box_mask_from_detections",
    "confidence_weights",
    "confident_pixels",
    "detector_reliable",
    "labelled_qualify_mask",
    "shuffle_within_classes",
    "topk_index_similarity",
    "topk_indices",
    "topk_mask",
    "weighted_cross_entropy",
]
