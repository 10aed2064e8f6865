"""The registered ensemble as an MLflow pyfunc, logged as a model from code (``python_model`` as this file).

``promote`` (``registry.py``) passes this file's path to ``mlflow.pyfunc.log_model``: MLflow stores a
copy of it beside the packaged ensemble and runs it when the model is loaded, instead of unpickling an
object (no CloudPickle, nothing of this process's state in the model). The copy imports
``geopose_mlops``, so loading the model needs the package installed, as the model's ``requirements.txt``
says; without it the load fails with a message naming the package.

Input ``{"image": uint8 (B, S, S, 3), "gsd": (B,) m/px, "city": (B,) index into CITIES}``; output
``{"agl": (B, S, S) m, "scale": (B,) px/m, "angle": (B,) rad}`` at the training side S (``predict
--model`` resizes source images to S and back). Param ``tta``: none, flip or d4.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.models import set_model

try:
    from geopose_mlops.constants import CITIES
    from geopose_mlops.inference import EnsemblePredictor
except ImportError as err:  # the model's copy of this file runs wherever the model is loaded
    raise ImportError(
        f"this geopose ensemble needs the geopose-mlops package to load ({err}); install the version named "
        "in the model's requirements.txt (pip install -e <geopose-mlops checkout>)"
    ) from err

ARTIFACT = "ensemble"  # the packaged ensemble folder: ensemble.json and checkpoints/<member>/fold<N>.pt



class GeoposeEnsembleModel(mlflow.pyfunc.PythonModel):
    """The fitted ensemble behind a registered version (``inference.EnsemblePredictor``).

    ``predict``'s input is typed as what it is, a dict of tensors, and checked against the TensorSpec
    signature ``promote`` logs; MLflow 3.17 itself reads only ``list[...]`` and pydantic hints (see
    ``registry.hint_warnings_dropped``).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load every member's fold models from the packaged ensemble folder."""
        self.predictor = EnsemblePredictor(context.artifacts[ARTIFACT])
        self.spec = self.predictor.spec

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: dict[str, np.ndarray],
        params: dict[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Heights (m), scales (px/m) and angles (rad) of a batch; ``params["tta"]``: none, flip or d4."""
        cities = [CITIES[int(c)] for c in np.asarray(model_input["city"]).reshape(-1)]
        tta = (params or {}).get("tta", "none")
        return self.predictor.predict(model_input["image"], np.asarray(model_input["gsd"]), cities, tta)


set_model(GeoposeEnsembleModel())
