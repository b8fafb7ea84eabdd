"""Reference-conditioned inference: `IrisPredictor` (Python API), `iris_predict` and `iris_evaluate`."""
from iris_nnu.io.model_folder import IrisModel, load_model_folder, write_model_folder

from .images import Query, find_queries
from .predictor import CaseResult, EncodedReferences, IrisPredictor, QuerySegmentation
from .references import ReferenceCase, parse_reference
from .segmenter import Segmenter
from .strategies import STRATEGIES, select_references, tune_task

__all__ = ["IrisPredictor", "Segmenter", "tune_task", "CaseResult", "QuerySegmentation", "EncodedReferences",
           "ReferenceCase", "Query", "IrisModel", "STRATEGIES", "find_queries", "load_model_folder",
           "write_model_folder", "parse_reference", "select_references"]
