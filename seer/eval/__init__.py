"""Evaluation of frozen features: weighted kNN (DINO's k = 20, T = 0.07, cosine) and a linear probe, on the
built-in digits or an image folder with one subfolder per class; features of any images (``seer features``);
the class token's attention maps (``seer attention-maps``)."""
from .attention import attention_maps
from .datasets import LabelledSplit, load_labelled
from .evaluate import Evaluator
from .extract import ImageFeatures, extract_image_features, image_paths, token_features
from .features import extract_features
from .knn import knn_predict, knn_top1
from .linear import fit_logistic, linear_probe
from .save_features import save_image_features

__all__ = ["Evaluator", "ImageFeatures", "LabelledSplit", "attention_maps", "extract_features",
           "extract_image_features", "fit_logistic", "image_paths", "knn_predict", "knn_top1", "linear_probe",
           "load_labelled", "save_image_features", "token_features"]
