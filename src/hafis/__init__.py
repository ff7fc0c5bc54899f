"""hafis: semi-supervised semantic segmentation with reliable, rank-weighted pseudo-labels.

Implements "Weighting Pseudo-Labels via High-Activation Feature Index Similarity and Object Detection for
Semi-Supervised Segmentation" (Howlader, Le, Samaras, ECCV 2024) as a plug-in (:mod:`hafis.weighting`) and the SSL
frameworks it plugs into (:mod:`hafis.frameworks`) on one shared trainer (:mod:`hafis.engine`).
"""

__version__ = "0.1.0"

__all__ = ["Predictor"]


def __getattr__(name: str):
    """``hafis.Predictor`` (a trained model on new images), imported when first used: ``import hafis`` stays light."""
    if name == "Predictor":
        from hafis.engine.inference import Predictor

        return Predictor
    raise AttributeError(f"module 'hafis' has no attribute {name!r}")
