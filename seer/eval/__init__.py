"""Evaluation of frozen features: weighted kNN (DINO's k = 20, T = 0.07, cosine) and a linear probe, on the
built-in digits or an image folder with one subfolder per class."""
from .datasets import LabelledSplit, load_labelled
from .evaluate import Evaluator
from .features import extract_features
from .knn import knn_predict, knn_top1
from .linear import fit_logistic, linear_probe

__all__ = ["Evaluator", "LabelledSplit", "extract_features", "fit_logistic", "knn_predict", "knn_top1",
           "linear_probe", "load_labelled"]
