"""Models: smp decoders x encoders with the geopose heads (factory, heads) and the training losses."""

from geopose_mlops.models.factory import DECODERS, GeoposeModel, build_model

__all__ = ["DECODERS", "GeoposeModel", "build_model"]
