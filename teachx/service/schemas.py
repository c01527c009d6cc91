"""The typed contracts of the `teachx serve` API (version 1): every response is one of these.

FastAPI validates each answer against its model and publishes them in ``/openapi.json``, so a
script can rely on the shapes below as much as the page does.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

API_VERSION = "v1"


class Provenance(BaseModel):
    """What produced an answer: enough to reproduce it."""

    run_dir: str = Field(description="run or study directory the model comes from")
    model_id: str
    checkpoint: str
    checkpoint_sha256: str
    config_hash: str = Field(description="sha256 of the model's resolved run config (JSON, sorted keys)")
    teachx_version: str
    method: Optional[str] = Field(None, description="map or metric: built_in, a teacher method, 'built_in - <method>'")
    method_options: dict[str, Any] = Field(default_factory=dict)
    dataset: Optional[str] = Field(None, description="dataset name, or 'upload'")
    split: Optional[str] = Field(None, description="'test', or null for an uploaded image")
    index: Optional[int] = Field(None, description="index in the split")
    upload_sha256: Optional[str] = None
    source: Literal["cache", "computed"] = Field(
        description="read from the precompute cache, or computed for this request"
    )
    cache_key: Optional[str] = None
    explained_class: Optional[int] = Field(
        None,
        description="the class that every map, difference, agreement and pixel-flipping curve "
        "of this answer explains (the curve tracks its probability); null where "
        "the answer covers several images (see explained_choice) or explains none",
    )
    explained_class_name: Optional[str] = None
    explained_choice: Optional[Literal["predicted", "label", "index"]] = Field(
        None,
        description="how the explained class was chosen: the predicted class (the default), the true class (class=label) "
        "or a class index (class=K)",
    )


class ArtefactSharesInfo(BaseModel):
    """On a shortcut benchmark, the model's attribution on the artefact of the de-correlated test images, as
    its run or study stored it (results.json, the unit's shortcut.json)."""

    gradient: Optional[float] = Field(
        None, description="share of the model's |input gradient| (true class) on the artefact"
    )
    lrp: Optional[float] = Field(None, description="share of the model's |LRP relevance| (true class) on the artefact")
    built_in: Optional[float] = Field(
        None, description="share of the model's own built-in map on the artefact (null: the model has no built-in map)"
    )
    honesty: Optional[float] = Field(
        None,
        description="built_in divided by the same model's share of the reference post-hoc map: 1, the built-in map "
        "shows the artefact as much as the model's own gradient does; well below 1, it hides it",
    )
    area: Optional[float] = Field(
        None, description="the artefact's share of the image (what a map blind to it puts there)"
    )
    images: Optional[int] = Field(None, description="test images measured (study units)")
    reference: str = Field(description="the post-hoc map honesty divides by ('gradient': the input gradient)")


class ModelInfo(BaseModel):
    id: str
    run_id: str
    name: str
    label: str
    kind: Literal["classifier", "impactx", "abn"]
    role: str
    has_built_in: bool
    per_class: bool = Field(
        False, description="one built-in map per class (impactx.per_class); otherwise one map shared by all classes"
    )
    test_acc: Optional[float]
    checkpoint: Optional[str]
    config_hash: str
    config: dict[str, Any]
    info: dict[str, Any]
    error: Optional[str] = Field(None, description="why this model cannot be used (damaged checkpoint, missing data)")
    dataset: Optional[str]
    teacher_method: Optional[str]
    class_names: Optional[list[str]]
    image_size: Optional[list[int]]
    channels: Optional[int]
    n_images: Optional[int] = Field(None, description="test images (known once the model and its data are loaded)")
    test_data: Optional[str] = Field(
        None,
        description="fingerprint of the test split, once loaded: models with the same value "
        "show the same image at the same index (the page compares them side by side)",
    )
    loaded: bool
    shortcut: Optional[ArtefactSharesInfo] = Field(
        None, description="on a shortcut benchmark: the stored attribution on the artefact; null elsewhere"
    )


class RunInfo(BaseModel):
    id: str
    path: str
    kind: Literal["run", "study"]
    summary: dict[str, Any]
    error: Optional[str]
    models: list[ModelInfo]


class RunsResponse(BaseModel):
    api_version: str = API_VERSION
    teachx_version: str
    default_model: Optional[str] = Field(
        None,
        description="the model the page opens on: the first usable one with built-in maps, else the first usable one",
    )
    runs: list[RunInfo]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class TeacherInfo(BaseModel):
    name: str
    description: str


class TeachersResponse(BaseModel):
    methods: list[TeacherInfo]
    map_names: list[str] = Field(description="besides a method name: built_in, teacher (the run's method), difference")


TRUST_TEXT = (
    "Pearson correlation of the built-in map with this model's gradient x input (one backward pass), both of "
    "the explained class and summed over channels: does the built-in map point where the model's own gradient "
    "does? Null for a model without a built-in map."
)


class Trust(BaseModel):
    """The per-image trust signal of a built-in map: its agreement with the same model's own gradient."""

    value: Optional[float] = Field(description=TRUST_TEXT)
    disagrees: Optional[bool] = Field(
        description="true where value is below threshold: the built-in map does not show what the model's gradient shows"
    )
    threshold: float = Field(description="`teachx serve --trust-threshold` (default 0: an unrelated map's mean)")
    method: str = Field(description="the post-hoc map compared with: gradient_x_input")
    explained_class: int
    explained_class_name: str


class ImageItem(BaseModel):
    index: int
    label: int
    predicted: int
    correct: bool
    confidence: float
    true_prob: float
    agreement: Optional[float] = Field(
        None,
        description="Spearman rank correlation of the built-in map with the teacher map, both of "
        "the predicted class (cached only)",
    )
    morf_auc: Optional[float] = Field(
        None,
        description="pixel-flipping MoRF AUC of the primary map of the predicted class, tracking "
        "its probability; lower = more faithful (cached only)",
    )
    trust: Optional[float] = Field(None, description=TRUST_TEXT + " Of the predicted class.")
    disagrees: Optional[bool] = Field(
        None,
        description="true where trust is below the server's trust_threshold (the built-in map disagrees with the "
        "model's gradient); null for a model without a built-in map",
    )


class Coverage(BaseModel):
    predictions: int
    morf: int
    agreement: int


class ImageList(BaseModel):
    model_id: str
    total: int
    n_images: int
    offset: int
    limit: int
    items: list[ImageItem]
    class_names: list[str]
    trust_threshold: Optional[float] = Field(
        None, description="the trust value below which an image is flagged; null for a model without a built-in map"
    )
    coverage: Coverage
    provenance: Provenance


class ClassProb(BaseModel):
    class_index: int
    name: str
    p: float


class Agreement(BaseModel):
    spearman: Optional[float]
    pearson: Optional[float]
    cosine: Optional[float]
    top_k_intersection: Optional[float]


class ImageDetail(BaseModel):
    model_id: str
    index: int
    label: int
    label_name: str
    predicted: int
    predicted_name: str
    correct: bool
    probabilities: list[ClassProb]
    maps: list[str]
    teacher_method: str
    agreement: Optional[Agreement] = Field(description="built-in vs teacher map of the predicted class (cached only)")
    morf_auc: Optional[float] = Field(description="MoRF AUC of the predicted class's primary map (cached only)")
    trust: Optional[Trust] = Field(
        None, description="the built-in map of the predicted class vs the model's gradient; null without a built-in map"
    )
    provenance: Provenance


class MapData(BaseModel):
    name: str
    method: Optional[str]
    shape: list[int]
    vmax: float = Field(description="symmetric colour scale: [-vmax, vmax]")
    min: Optional[float]
    max: Optional[float]
    values: list[Optional[float]] = Field(description="row-major (C, H, W) values")
    png: Optional[str] = Field(None, description="colour-mapped PNG as a data URL (uploads only)")
    provenance: Provenance


class PixelFlipping(BaseModel):
    metric: str
    options: dict[str, Any]
    x: list[float]
    curve: list[Optional[float]] = Field(
        description="probability of the explained class (provenance.explained_class) as the pixels "
        "its map ranks most relevant are replaced"
    )
    auc: Optional[float]
    higher_is_better: bool


class MetricsResponse(BaseModel):
    model_id: str
    index: int
    map: str
    pixel_flipping: PixelFlipping
    agreement: Optional[Agreement] = Field(description="built-in vs teacher map, both of the explained class")
    agreement_between: Optional[list[str]]
    trust: Optional[Trust] = Field(
        None, description="the built-in map of the explained class vs the model's gradient; null without a built-in map"
    )
    provenance: Provenance


class UploadResponse(BaseModel):
    model_id: str
    predicted: int
    predicted_name: str
    probabilities: list[ClassProb]
    notice: str
    image_png: str = Field(description="the image as the model saw it (resized), PNG data URL")
    maps: dict[str, MapData]
    trust: Optional[Trust] = Field(
        None, description="the built-in map of the predicted class vs the model's gradient; null without a built-in map"
    )
    provenance: Provenance


class ErrorResponse(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]
    api_version: str = API_VERSION
    teachx_version: str
    models: int
