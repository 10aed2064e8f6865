"""Names, units and fixed values shared by every stage of the pipeline.

Batches and model outputs are dicts keyed by the names below; the unit of each value is written
beside its key. Nothing in this module imports anything heavier than the standard library.
"""

from __future__ import annotations

# --- Cities of the Overhead Geopose Challenge, in the order used for one-hot encodings. ---
CITIES: tuple[str, ...] = ("ARG", "ATL", "JAX", "OMA")

# --- File conventions (SPEC §2). ---
AGL_NODATA = 65535  # uint16 centimetre AGL files: this value marks no data
CM_PER_M = 100.0  # AGL files are in cm, VFLOW json scale is px/cm; in memory we use m and px/m
RGB_SUFFIXES: tuple[str, ...] = (".j2k", ".tif")
RGB_TAG, AGL_TAG, VFLOW_TAG = "RGB", "AGL", "VFLOW"
TRAIN_CSV = "geopose_train.csv"
TEST_CSV = "geopose_test.csv"
METADATA_CSV = "metadata.csv"
FOLDS_CSV = "folds.csv"

# --- Batch and model-output keys (values in memory, after decoding). ---
IMAGE = "image"  # float32 (B, 3, H, W), RGB scaled to [0, 1]
AGL = "agl"  # float32 (B, H, W), metres above ground; NaN = no data
MAG = "mag"  # float32 (B, H, W), flow magnitude in pixels = agl_m * scale_px_per_m
XYDIR = "xydir"  # float32 (B, 2), flow direction (sin(angle), cos(angle)); unit vector
ANGLE = "angle"  # float32 (B,), radians; direction = (sin, cos)
SCALE = "scale"  # float32 (B,), pixels per metre of height
GSD = "gsd"  # float32 (B,), metres per pixel (ground sample distance); NaN where unknown
CITY = "city"  # int64 (B,), index into CITIES
SAMPLE_ID = "id"  # str, "{CITY}_{id}" as in the file names (e.g. "JAX_abc")

# --- MLflow names (SPEC §4). ---
DEFAULT_EXPERIMENT = "geopose"
KIND_TAG = "geopose.kind"
KIND_CV, KIND_FOLD, KIND_STUDY, KIND_TRIAL, KIND_ENSEMBLE, KIND_REPORT = (
    "cv",
    "fold",
    "study",
    "trial",
    "ensemble",
    "report",
)
REGISTERED_MODEL = "geopose-ensemble"
CHAMPION_ALIAS = "champion"
FOLD_TAG = "geopose.fold"  # the fold number of a fold run
INIT_FROM_TAG = "geopose.init_from"  # cv run: the cv run whose fold best.pt its folds started from (staged)
CODE_VERSION_TAG = "geopose.code_version"  # package version + digest of its sources (tracking.runs.code_version)
FINGERPRINT_PARAM = "data_fingerprint"  # cv run param: digest of the training data (members must share it)
FOLDS_FILE_TAG = "geopose.folds_file"  # cv run: the folds.csv its folds came from, or "seeded k=K seed=S"

# --- Artifact layout of a run and of a packaged ensemble (SPEC §4). ---
CHECKPOINT_DIR = "checkpoints"  # fold run: best.pt, last.pt; packaged ensemble: <member>/fold<N>.pt
BEST_NAME, LAST_NAME = "best.pt", "last.pt"  # weights of the best epoch; full state of the last (resume)
OOF_DIR = "oof"  # fold run: out-of-fold predictions of the best epoch
CONFIG_JSON = "config.json"  # cv run: the TrainConfig that rebuilds it
ENSEMBLE_JSON = "ensemble.json"  # ensemble run: members, weights, city factors, scale model

# --- Metric (SPEC §1). ---
R2_EPS = 1e-4  # added to the total sum of squares, as the competition's scorer does
