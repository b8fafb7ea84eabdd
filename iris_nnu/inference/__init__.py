"""Reference-conditioned inference: `IrisPredictor` (Python API), `iris_predict` and `iris_evaluate`."""
from .images import Query, find_queries
from .model_folder import IrisModel, load_model_folder, write_model_folder
from .predictor import (
           STRATEGIES,
           CaseResult,
           EncodedReferences,
           IrisPredictor,
           QuerySegmentation,
           select_references,
)
from .references import ReferenceCase, parse_reference

__all__ = ["IrisPredictor", "CaseResult", "QuerySegmentation", "EncodedReferences", "ReferenceCase", "Query", "IrisModel", "STRATEGIES",
           "find_queries", "load_model_folder", "write_model_folder", "parse_reference", "select_references"]
