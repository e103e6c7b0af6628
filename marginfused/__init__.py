"""marginfused: margin softmax losses (CosFace, ArcFace, SphereFace, ExpFace, combined, and the
adaptive AdaFace, MagFace, CurricularFace, ElasticFace) over very many classes, fused so the
batch × classes logits never exist in memory.

    import marginfused as mf
    loss = mf.margin_cross_entropy(embeddings, centres, labels, margin="arcface")
    head = mf.MarginSoftmaxLoss(512, 1_000_000, margin=mf.ArcFace(m=0.5), scale=64.0)
"""

from .adaptive import AdaFace, AdaptiveMargin, CurricularFace, ElasticFace, MagFace
from .backends import BackendUnavailableError, available_backends, explain_backend
from .functional import margin_cross_entropy
from .margins import ArcFace, CombinedMargin, CosFace, ExpFace, Margin, SphereFace
from .modules import MarginSoftmaxLoss
from .subcenters import SubcenterCleaning, subcenter_outliers

__version__ = "0.1.0"

__all__ = [
    "AdaFace",
    "AdaptiveMargin",
    "ArcFace",
    "BackendUnavailableError",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "ExpFace",
    "MagFace",
    "Margin",
    "MarginSoftmaxLoss",
    "SphereFace",
    "SubcenterCleaning",
    "available_backends",
    "explain_backend",
    "margin_cross_entropy",
    "subcenter_outliers",
]
