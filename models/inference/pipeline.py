"""Where a series becomes an embedding.

    work (SeriesWork: stored file paths, Modality, Body Part)
      1. load       models.inference.loading.load_series      files -> MetaTensor(s): volume in modality
                                                     units with an RAS affine, or 2D images in [0, 1]
      2. route      models.inference.transforms.router_thumbnail + models.inference.router.Router
                                                     3x64x64 thumbnail -> image probabilities,
                                                     combined with the header-rule table
                                                     -> RouteDecision (route, confidence, findings)
      3. normalize  models.inference.transforms route_chain(route)  (MONAI chain per route at the input
                                                     geometry of the route's model card, with the
                                                     enhancement steps settings switch on)
      4. embed      models.inference.networks IdentityModel[route]       (MONAI ResNet, L2-normalized)
    -> (RouteDecision, EmbeddingResult | None)

The router needs its own route-agnostic normalization (the thumbnail), so routing comes
before the route's normalization. Series routed to "other", routed with too little confidence,
or whose pixels are not anatomy (`models.inference.anatomy_gate`: blank, noise, test patterns) are stored
and listed but not embedded, so they give no identity evidence. A series with
several 2D images (both eyes, a cine) is embedded image by image and the mean of the
embeddings, L2-normalized again, is the series embedding. Anything wrong with the series
itself raises `SeriesError` (the worker records the reason). A failure of a step that runs
for one series alone (load, thumbnail, normalize) is that series' own: a permanent SeriesError,
unless memory ran out. Failures of the batched network passes propagate, and the worker
processes the batch again series by series.

`SeriesPipeline` loads the router and the identity networks once; `process_batch` runs
several series, batching the networks per route. `profile` accumulates seconds per route
and stage (load, route, normalize, embed) for the benchmark.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from db.records import EmbeddingResult, RouteDecision, SeriesWork
from dicom_node.config import PipelineSettings
from models.inference.anatomy_gate import series_problem
from models.inference.errors import SeriesError, out_of_memory
from models.inference.loading import LoadedSeries, load_series
from models.inference.networks import IdentityModel, load_identity_model
from models.inference.router import Router
from models.inference.transforms import ROUTE_INPUTS, build_route_transforms, router_thumbnail

STAGES = ("load", "route", "normalize", "embed")


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pipeline.device = 'cuda' but torch sees no CUDA device")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


class SeriesPipeline:
    """Router and identity networks, loaded once from `weights_dir` (local files only).

    process(work, storage_dir) -> (RouteDecision, EmbeddingResult | None); raises SeriesError
    process_batch(works, storage_dir) -> [(RouteDecision, EmbeddingResult | None) | SeriesError]
    profile: {route: {"load", "route", "normalize", "embed": seconds, "series": count}}
    """

    def __init__(self, settings: PipelineSettings, weights_dir: Path | None = None) -> None:
        self.settings = settings
        self.weights_dir = Path(weights_dir if weights_dir is not None else settings.weights_dir)
        self.device = pick_device(settings.device)
        self.router = Router.load(self.weights_dir / "router", settings.min_route_confidence, self.device)
        self.models: dict[str, IdentityModel] = {
            route: load_identity_model(route, self.weights_dir, self.device)
            for route in self.router.classes if ROUTE_INPUTS.get(route, {}).get("channels")}
        # each route's chain at its model's input geometry (card "input"; default ROUTE_INPUTS)
        self.transforms = build_route_transforms(
            settings.enhance, {route: model.card.get("input") for route, model in self.models.items()})
        self.profile: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(STAGES + ("series",), 0.0))

    # ------------------------------------------------------------------ one series

    def process(self, work: SeriesWork, storage_dir: Path) -> tuple[RouteDecision, EmbeddingResult | None]:
        """Load, route, normalize and embed one series; SeriesError if it cannot be used."""
        result = self.process_batch([work], storage_dir)[0]
        if isinstance(result, SeriesError):
            raise result
        return result

    # ------------------------------------------------------------------ several series

    def process_batch(self, works: list[SeriesWork], storage_dir: Path) -> list:
        """One result per work, in order: (RouteDecision, EmbeddingResult | None) or the SeriesError.

        All series of the batch are loaded before the networks run, so memory grows with the
        batch (a 512 x 512 x 300 CT is 300 MB as float32): keep batches of volumes small.
        """
        results: list = [None] * len(works)
        loaded: dict[int, tuple[LoadedSeries, float]] = {}
        for i, work in enumerate(works):                                     # 1. load
            started = time.perf_counter()
            try:
                series = load_series([Path(storage_dir) / p for p in work.paths], work.modality, work.body_part)
            except SeriesError as error:        # load_series raises nothing else but interrupts
                results[i] = error
                continue
            loaded[i] = (series, time.perf_counter() - started)

        decisions = self._route({i: s for i, (s, _) in loaded.items()}, works)   # 2. route
        pending: dict[str, list[int]] = defaultdict(list)
        for i, (series, load_s) in loaded.items():
            if isinstance(decisions[i], SeriesError):
                results[i] = decisions[i]
                continue
            decision, route_s = decisions[i]
            stats = self.profile[decision.route]
            stats["load"] += load_s
            stats["route"] += route_s
            stats["series"] += 1
            if series.findings:
                decision = _with_findings(decision, series.findings)
            if decision.route in self.models and decision.linkable:
                started = time.perf_counter()
                problem = series_problem(series.kind, series.images)
                stats["route"] += time.perf_counter() - started
                if problem:
                    decision = _with_findings(decision, [f"not anatomy: {problem}: stored, not linked"], linkable=False)
            results[i] = (decision, None)
            if decision.route in self.models and decision.linkable:
                pending[decision.route].append(i)

        for route, indices in pending.items():                                # 3. normalize, 4. embed
            for i, embedding in self._embed(route, {i: loaded[i][0] for i in indices}).items():
                results[i] = embedding if isinstance(embedding, SeriesError) else (results[i][0], embedding)
        return results

    # ------------------------------------------------------------------ steps

    def _route(self, series: dict[int, LoadedSeries], works: list[SeriesWork]) -> dict:
        """{index: (RouteDecision, seconds) or SeriesError}; one router forward pass for all thumbnails."""
        out: dict = {}
        started = time.perf_counter()
        thumbs: dict[int, torch.Tensor] = {}
        if self.router.net is not None:
            for i, s in series.items():
                try:
                    thumbs[i] = router_thumbnail(s)
                except Exception as error:  # noqa: BLE001 - e.g. an image too small to resample: the series'
                    out[i] = SeriesError(f"cannot make the router thumbnail: {type(error).__name__}: {error}",
                                         permanent=not out_of_memory(error))
        probabilities = dict(zip(thumbs, self.router.image_probabilities(torch.stack(list(thumbs.values()))))) \
            if thumbs else {}
        shared = (time.perf_counter() - started) / max(len(series), 1)
        for i, s in series.items():
            if i in out:
                continue
            t = time.perf_counter()
            decision = self.router.decide(s.kind, works[i].modality or s.modality, works[i].body_part or s.body_part,
                                          probabilities.get(i))
            out[i] = (decision, shared + time.perf_counter() - t)
        return out

    def _embed(self, route: str, series: dict[int, LoadedSeries]) -> dict[int, EmbeddingResult | SeriesError]:
        """Normalize every image of these series for `route`, embed them in batches, average per series."""
        stats, model, out = self.profile[route], self.models[route], {}
        started = time.perf_counter()
        tensors, owners = [], []
        for i, s in series.items():
            try:
                inputs = [self.transforms[route](image).as_tensor() for image in s.images]
            except Exception as error:  # noqa: BLE001 - e.g. an image too small for the chain: the series'
                out[i] = SeriesError(f"cannot normalize for route {route}: {type(error).__name__}: {error}",
                                     permanent=not out_of_memory(error))
                continue
            tensors += inputs
            owners += [i] * len(inputs)
        normalized = time.perf_counter()
        size = self.settings.batch_size
        vectors = np.concatenate([model.embed(torch.stack(tensors[k:k + size]))
                                  for k in range(0, len(tensors), size)]) if tensors else np.empty((0, model.dim))
        owners = np.asarray(owners)
        for i in dict.fromkeys(owners.tolist()):
            vector = vectors[owners == i].mean(axis=0)
            vector = (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype("<f4")
            out[i] = EmbeddingResult(route=route, model_name=model.name, model_version=model.version,
                                     vector=vector.tobytes(), dim=int(vector.size))
        stats["normalize"] += normalized - started
        stats["embed"] += time.perf_counter() - normalized
        return out

    def reset_profile(self) -> None:
        self.profile.clear()


def _with_findings(decision: RouteDecision, extra: list[str], linkable: bool | None = None) -> RouteDecision:
    return RouteDecision(route=decision.route, confidence=decision.confidence, source=decision.source,
                         findings=list(extra) + list(decision.findings),
                         linkable=decision.linkable if linkable is None else linkable)
