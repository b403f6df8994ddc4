"""The HTTP API's schema (pydantic): what the routes answer. A scored image's schema is made from the result row
the inference pipeline answers (:class:`gaussad.detector.results.ResultRow` and its ``FIELDS``), so the service,
``gaussad score --json`` and the Dask workers share one row type."""

from __future__ import annotations

from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..detector.results import FIELDS, REQUIRED, ResultRow


def _result_fields() -> dict[str, Any]:
    hints = get_type_hints(ResultRow)
    out: dict[str, Any] = {}
    for name, description in FIELDS.items():
        if name in REQUIRED:
            out[name] = (hints[name], Field(description=description))
        else:
            out[name] = (hints[name] | None, Field(None, description=description))
    return out


ImageResult = create_model(
    "ImageResult", __config__=ConfigDict(extra="allow"), **_result_fields(),
    id=(str | None, Field(None, description="the result's id in the results log (to mark it good or defect)")))


class ScoreResponse(BaseModel):
    model: str
    version: int | None = Field(None, description="version number of the model that scored the images")
    fpr: float
    results: list[ImageResult]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    backbone: str | None
    preset: str
    input_size: int | None
    levels: list[str]
    n_samples: int = Field(description="number of training images")
    maps: bool = Field(description="whether the model computes anomaly maps")
    map_levels: list[str]
    map_tiles: int = Field(description="tiles a side of the anomaly maps (1 = untiled)")
    pool: str = Field(description="how each level's feature map was pooled into the global features")
    precision: str = Field(description="the network's arithmetic: fp32 or int8")
    int8: dict | None = Field(None, description="an int8 network's weight format, the instruction set it was "
                              "calibrated on, this CPU's, and whether the format saturates here")
    adaptation: dict | None = Field(None, description="a network adapted at fit (--adapt): epochs asked and run, the "
                                    "one kept (0: the pretrained network), how it chose, held-out AUROC by epoch")
    threshold: dict
    heat_scale: dict | None = Field(None, description="heat-map colours (models with maps): none up to `low`, full "
                                    "from `high`; `source`: what `low` is (the training images' largest map peak)")


class Health(BaseModel):
    """With API keys and no valid key, only ``status``, ``auth`` and ``limits`` (what the page needs before a key)."""
    status: str = Field(description="ok, or degraded while the results log's database refuses rows")
    version: str | None = None
    models: list[str] | None = None
    limits: dict[str, int]
    auth: bool = Field(False, description="whether requests need an API key")
    drift: dict[str, dict] | None = Field(None, description="per model: the drift tests over its recent results")
    feedback: bool | None = Field(None, description="whether feedback updates can work: the service keeps the scored "
                                  "images (--keep-images) of the models' folder")
    results_log: str | None = Field(None, description="while the results log's database refuses rows (status "
                                    "degraded): how many wait, since when, and why")
