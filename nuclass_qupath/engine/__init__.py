"""The engine: classify the cells of one slide, batch by batch or region by region."""

from nuclass_qupath.engine.classify import EngineOptions, SlideClassifier, classify_slide
from nuclass_qupath.engine.predictions import Predictions

__all__ = ["EngineOptions", "Predictions", "SlideClassifier", "classify_slide"]
