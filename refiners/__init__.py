"""Refiner: inference-time refinement of causal-LM outputs over their token embeddings.

Usable without the server::

    from refiners import Refiner, RefineConfig, RefineRequest, load_model
    refiner = Refiner(load_model())
    [result] = refiner.refine([RefineRequest(prompt_ids, output_ids, RefineConfig(keywords=("dog",)))])
"""

from refiners.config import RefineConfig
from refiners.edits import Edit, apply_edits
from refiners.errors import InvalidRequestError, ModelLoadError, NumericalError, RefinerError
from refiners.keywords import coverage, keyword_present
from refiners.methods import METHODS, RefinementMethod
from refiners.models import EMBEDDED_MODEL, LoadedModel, load_model, prepare_model
from refiners.objective import (
    DEFAULT_WEIGHTS,
    TERMS,
    CandidateBatch,
    Change,
    Objective,
    ObjectiveTerm,
    RewardTerm,
)
from refiners.refiner import Refiner, RefineRequest
from refiners.result import RefineResult
from refiners.search import SearchConfig

__all__ = [
    "DEFAULT_WEIGHTS",
    "METHODS",
    "EMBEDDED_MODEL",
    "CandidateBatch",
    "Change",
    "Edit",
    "InvalidRequestError",
    "LoadedModel",
    "ModelLoadError",
    "NumericalError",
    "Objective",
    "ObjectiveTerm",
    "RefineConfig",
    "RefineRequest",
    "RefineResult",
    "Refiner",
    "RefinerError",
    "RefinementMethod",
    "RewardTerm",
    "SearchConfig",
    "TERMS",
    "apply_edits",
    "coverage",
    "keyword_present",
    "load_model",
    "prepare_model",
]
