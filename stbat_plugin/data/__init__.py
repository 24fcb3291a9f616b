"""Data layer: city files, region graphs, region descriptors, splits, scalers and windows.

Arrays follow the ``[t, n, c]`` (time, regions, channels) layout throughout.
"""

from __future__ import annotations

from stbat_plugin.data.city import (
    City,
    CityDataError,
    CityInfo,
    CityNotFoundError,
    city_from_arrays,
    format_city_table,
    list_cities,
    load_city,
    parse_span,
    span_of,
)
from stbat_plugin.data.descriptors import (
    DescriptorSet,
    RegionDescriptors,
    poi_descriptors,
    region_descriptors,
    temporal_profile_descriptors,
)
from stbat_plugin.data.graph import GraphContext, build_graph, grid_graph
from stbat_plugin.data.scalers import (
    Log1pScaler,
    MinMaxScaler,
    Scaler,
    ScalerError,
    StandardScaler,
    make_scaler,
)
from stbat_plugin.data.splits import (
    Split,
    SplitError,
    source_split,
    steps_per_day,
    target_split,
    valid_region_mask,
)
from stbat_plugin.data.windows import WindowDataset, WindowError, window_count

__all__ = [
    "City",
    "CityDataError",
    "CityInfo",
    "CityNotFoundError",
    "DescriptorSet",
    "GraphContext",
    "Log1pScaler",
    "MinMaxScaler",
    "RegionDescriptors",
    "Scaler",
    "ScalerError",
    "Split",
    "SplitError",
    "StandardScaler",
    "WindowDataset",
    "WindowError",
    "build_graph",
    "city_from_arrays",
    "format_city_table",
    "grid_graph",
    "list_cities",
    "load_city",
    "make_scaler",
    "parse_span",
    "span_of",
    "poi_descriptors",
    "region_descriptors",
    "source_split",
    "steps_per_day",
    "target_split",
    "temporal_profile_descriptors",
    "valid_region_mask",
    "window_count",
]
