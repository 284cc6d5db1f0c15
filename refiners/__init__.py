"""Refiner: inference-time refinement of causal-LM outputs over their token embeddings.

Usable without the server::

    from refiners import Refiner, RefineConfig, RefineRequest, load_model
    refiner = Refiner(load_model())
    [result] = refiner.refine([RefineRequest(prompt_ids, output_ids, RefineConfig(keywords=("dog",)))])
"""

from refiners.config import DEFAULT_WEIGHTS, METHODS, RefineConfig
from refiners.edits import Edit, apply_edits
from refiners.errors import InvalidRequestError, ModelLoadError, NumericalError, RefinerError
from refiners.keywords import coverage, keyword_present
from refiners.models import EMBEDDED_MODEL, LoadedModel, load_model, prepare_model
from refiners.objective import CandidateBatch, Objective, ObjectiveTerm, RewardTerm
from refiners.refiner import Refiner, RefineRequest
from refiners.result import RefineResult

__all__ = [
    "DEFAULT_WEIGHTS",
    "METHODS",
    "EMBEDDED_MODEL",
    "CandidateBatch",
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
    "RewardTerm",
    "apply_edits",
    "coverage",
    "keyword_present",
    "load_model",
    "prepare_model",
]
